#!/usr/bin/env bash
# --output=json on every command that prints something (docs/json.md):
# each object parses, its fields agree with what the human output says
# and with qemu-img's own JSON (info, check, map, measure: the same
# document; the others: qemu-img info after the command, qemu-img's
# human lines), and under qemu-img's name an --output that qemu-img lacks
# is refused with qemu-img's own message and status.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io python3
tmpdir

# jq FILE EXPR: prints Python EXPR over the parsed document `j` (fails
# the test when FILE is not JSON).
jq()
{
    python3 - "$1" "$2" <<'EOF'
import json, sys
try:
    j = json.load(open(sys.argv[1]))
except ValueError as e:
    sys.exit("%s is not JSON: %s" % (sys.argv[1], e))
v = eval(sys.argv[2])
print(json.dumps(v) if isinstance(v, (dict, list, bool)) or v is None else v)
EOF
}

# same_refusal ARGS...: qemu-img and vdisk as qemu-img exit alike and
# print the same for a command line qemu-img refuses.
same_refusal()
{
    local qrc=0 vrc=0
    $QEMU_IMG "$@" >q.out 2>&1 || qrc=$?
    "$VDISK_QEMU_IMG" "$@" >v.out 2>&1 || vrc=$?
    [ "$qrc" != 0 ] || fail "qemu-img accepted: $*"
    [ "$vrc" = "$qrc" ] || fail "exit $vrc, qemu-img $qrc: $* ($(cat v.out))"
    diff q.out v.out || fail "messages differ: $*"
}

$QEMU_IMG create -q -f qcow2 img.qcow2 8M
$QEMU_IO -c 'write -P 1 0 1M' -c 'write -P 2 4M 64k' img.qcow2 >/dev/null

# ---- qemu-img's four: the same document as qemu-img's ----
for args in "info img.qcow2" "check img.qcow2" "map img.qcow2" \
            "measure -O qcow2 img.qcow2" "measure -O raw --size 5M"; do
    # shellcheck disable=SC2086
    $QEMU_IMG ${args%% *} --output=json ${args#* } >q.json
    # shellcheck disable=SC2086
    "$VDISK" ${args%% *} --output=json ${args#* } >v.json
    json_equal_filtered q.json v.json
done

# ---- create: the Formatting line's options, typed ----
$QEMU_IMG create -f qcow2 -o cluster_size=4k,lazy_refcounts=on q.qcow2 3M \
    >q.txt
"$VDISK" create -f qcow2 -o cluster_size=4k,lazy_refcounts=on \
    --output=json c.qcow2 3M >c.json
[ "$(jq c.json 'j["filename"], j["format"]')" = "('c.qcow2', 'qcow2')" ] ||
    fail "create: filename/format"
python3 - q.txt c.json <<'EOF'
import json, sys
line = open(sys.argv[1]).read().strip()
head, _, rest = line.partition(" fmt=")
fmt, _, opts = rest.partition(" ")
want = dict(kv.split("=", 1) for kv in opts.split(" "))
got = json.load(open(sys.argv[2]))["options"]
def text(v):
    return ("on" if v else "off") if isinstance(v, bool) else str(v)
got = {k: text(v) for k, v in got.items()}
if want != got:
    sys.exit("create options differ:\n qemu-img %r\n vdisk    %r" % (want, got))
EOF
$QEMU_IMG info --output=json c.qcow2 >ci.json
[ "$(jq ci.json 'j["virtual-size"]')" = "$(jq c.json 'j["options"]["size"]')" ] ||
    fail "create: size"
expect_status 1 "$VDISK" create -f qcow2 --output=xml bad.qcow2 1M
[ ! -e bad.qcow2 ] || fail "create --output=xml created the image"

# ---- snapshot: -l is qemu-img info's "snapshots" ----
"$VDISK" snapshot -l --output=json img.qcow2 >sl0.json
[ "$(jq sl0.json 'j')" = "[]" ] || fail "snapshot -l: empty list"
"$VDISK" snapshot --output=json -c s1 img.qcow2 >sc.json
[ "$(jq sc.json 'j["action"], j["snapshot"]')" = "('create', 's1')" ] ||
    fail "snapshot -c json"
$QEMU_IO -c 'write -P 3 1M 64k' img.qcow2 >/dev/null
$QEMU_IMG snapshot -c s2 img.qcow2
"$VDISK" snapshot -l --output=json img.qcow2 >sl.json
$QEMU_IMG info --output=json img.qcow2 >qi.json
python3 - qi.json sl.json <<'EOF'
import json, sys
want = json.load(open(sys.argv[1]))["snapshots"]
got = json.load(open(sys.argv[2]))
if want != got:
    sys.exit("snapshot -l: %r\n   qemu-img info: %r" % (got, want))
EOF
# The human list has one row per object.
rows=$($QEMU_IMG snapshot -l img.qcow2 | tail -n +3 | wc -l)
[ "$rows" = "$(jq sl.json 'len(j)')" ] || fail "snapshot -l: row count"

# ---- compare: the verdict qemu-img prints, and its status ----
cp img.qcow2 same.qcow2
"$VDISK" compare --output=json img.qcow2 same.qcow2 >cmp.json
[ "$(jq cmp.json 'j["identical"], j["result"], j["offset"]')" = \
  "(True, 'identical', None)" ] || fail "compare: identical"
$QEMU_IO -c 'write -P 7 4195328 512' same.qcow2 >/dev/null
st=0; $QEMU_IMG compare img.qcow2 same.qcow2 >q.txt || st=$?
expect_status "$st" "$VDISK" compare --output=json img.qcow2 same.qcow2 >cmp.json
qoff=$(sed -n 's/^Content mismatch at offset \([0-9]*\)!$/\1/p' q.txt)
[ -n "$qoff" ] || fail "qemu-img compare said: $(cat q.txt)"
[ "$(jq cmp.json 'j["result"], j["offset"], j["identical"]')" = \
  "('content-mismatch', $qoff, False)" ] || fail "compare: mismatch"
$QEMU_IMG create -q -f qcow2 big.qcow2 9M
"$VDISK" compare --output=json -f qcow2 -F qcow2 big.qcow2 big.qcow2 >/dev/null
$QEMU_IMG convert -O qcow2 img.qcow2 img9.qcow2
$QEMU_IMG resize -q img9.qcow2 9M
st=0; $QEMU_IMG compare img.qcow2 img9.qcow2 >q.txt || st=$?
expect_status "$st" "$VDISK" compare --output=json img.qcow2 img9.qcow2 >cmp.json
grep -q '^Warning: Image size mismatch!$' q.txt || fail "qemu-img: $(cat q.txt)"
[ "$(jq cmp.json 'j["size-mismatch"], j["size1"], j["size2"]')" = \
  "(True, 8388608, 9437184)" ] || fail "compare: size mismatch"
st=0; $QEMU_IMG compare -s img.qcow2 img9.qcow2 >q.txt || st=$?
expect_status "$st" "$VDISK" compare -s --output=json img.qcow2 img9.qcow2 >cmp.json
[ "$(jq cmp.json 'j["result"]')" = "size-mismatch" ] || fail "compare -s"

# ---- resize: the sizes qemu-img info reports before and after ----
$QEMU_IMG info --output=json img9.qcow2 >before.json
"$VDISK" resize --output=json img9.qcow2 +1M >rs.json
$QEMU_IMG info --output=json img9.qcow2 >after.json
[ "$(jq rs.json 'j["old-size"], j["new-size"]')" = \
  "($(jq before.json 'j["virtual-size"]'), $(jq after.json 'j["virtual-size"]'))" ] ||
    fail "resize sizes"

# ---- commit, rebase: what qemu-img info says of the chain ----
$QEMU_IMG create -q -f qcow2 base.qcow2 4M
$QEMU_IO -c 'write -P 5 0 256k' base.qcow2 >/dev/null
$QEMU_IMG create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
$QEMU_IO -c 'write -P 6 1M 128k' top.qcow2 >/dev/null
$QEMU_IMG convert -O raw top.qcow2 want.raw
$QEMU_IMG info --output=json top.qcow2 >ti.json
"$VDISK" commit --output=json top.qcow2 >cm.json
[ "$(jq cm.json 'j["image"], j["base"], j["top-emptied"]')" = \
  "('top.qcow2', '$(jq ti.json 'j["full-backing-filename"]')', True)" ] ||
    fail "commit json: $(cat cm.json)"
assert_same_content -f raw -F qcow2 want.raw base.qcow2
$QEMU_IMG create -q -f qcow2 other.qcow2 4M
"$VDISK" rebase --output=json -u -b other.qcow2 -F qcow2 top.qcow2 >rb.json
$QEMU_IMG info --output=json top.qcow2 >ti.json
[ "$(jq rb.json 'j["backing-file"], j["backing-fmt"], j["unsafe"]')" = \
  "$(jq ti.json 'j["backing-filename"], j["backing-filename-format"], True')" ] ||
    fail "rebase json: $(cat rb.json)"

# ---- amend: the options applied, as qemu-img info then shows them ----
"$VDISK" amend --output=json -o compat=0.10 big.qcow2 >am.json
$QEMU_IMG info --output=json big.qcow2 >bi.json
[ "$(jq am.json 'j["options"]["compat"], j["format"]')" = \
  "($(jq bi.json 'repr(j["format-specific"]["data"]["compat"])'), 'qcow2')" ] ||
    fail "amend json: $(cat am.json)"

# ---- bitmap: the actions, and qemu-img info has the bitmap ----
"$VDISK" bitmap --output=json --add -g 128k --disable img.qcow2 b0 >bm.json
[ "$(jq bm.json '[a["action"] for a in j["actions"]], j["bitmap"]')" = \
  "(['add', 'disable'], 'b0')" ] || fail "bitmap json: $(cat bm.json)"
$QEMU_IMG info --output=json img.qcow2 >qi.json
[ "$(jq qi.json '[(b["name"], b["granularity"]) for b in j["format-specific"]["data"]["bitmaps"]]')" = \
  "[[\"b0\", $(jq bm.json 'j["actions"][0]["granularity"]')]]" ] ||
    fail "bitmap: qemu-img info disagrees"

# ---- convert: the summary against qemu-img info and map ----
"$VDISK" convert --output=json -O qcow2 img.qcow2 cv.qcow2 >cv.json
$QEMU_IMG info --output=json cv.qcow2 >cvi.json
$QEMU_IMG map --output=json img.qcow2 >map.json
[ "$(jq cv.json 'j["sources"], j["target"], j["target-format"], j["virtual-size"]')" = \
  "(['img.qcow2'], 'cv.qcow2', $(jq cvi.json 'repr(j["format"])'), $(jq cvi.json 'j["virtual-size"]'))" ] ||
    fail "convert json: $(cat cv.json)"
[ "$(jq cv.json 'j["data-bytes"]')" = \
  "$(jq map.json 'sum(e["length"] for e in j if e["data"])')" ] ||
    fail "convert data-bytes"
assert_same_content img.qcow2 cv.qcow2

# ---- dd: the bytes written are the output's size ----
$QEMU_IMG dd -O raw bs=64k count=10 skip=2 if=img.qcow2 of=qdd.raw
"$VDISK" dd --output=json -O raw bs=64k count=10 skip=2 if=img.qcow2 \
    of=vdd.raw >dd.json
cmp qdd.raw vdd.raw || fail "dd output differs from qemu-img's"
[ "$(jq dd.json 'j["bytes"], j["block-size"], j["count"], j["skip"]')" = \
  "($(size_of qdd.raw), 65536, 10, 2)" ] || fail "dd json: $(cat dd.json)"

# ---- bench: the figures of qemu-img bench's sentences ----
$QEMU_IMG bench -c 64 -d 4 -s 8k img.qcow2 >qb.txt
"$VDISK" bench --output=json -c 64 -d 4 -s 8k img.qcow2 >bench.json
want=$(sed -n 's/^Sending \([0-9]*\) \([a-z]*\) requests, \([0-9]*\) bytes each, \([0-9]*\) in parallel (starting at offset \([0-9]*\), step size \([0-9]*\))$/(\1, '"'"'\2'"'"', \3, \4, \5, \6)/p' qb.txt)
[ "$(jq bench.json 'j["count"], j["mode"], j["buffer-size"], j["depth"], j["offset"], j["step"]')" = "$want" ] ||
    fail "bench json: $(cat bench.json) vs $(cat qb.txt)"
[ "$(jq bench.json 'j["seconds"] >= 0')" = true ] || fail "bench seconds"

# ---- diff: an array of extents ----
"$VDISK" diff --output=json img.qcow2 s1 s2 >df.json
[ "$(jq df.json 'all("start" in e and "length" in e for e in j)')" = true ] ||
    fail "diff json"

# ---- under qemu-img's name: qemu-img's options only ----
for args in "compare --output=json img.qcow2 same.qcow2" \
            "commit --output=json top.qcow2" \
            "rebase --output=json -u -b x -F raw top.qcow2" \
            "resize --output=json img9.qcow2 10M" \
            "create --output=json -f qcow2 n.qcow2 1M" \
            "convert --output=json img.qcow2 n.raw" \
            "amend --output=json -o compat=1.1 big.qcow2" \
            "bitmap --output=json --add img.qcow2 b9" \
            "dd --output=json if=img.qcow2 of=n.raw" \
            "snapshot --output=json -l img.qcow2" \
            "bench --output=json -c 1 img.qcow2" \
            "convert --progress=json img.qcow2 n.raw" \
            "check --progress-fd=2 img.qcow2"; do
    # shellcheck disable=SC2086
    same_refusal $args
done
[ ! -e n.qcow2 ] && [ ! -e n.raw ] || fail "a refused command wrote"
# ... and --output where qemu-img has it, with its message for a bad one.
"$VDISK_QEMU_IMG" check --output=json img.qcow2 >v.json
$QEMU_IMG check --output=json img.qcow2 >q.json
json_equal_filtered q.json v.json
same_refusal info --output=xml img.qcow2
