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

# expect PYTHON-EXPR MESSAGE: queues an assertion over the JSON files of
# this directory, checked together at the end (one Python start instead
# of thirty on a loaded machine). In EXPR, J("f.json") is the parsed file
# (a file that is not JSON fails the test) and T("f.txt") a text file.
: >checks.txt
expect()
{
    printf '%s\t%s\n' "$1" "$2" >>checks.txt
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
            "measure -O qcow2 img.qcow2"; do
    # shellcheck disable=SC2086
    $QEMU_IMG ${args%% *} --output=json ${args#* } >"q-${args%% *}.json"
    # shellcheck disable=SC2086
    "$VDISK" ${args%% *} --output=json ${args#* } >"v-${args%% *}.json"
    expect "J('q-${args%% *}.json') == J('v-${args%% *}.json')" \
        "${args%% *}: not qemu-img's document"
done

# ---- create: the Formatting line's options, typed ----
$QEMU_IMG create -f qcow2 -o cluster_size=4k,lazy_refcounts=on q.qcow2 3M \
    >create-q.txt
"$VDISK" create -f qcow2 -o cluster_size=4k,lazy_refcounts=on \
    --output=json c.qcow2 3M >create.json
$QEMU_IMG info --output=json c.qcow2 >create-info.json
expect "(J('create.json')['filename'], J('create.json')['format']) == ('c.qcow2', 'qcow2')" \
    "create: filename, format"
expect "formatting(T('create-q.txt')) == {k: text(v) for k, v in J('create.json')['options'].items()}" \
    "create: options differ from qemu-img's Formatting line"
expect "J('create-info.json')['virtual-size'] == J('create.json')['options']['size']" \
    "create: size"
expect_status 1 "$VDISK" create -f qcow2 --output=xml bad.qcow2 1M
[ ! -e bad.qcow2 ] || fail "create --output=xml created the image"

# ---- snapshot: -l is qemu-img info's "snapshots" ----
"$VDISK" snapshot -l --output=json img.qcow2 >snap-empty.json
expect "J('snap-empty.json') == []" "snapshot -l: empty list"
"$VDISK" snapshot --output=json -c s1 img.qcow2 >snap-c.json
expect "J('snap-c.json') == {'image': 'img.qcow2', 'action': 'create', 'snapshot': 's1'}" \
    "snapshot -c"
$QEMU_IO -c 'write -P 3 1M 64k' img.qcow2 >/dev/null
$QEMU_IMG snapshot -c s2 img.qcow2
"$VDISK" snapshot -l --output=json img.qcow2 >snap-l.json
$QEMU_IMG info --output=json img.qcow2 >snap-info.json
$QEMU_IMG snapshot -l img.qcow2 >snap-l.txt
expect "J('snap-l.json') == J('snap-info.json')['snapshots']" \
    "snapshot -l is not qemu-img info's list"
expect "len(J('snap-l.json')) == len(T('snap-l.txt').splitlines()) - 2" \
    "snapshot -l: not one object per row"

# ---- compare: the verdict qemu-img prints, and its status ----
cp img.qcow2 same.qcow2
"$VDISK" compare --output=json img.qcow2 same.qcow2 >cmp-same.json
expect "(J('cmp-same.json')['identical'], J('cmp-same.json')['result'], J('cmp-same.json')['offset']) == (True, 'identical', None)" \
    "compare: identical"
$QEMU_IO -c 'write -P 7 4195328 512' same.qcow2 >/dev/null
st=0; $QEMU_IMG compare img.qcow2 same.qcow2 >cmp-diff.txt || st=$?
expect_status "$st" "$VDISK" compare --output=json img.qcow2 same.qcow2 \
    >cmp-diff.json
expect "T('cmp-diff.txt') == 'Content mismatch at offset %d!\n' % J('cmp-diff.json')['offset']" \
    "compare: offset differs from qemu-img's"
expect "(J('cmp-diff.json')['result'], J('cmp-diff.json')['identical']) == ('content-mismatch', False)" \
    "compare: mismatch"
$QEMU_IMG convert -O qcow2 img.qcow2 img9.qcow2
$QEMU_IMG resize -q img9.qcow2 9M
st=0; $QEMU_IMG compare img.qcow2 img9.qcow2 >cmp-size.txt || st=$?
expect_status "$st" "$VDISK" compare --output=json img.qcow2 img9.qcow2 \
    >cmp-size.json
expect "T('cmp-size.txt').startswith('Warning: Image size mismatch!\n') and J('cmp-size.json')['size-mismatch'] and J('cmp-size.json')['identical'] == (T('cmp-size.txt').endswith('Images are identical.\n'))" \
    "compare: size mismatch warning"
expect "(J('cmp-size.json')['size1'], J('cmp-size.json')['size2']) == (8 << 20, 9 << 20)" \
    "compare: sizes"
st=0; $QEMU_IMG compare -s img.qcow2 img9.qcow2 >/dev/null || st=$?
expect_status "$st" "$VDISK" compare -s --output=json img.qcow2 img9.qcow2 \
    >cmp-strict.json
expect "J('cmp-strict.json')['result'] == 'size-mismatch'" "compare -s"

# ---- resize: the sizes qemu-img info reports before and after ----
$QEMU_IMG info --output=json img9.qcow2 >resize-before.json
"$VDISK" resize --output=json img9.qcow2 +1M >resize.json
$QEMU_IMG info --output=json img9.qcow2 >resize-after.json
expect "(J('resize.json')['old-size'], J('resize.json')['new-size']) == (J('resize-before.json')['virtual-size'], J('resize-after.json')['virtual-size'])" \
    "resize: sizes"

# ---- commit, rebase: what qemu-img info says of the chain ----
$QEMU_IMG create -q -f qcow2 base.qcow2 4M
$QEMU_IO -c 'write -P 5 0 256k' base.qcow2 >/dev/null
$QEMU_IMG create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
$QEMU_IO -c 'write -P 6 1M 128k' top.qcow2 >/dev/null
$QEMU_IMG convert -O raw top.qcow2 want.raw
$QEMU_IMG info --output=json top.qcow2 >commit-info.json
"$VDISK" commit --output=json top.qcow2 >commit.json
expect "J('commit.json') == {'image': 'top.qcow2', 'base': J('commit-info.json')['full-backing-filename'], 'top-emptied': True, 'rate-limit': 0}" \
    "commit"
assert_same_content -f raw -F qcow2 want.raw base.qcow2
$QEMU_IMG create -q -f qcow2 other.qcow2 4M
"$VDISK" rebase --output=json -u -b other.qcow2 -F qcow2 top.qcow2 >rebase.json
$QEMU_IMG info --output=json top.qcow2 >rebase-info.json
expect "(J('rebase.json')['backing-file'], J('rebase.json')['backing-fmt'], J('rebase.json')['unsafe']) == (J('rebase-info.json')['backing-filename'], J('rebase-info.json')['backing-filename-format'], True)" \
    "rebase"

# ---- amend: the options applied, as qemu-img info then shows them ----
$QEMU_IMG create -q -f qcow2 big.qcow2 9M
"$VDISK" amend --output=json -o compat=0.10 big.qcow2 >amend.json
$QEMU_IMG info --output=json big.qcow2 >amend-info.json
expect "(J('amend.json')['options']['compat'], J('amend.json')['format']) == (J('amend-info.json')['format-specific']['data']['compat'], 'qcow2')" \
    "amend"

# ---- bitmap: the actions, and qemu-img info has the bitmap ----
"$VDISK" bitmap --output=json --add -g 128k --disable img.qcow2 b0 >bitmap.json
$QEMU_IMG info --output=json img.qcow2 >bitmap-info.json
expect "([a['action'] for a in J('bitmap.json')['actions']], J('bitmap.json')['bitmap']) == (['add', 'disable'], 'b0')" \
    "bitmap: actions"
expect "[(b['name'], b['granularity']) for b in J('bitmap-info.json')['format-specific']['data']['bitmaps']] == [('b0', J('bitmap.json')['actions'][0]['granularity'])]" \
    "bitmap: qemu-img info disagrees"

# ---- convert: the summary against qemu-img info and map ----
"$VDISK" convert --output=json -O qcow2 img.qcow2 cv.qcow2 >convert.json
$QEMU_IMG info --output=json cv.qcow2 >convert-info.json
$QEMU_IMG map --output=json img.qcow2 >convert-map.json
expect "(J('convert.json')['sources'], J('convert.json')['target'], J('convert.json')['target-format'], J('convert.json')['virtual-size']) == (['img.qcow2'], 'cv.qcow2', J('convert-info.json')['format'], J('convert-info.json')['virtual-size'])" \
    "convert: summary"
expect "J('convert.json')['data-bytes'] == sum(e['length'] for e in J('convert-map.json') if e['data'])" \
    "convert: data-bytes"
assert_same_content img.qcow2 cv.qcow2

# ---- dd: the bytes written are the output's size ----
$QEMU_IMG dd -O raw bs=64k count=10 skip=2 if=img.qcow2 of=qdd.raw
"$VDISK" dd --output=json -O raw bs=64k count=10 skip=2 if=img.qcow2 \
    of=vdd.raw >dd.json
cmp qdd.raw vdd.raw || fail "dd output differs from qemu-img's"
expect "(J('dd.json')['bytes'], J('dd.json')['block-size'], J('dd.json')['count'], J('dd.json')['skip']) == ($(size_of qdd.raw), 65536, 10, 2)" \
    "dd"

# ---- bench: the figures of qemu-img bench's sentences ----
$QEMU_IMG bench -c 64 -d 4 -s 8k img.qcow2 >bench.txt
"$VDISK" bench --output=json -c 64 -d 4 -s 8k img.qcow2 >bench.json
expect "T('bench.txt').splitlines()[0] == 'Sending %(count)d %(mode)s requests, %(buffer-size)d bytes each, %(depth)d in parallel (starting at offset %(offset)d, step size %(step)d)' % J('bench.json')" \
    "bench: figures differ from qemu-img's sentence"
expect "J('bench.json')['seconds'] >= 0 and J('bench.json')['iops'] >= 0" \
    "bench: times"

# ---- diff: an array of extents ----
"$VDISK" diff --output=json img.qcow2 s1 s2 >diff.json
expect "J('diff.json') and all(set(e) == {'start', 'length'} for e in J('diff.json'))" \
    "diff"

# ---- every queued assertion ----
python3 - <<'EOF'
import json, sys
cache = {}
def J(name):
    if name not in cache:
        try:
            cache[name] = json.load(open(name))
        except ValueError as e:
            sys.exit("%s is not JSON: %s" % (name, e))
    return cache[name]
def T(name):
    return open(name).read()
def text(v):
    return ("on" if v else "off") if isinstance(v, bool) else str(v)
def formatting(line):
    # "Formatting 'F', fmt=qcow2 k=v k=v ..." -> {k: v}
    opts = line.strip().partition(" fmt=")[2].partition(" ")[2]
    return dict(kv.split("=", 1) for kv in opts.split(" "))
bad = 0
for line in open("checks.txt"):
    expr, msg = line.rstrip("\n").split("\t")
    if not eval(expr):
        print("FAIL: %s\n  %s" % (msg, expr), file=sys.stderr)
        bad += 1
sys.exit(1 if bad else 0)
EOF

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
