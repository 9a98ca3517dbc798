#!/usr/bin/env bash
# Block status of the rbd driver, which walks the object map over up to
# 1 GiB at once and answers the questions that follow from the extents
# it kept (QEMU iterates once per question): map, convert and compare of
# an image with more extents than are kept give what qemu-img gives.
# Against a real single-node Ceph cluster. (tests/python/
# test_rbd_status.py: the answers after our own writes and another
# client's.)
source "$(dirname "$0")/../functions.sh"
requires qemu-img ceph-mon ceph-mgr ceph-osd ceph rbd timeout python3
"$VDISK" --help | grep -qw rbd || { echo "vdisk built without librbd"; exit 77; }
source "$(dirname "$0")/../ceph-cluster.sh"
tmpdir
ceph_cluster_for_test
T="timeout 120"

# 64 KiB objects, every other one written: 1200 data extents and as many
# holes, more than the 1024 extents an answer is kept for; then 1 MiB of
# data and a hole to the end.
python3 - <<'EOF'
with open("frag.raw", "wb") as f:
    f.truncate(192 << 20)
    for i in range(1200):
        f.seek(2 * i * 65536)
        f.write(bytes([i % 251 + 1]) * 65536)
    f.seek(180 << 20)
    f.write(b"\x5a" * (1 << 20))
EOF
for img in frag; do
    rbd import --object-size 64K frag.raw "rbd/$img" > /dev/null 2>&1 ||
        fail "rbd import $img"
done
python3 -c 'import json,sys; f=json.load(sys.stdin)["features"]; assert "fast-diff" in f, f' \
    < <(rbd info rbd/frag --format json) || fail "no fast-diff: nothing to test"

$T "$VDISK" map -f raw --output=json rbd:rbd/frag > v.map || fail "vdisk map"
$T "$QEMU_IMG" map -f raw --output=json rbd:rbd/frag > q.map
diff -u q.map v.map > map.diff || fail "map differs: $(head -20 map.diff)"
[ "$(grep -c '"data": true' v.map)" -ge 1200 ] ||
    fail "the fragments are not seen: $(grep -c '"data": true' v.map)"
# (The file column aside: QEMU names the node with a json: filename.)
$T "$VDISK" map -f raw rbd:rbd/frag | awk '{ print $1, $2, $3 }' > v.hmap
$T "$QEMU_IMG" map -f raw rbd:rbd/frag | awk '{ print $1, $2, $3 }' > q.hmap
diff -u q.hmap v.hmap > hmap.diff || fail "human map differs: $(head -20 hmap.diff)"

# convert walks the same extents: the copy is the source, and its holes
# are where qemu-img's copy has them.
$T "$VDISK" convert -f raw -O qcow2 rbd:rbd/frag v.qcow2 || fail "convert"
$T "$QEMU_IMG" compare -q frag.raw v.qcow2 || fail "convert's copy differs"
$T "$QEMU_IMG" convert -f raw -O qcow2 rbd:rbd/frag q.qcow2
$T "$QEMU_IMG" map --output=json v.qcow2 | sed 's/"offset": [0-9]*}/}/' > vq.map
$T "$QEMU_IMG" map --output=json q.qcow2 | sed 's/"offset": [0-9]*}/}/' > qq.map
diff -u qq.map vq.map > qmap.diff ||
    fail "the copy's allocation differs from qemu-img's copy: $(head -20 qmap.diff)"
$T "$VDISK" compare -f raw -F raw rbd:rbd/frag frag.raw > cmp.out ||
    fail "compare: $(cat cmp.out)"

exit 0
