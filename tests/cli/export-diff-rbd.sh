#!/usr/bin/env bash
# vdisk export-diff / import-diff against the rbd CLI on a single-node
# Ceph cluster (tests/ceph-cluster.sh; skipped when Ceph is not
# installed): streams rbd export-diff writes (v1) and the v2 diffs inside
# rbd export --export-format 2, imported by vdisk into qcow2, rebuild
# rbd's snapshots and head (rbd export, sha256); vdisk's streams of a
# qcow2 with snapshots, imported by rbd import-diff (v1) and, wrapped in
# an image file, by rbd import --export-format 2 (v2), rebuild the qcow2's
# snapshots and active layer (qemu-img convert -l). The rest of the
# feature is tested in export-diff.sh.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io python3 sha256sum ceph-mon ceph-osd ceph rbd
tmpdir

source "$(dirname "$0")/export-diff.bash"

# A qcow2 with snapshots A and B and changes after B.
size=$((8 << 20))
$QEMU_IMG create -q -f qcow2 img.qcow2 $size
random_ops img.qcow2 $size 20
$QEMU_IMG snapshot -c A img.qcow2
random_ops img.qcow2 $size 20
$QEMU_IMG snapshot -c B img.qcow2
random_ops img.qcow2 $size 10
sum_a=$(state img.qcow2 A)
sum_b=$(state img.qcow2 B)
sum_cur=$(state img.qcow2)

# ---- the cluster ----
source "$(dirname "$0")/../ceph-cluster.sh"
ceph_cluster_for_test
# rsum IMAGE[@SNAP] [SIZE]: sha256 of rbd export, padded with zeros to
# SIZE (qemu-img convert -l reads a snapshot at the image's current size).
rsum()
{
    rm -f r.raw
    rbd export "$1" r.raw > /dev/null 2>&1
    [ -z "${2:-}" ] || truncate -s "$2" r.raw
    sum r.raw
}

# rbd writes; vdisk imports rbd's streams (v1 from export-diff)
rbd create -s 8M rbd/x
python3 -c '
import os, struct, sys
out = b"rbd diff v1\n" + b"s" + struct.pack("<Q", 8 << 20)
for off, n in ((0, 1 << 20), (3 << 20, 4096), (6 << 20, 65536)):
    out += b"w" + struct.pack("<QQ", off, n) + os.urandom(n)
sys.stdout.buffer.write(out + b"e")' > seed.1
rbd import-diff --no-progress seed.1 rbd/x
rbd snap create rbd/x@s1 > /dev/null 2>&1
rbd bench --io-type write --io-size 4K --io-pattern rand --io-total 256K rbd/x > /dev/null 2>&1
rbd snap create rbd/x@s2 > /dev/null 2>&1
rbd resize -s 10M rbd/x > /dev/null 2>&1
rbd bench --io-type write --io-size 64K --io-pattern rand --io-total 512K rbd/x > /dev/null 2>&1
rbd export-diff --no-progress rbd/x@s1 r-s1.1
rbd export-diff --no-progress --from-snap s1 rbd/x@s2 r-s2.1
rbd export-diff --no-progress --from-snap s2 rbd/x r-head.1
$QEMU_IMG create -q -f qcow2 q.qcow2 1M
$VDISK import-diff r-s1.1 q.qcow2
$VDISK import-diff r-s2.1 q.qcow2
$VDISK import-diff r-head.1 q.qcow2
x_s1=$(rsum rbd/x@s1 10M)
x_s2=$(rsum rbd/x@s2 10M)
x_head=$(rsum rbd/x)
[ "$(state q.qcow2 s1)" = "$x_s1" ] || fail "rbd v1 stream s1: other bytes"
[ "$(state q.qcow2 s2)" = "$x_s2" ] || fail "rbd v1 stream s1..s2: other bytes"
[ "$(state q.qcow2)" = "$x_head" ] || fail "rbd v1 stream s2..head: other bytes"
# v2: the diffs inside rbd export --export-format 2, split out
rbd export --no-progress --export-format 2 rbd/x x.exp2 > /dev/null
python3 - x.exp2 <<'EOF' || fail "cannot split rbd's export v2"
import struct, sys
b = open(sys.argv[1], 'rb').read()
assert b.startswith(b'rbd image v2\n')
p = 13
while b[p] != ord('E'):
    p += 9 + struct.unpack('<Q', b[p + 1:p + 9])[0]
p += 1
assert b[p:p + 19] == b'rbd image diffs v2\n'
n = struct.unpack('<Q', b[p + 19:p + 27])[0]
p += 27
for i in range(n):
    s = p
    assert b[p:p + 12] == b'rbd diff v2\n'
    p += 12
    while b[p] != ord('e'):
        # 'p' holds one byte whatever its length says (pacific says 8)
        ln = 1 if b[p] == ord('p') else struct.unpack('<Q', b[p + 1:p + 9])[0]
        p += 9 + ln
    p += 1
    open('r2-%d.2' % i, 'wb').write(b[s:p])
EOF
$QEMU_IMG create -q -f qcow2 q2.qcow2 1M
for f in r2-0.2 r2-1.2 r2-2.2; do
    $VDISK import-diff $f q2.qcow2 || fail "rbd's v2 diff $f refused"
done
[ "$(state q2.qcow2 s1)" = "$x_s1" ] || fail "rbd v2 stream s1: other bytes"
[ "$(state q2.qcow2 s2)" = "$x_s2" ] || fail "rbd v2 stream s2: other bytes"
[ "$(state q2.qcow2)" = "$x_head" ] || fail "rbd v2 stream head: other bytes"

# vdisk's streams into rbd: v1 through rbd import-diff
rm -f a.1 b.1 c.1
$VDISK export-diff -l A img.qcow2 a.1
$VDISK export-diff --from-snap A -l B img.qcow2 b.1
$VDISK export-diff --from-snap B img.qcow2 c.1
rbd create -s 1M rbd/y
for f in a.1 b.1 c.1; do
    rbd import-diff --no-progress $f rbd/y || fail "rbd import-diff refused vdisk's $f"
done
# (A is checked through the v2 import below; B and the head need it.)
[ "$(rsum rbd/y@B)" = "$sum_b" ] || fail "rbd import-diff of vdisk's v1 stream: B differs"
[ "$(rsum rbd/y)" = "$sum_cur" ] || fail "rbd import-diff of vdisk's v1 stream: head differs"
# v2: vdisk's streams wrapped as rbd export --export-format 2 writes them
rm -f a.2 b.2 c.2
$VDISK export-diff --export-format 2 -l A img.qcow2 a.2
$VDISK export-diff --export-format 2 --from-snap A -l B img.qcow2 b.2
$VDISK export-diff --export-format 2 --from-snap B img.qcow2 c.2
python3 - a.2 b.2 c.2 <<'EOF' > y.exp2
import struct, sys
out = b'rbd image v2\n' + b'O' + struct.pack('<QQ', 8, 22) + b'E'
out += b'rbd image diffs v2\n' + struct.pack('<Q', len(sys.argv) - 1)
for f in sys.argv[1:]:
    out += open(f, 'rb').read()
sys.stdout.buffer.write(out)
EOF
rbd import --no-progress --export-format 2 y.exp2 rbd/z || fail "rbd import refused vdisk's v2 streams"
[ "$(rsum rbd/z@A)" = "$sum_a" ] || fail "rbd import of vdisk's v2 streams: A differs"
[ "$(rsum rbd/z@B)" = "$sum_b" ] || fail "rbd import of vdisk's v2 streams: B differs"
[ "$(rsum rbd/z)" = "$sum_cur" ] || fail "rbd import of vdisk's v2 streams: head differs"
exit 0
