#!/usr/bin/env bash
# vdisk diff: the extents that changed between two internal snapshots (or
# a snapshot and the current state), between a chain's top and a base,
# and the extents a dirty bitmap holds. The referees: qemu-img convert -l
# of each snapshot and of each layer, compared byte by byte here (what
# --exact must print, to the sector), and qemu-nbd's export of the bitmap
# read with nbdinfo --map. Without --exact the answer comes from metadata
# alone: a superset of the exact one, within the clusters written since,
# and a range rewritten with the same bytes is still reported.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo python3
tmpdir

# exact_diff A.raw B.raw: the differing 512-byte sectors, merged, as the
# JSON vdisk prints (B may be shorter: it reads as zeros past its end).
exact_diff()
{
    python3 - "$1" "$2" <<'EOF'
import sys
a = open(sys.argv[1], "rb").read()
b = open(sys.argv[2], "rb").read()
n = max(len(a), len(b))
a = a.ljust(n, b"\0"); b = b.ljust(n, b"\0")
out = []
for off in range(0, n, 512):
    if a[off:off + 512] != b[off:off + 512]:
        ln = min(512, n - off)
        if out and out[-1][0] + out[-1][1] == off:
            out[-1][1] += ln
        else:
            out.append([off, ln])
print("[" + ",\n".join('{ "start": %d, "length": %d }' % (s, l)
                       for s, l in out) + "]")
EOF
}

# covers OUTER INNER: every extent of INNER lies in OUTER (JSON files).
covers()
{
    python3 - "$1" "$2" <<'EOF'
import json, sys
outer = json.load(open(sys.argv[1])); inner = json.load(open(sys.argv[2]))
for e in inner:
    s, end = e["start"], e["start"] + e["length"]
    if not any(o["start"] <= s and end <= o["start"] + o["length"]
               for o in outer):
        sys.exit("extent %r not covered" % e)
EOF
}

# ---- snapshots ----
$QEMU_IMG create -q -f qcow2 img.qcow2 8M
$QEMU_IO -c 'write -P 1 0 1M' -c 'write -P 2 4M 64k' img.qcow2 >/dev/null
$QEMU_IMG snapshot -c A img.qcow2
# 512k: the same bytes again (a new cluster, same data).
$QEMU_IO -c 'write -P 3 64k 4k' -c 'write -P 1 512k 64k' \
    -c 'write -z 4M 64k' -c 'write -P 9 7M 512' img.qcow2 >/dev/null
$QEMU_IMG snapshot -c B img.qcow2
$QEMU_IO -c 'discard 0 64k' -c 'write -P 4 2M 128k' img.qcow2 >/dev/null
cp img.qcow2 img.orig

for snap in A B; do
    $QEMU_IMG convert -O raw -l "snapshot.name=$snap" img.qcow2 "$snap.raw"
done
$QEMU_IMG convert -O raw img.qcow2 cur.raw

for pair in "A B" "A cur" "B cur"; do
    set -- $pair
    if [ "$2" = cur ]; then args=("$1"); else args=("$1" "$2"); fi
    exact_diff "$1.raw" "$2.raw" > want
    $VDISK diff --exact --output=json img.qcow2 "${args[@]}" > got
    diff -u want got || fail "diff --exact $pair differs from the bytes"
    $VDISK diff --output=json img.qcow2 "${args[@]}" > meta
    covers meta got || fail "diff $pair (metadata) misses a change"
done
# The metadata answer for A..B: the clusters written since A, and the
# rewrite with the same bytes at 512k among them.
$VDISK diff --output=json img.qcow2 A B > meta
cat > clusters <<'EOF'
[{ "start": 65536, "length": 65536 }, { "start": 524288, "length": 65536 },
 { "start": 4194304, "length": 65536 }, { "start": 7340032, "length": 65536 }]
EOF
covers clusters meta || fail "metadata diff reports unwritten clusters"
grep -q '"start": 524288' meta || fail "rewrite with equal bytes not seen"
grep -q '"start": 524288' <($VDISK diff --exact --output=json img.qcow2 A B) &&
    fail "--exact reports a range whose bytes are equal"
# The human form: qemu-img map's table shape.
$VDISK diff img.qcow2 A B > human
head -n 1 human | grep -q '^Offset  *Length$' || fail "human header"
grep -q '^0x80000  *0x10000$' human || fail "human line: $(cat human)"
# Snapshot ids work as names do; nothing is written.
$VDISK diff --output=json img.qcow2 1 2 > byid
diff -u meta byid || fail "snapshot ids and names differ"
cmp img.qcow2 img.orig || fail "diff changed the image"

# ---- a chain: top over mid over base (top longer than base) ----
$QEMU_IMG create -q -f qcow2 base.qcow2 4M
$QEMU_IO -c 'write -P 1 0 2M' base.qcow2 >/dev/null
$QEMU_IMG create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2
$QEMU_IO -c 'write -P 1 0 64k' -c 'write -P 2 1M 4k' mid.qcow2 >/dev/null
$QEMU_IMG create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 6M
$QEMU_IO -c 'write -P 5 3M 64k' -c 'write -P 6 5M 4k' top.qcow2 >/dev/null
$QEMU_IMG convert -O raw top.qcow2 top.raw
$QEMU_IMG convert -O raw base.qcow2 base.raw
exact_diff top.raw base.raw > want
$VDISK diff --exact --output=json top.qcow2 base.qcow2 > got
diff -u want got || fail "chain diff --exact differs from the bytes"
$VDISK diff --output=json top.qcow2 base.qcow2 > meta
covers meta got || fail "chain diff (metadata) misses a change"
# base's own clusters, seen through the chain, are not reported: only
# the layers above it (mid's two clusters, top's two).
test "$(grep -c start meta)" -le 4 || fail "chain diff: $(cat meta)"
$VDISK diff --output=json top.qcow2 top.qcow2 > self
test "$(cat self)" = "[]" || fail "an image differs from itself: $(cat self)"

# ---- a dirty bitmap, against qemu-nbd's export of it ----
$QEMU_IMG bitmap --add img.qcow2 b0
$QEMU_IO -c 'write -P 7 128k 8k' -c 'write 6M 1M' -c 'write 8188k 4k' \
    img.qcow2 >/dev/null
$VDISK diff --output=json --bitmap b0 img.qcow2 > got
sock=$PWD/nbd.sock
qemu-nbd -r -f qcow2 -B b0 -k "$sock" -t img.qcow2 &
nbd_pid=$!
cleanup_fn kill "$nbd_pid"
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
nbdinfo --json --map=qemu:dirty-bitmap:b0 "nbd+unix:///?socket=$sock" > map
kill "$nbd_pid"
python3 - map got <<'EOF'
import json, sys
want = [(e["offset"], e["length"]) for e in json.load(open(sys.argv[1]))
        if e["type"] & 1]
got = [(e["start"], e["length"]) for e in json.load(open(sys.argv[2]))]
if want != got:
    sys.exit("bitmap extents: qemu-nbd %r, vdisk %r" % (want, got))
EOF

# ---- errors: exit 1, a clear message ----
expect_status 1 $VDISK diff img.qcow2 nosuch 2> err
grep -q "'nosuch' is neither a snapshot of 'img.qcow2' nor an image" err ||
    fail "message: $(cat err)"
expect_status 1 $VDISK diff --bitmap nope img.qcow2 2> err
grep -q "Dirty bitmap 'nope' not found" err || fail "message: $(cat err)"
expect_status 1 $VDISK diff img.qcow2 A nosuch 2> err
grep -q "Failed to load snapshot 'nosuch'" err || fail "message: $(cat err)"
expect_status 1 $VDISK diff --exact --bitmap b0 img.qcow2 2> err
expect_status 1 $VDISK diff img.qcow2 2> err
