#!/usr/bin/env bash
# --progress=json and --progress-fd=N on every long command (docs/json.md):
# the JSON lines on stderr parse, name the command, never go back, start
# at 0 and end at 100 on success, carry bytes <= total when they carry
# them, and nothing of them reaches stdout; --progress-fd=N writes
# nbdcopy's "N/100" lines (or the JSON lines with --progress=json) to
# that descriptor only; bad values are refused before anything is
# written; -p keeps qemu-img's meter; under qemu-img's name both options
# are unknown, as in qemu-img.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io python3
tmpdir

# check_json CMD FILE: FILE holds only valid progress lines of CMD.
check_json()
{
    python3 - "$1" "$2" <<'EOF'
import json, sys
cmd, name = sys.argv[1], sys.argv[2]
lines = open(name).read().splitlines()
if not lines:
    sys.exit("%s: no progress lines" % name)
last = -1.0
for n, line in enumerate(lines, 1):
    try:
        o = json.loads(line)
    except ValueError as e:
        sys.exit("%s:%d: not JSON (%s): %r" % (name, n, e, line))
    if o.get("command") != cmd:
        sys.exit("%s:%d: command %r, want %r" % (name, n, o.get("command"), cmd))
    p = o["progress"]
    if not isinstance(p, (int, float)) or p < last or p > 100:
        sys.exit("%s:%d: progress %r after %r" % (name, n, p, last))
    if ("bytes" in o) != ("total" in o) or ("bytes" in o and
                                             not 0 <= o["bytes"] <= o["total"]):
        sys.exit("%s:%d: bytes/total %r" % (name, n, o))
    if not o["elapsed"] >= 0:
        sys.exit("%s:%d: elapsed %r" % (name, n, o))
    last = p
if json.loads(lines[0])["progress"] != 0:
    sys.exit("%s: does not start at 0" % name)
if last != 100:
    sys.exit("%s: ends at %r, not 100" % (name, last))
if sum(1 for l in lines if json.loads(l)["progress"] == 100) != 1:
    sys.exit("%s: 100 more than once" % name)
EOF
}

# check_fd FILE: nbdcopy's format, monotonic, ending with 100/100.
check_fd()
{
    python3 - "$1" <<'EOF'
import re, sys
lines = open(sys.argv[1]).read().splitlines()
last = -1
for line in lines:
    m = re.fullmatch(r"(\d+)/100", line)
    if not m or int(m.group(1)) <= last or int(m.group(1)) > 100:
        sys.exit("%s: bad line %r after %r" % (sys.argv[1], line, last))
    last = int(m.group(1))
if last != 100:
    sys.exit("%s: ends at %r" % (sys.argv[1], last))
EOF
}

# run_json CMD ARGS...: `vdisk CMD --progress=json ARGS` succeeds, its
# stderr is progress lines only, its stdout has none.
run_json()
{
    local cmd=$1
    shift
    "$VDISK" "$cmd" --progress=json "$@" >out.txt 2>err.txt ||
        fail "$cmd failed: $(cat err.txt)"
    check_json "$cmd" err.txt || fail "$cmd: bad progress lines"
    ! grep -q progress out.txt || fail "$cmd: progress on stdout"
}

$QEMU_IMG create -q -f qcow2 img.qcow2 32M
$QEMU_IO -c 'write -P 1 0 6M' -c 'write -P 2 12M 3M' -c 'write -z 20M 1M' \
    -c 'write -P 3 30M 64k' img.qcow2 >/dev/null
$QEMU_IMG snapshot -c s1 img.qcow2
$QEMU_IO -c 'write -P 4 1M 2M' img.qcow2 >/dev/null

# ---- every long command ----
run_json convert -O qcow2 img.qcow2 cv.qcow2
[ ! -s out.txt ] || fail "convert printed on stdout"
assert_same_content img.qcow2 cv.qcow2
run_json convert -O raw -q img.qcow2 cv.raw   # -q silences stdout only
run_json compare img.qcow2 cv.qcow2
grep -qx 'Images are identical.' out.txt || fail "compare's verdict"
run_json check img.qcow2
grep -q 'No errors were found' out.txt || fail "check's report"
run_json diff img.qcow2 s1
run_json dd -O raw bs=1M if=img.qcow2 of=dd.raw
cmp cv.raw dd.raw || fail "dd copied something else"
run_json amend -o compat=0.10 cv.qcow2
$QEMU_IMG create -q -f qcow2 -b cv.raw -F raw top.qcow2
$QEMU_IO -c 'write -P 9 0 8M' top.qcow2 >/dev/null
run_json rebase -b img.qcow2 -F qcow2 top.qcow2
run_json commit top.qcow2
grep -qx 'Image committed.' out.txt || fail "commit's sentence"
$QEMU_IO -c 'read -P 9 0 8M' img.qcow2 >/dev/null || fail "commit lost data"

# ---- --progress-fd=N: that descriptor only ----
exec 7>fd.txt
"$VDISK" convert --progress-fd=7 -O raw img.qcow2 fd.raw >out.txt 2>err.txt
exec 7>&-
check_fd fd.txt || fail "--progress-fd lines"
[ ! -s out.txt ] && [ ! -s err.txt ] || fail "--progress-fd wrote elsewhere"
exec 7>fd.txt
"$VDISK" compare --progress=json --progress-fd=7 img.qcow2 fd.raw \
    >out.txt 2>err.txt
exec 7>&-
check_json compare fd.txt || fail "--progress=json --progress-fd lines"
[ ! -s err.txt ] || fail "--progress-fd: stderr has $(cat err.txt)"
grep -qx 'Images are identical.' out.txt || fail "compare with fd"

# ---- a reader that goes away does not stop the command (no SIGPIPE) ----
exec 7> >(head -c 1 >/dev/null)
sleep 0.2
"$VDISK" convert --progress-fd=7 -O raw img.qcow2 gone.raw
exec 7>&-
cmp gone.raw fd.raw || fail "convert with a gone progress reader"
st=0
"$VDISK" convert --progress=json -O raw img.qcow2 gone2.raw 2>&1 >/dev/null |
    head -c 1 >/dev/null || st=$?
[ "$st" = 0 ] || fail "convert with a gone stderr reader: status $st"
cmp gone2.raw fd.raw || fail "convert with a gone stderr reader"

# ---- -p: qemu-img's meter, unchanged ----
$QEMU_IMG convert -p -O raw img.qcow2 q.raw >q.txt
"$VDISK" convert -p -O raw img.qcow2 v.raw >v.txt
tail -c 20 q.txt >q.end
tail -c 20 v.txt >v.end
cmp q.end v.end || fail "-p meter ends differently"

# ---- bad values: refused before anything is written ----
expect_status 1 "$VDISK" convert --progress=xml -O raw img.qcow2 bad.raw \
    2>err.txt
grep -q -- '--progress must be used with human or json' err.txt ||
    fail "--progress=xml: $(cat err.txt)"
expect_status 1 "$VDISK" convert --progress-fd=97 -O raw img.qcow2 bad.raw \
    2>err.txt
grep -q 'file descriptor 97 is not open' err.txt ||
    fail "--progress-fd=97: $(cat err.txt)"
expect_status 1 "$VDISK" convert --progress-fd=x -O raw img.qcow2 bad.raw \
    2>/dev/null
expect_status 1 "$VDISK" convert --progress-fd=1 -O raw img.qcow2 bad.raw \
    2>err.txt
grep -q 'never goes to standard output' err.txt || fail "fd 1: $(cat err.txt)"
exec 7<img.qcow2
expect_status 1 "$VDISK" convert --progress-fd=7 -O raw img.qcow2 bad.raw \
    2>err.txt
exec 7<&-
grep -q 'not open for writing' err.txt || fail "read-only fd: $(cat err.txt)"
[ ! -e bad.raw ] || fail "a refused convert wrote its target"
sum=$(sha256sum img.qcow2)
expect_status 1 "$VDISK" commit --progress=bogus img.qcow2 2>/dev/null
[ "$sum" = "$(sha256sum img.qcow2)" ] || fail "refused commit changed the image"

# ---- a failing command never claims 100 ----
$QEMU_IMG create -q -f qcow2 nob.qcow2 1M
expect_status 1 "$VDISK" commit --progress=json nob.qcow2 >/dev/null 2>err.txt
! grep -q '"progress": 100' err.txt || fail "failed commit reported 100"

# ---- under qemu-img's name: unknown options, as in qemu-img ----
for opt in --progress=json --progress-fd=2; do
    qrc=0; vrc=0
    $QEMU_IMG convert "$opt" -O raw img.qcow2 n.raw >q.out 2>&1 || qrc=$?
    "$VDISK_QEMU_IMG" convert "$opt" -O raw img.qcow2 n.raw >v.out 2>&1 ||
        vrc=$?
    [ "$qrc" != 0 ] && [ "$vrc" = "$qrc" ] || fail "$opt: exit $vrc/$qrc"
    diff q.out v.out || fail "$opt: messages differ"
done
[ ! -e n.raw ] || fail "refused convert wrote"
