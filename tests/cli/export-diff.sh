#!/usr/bin/env bash
# vdisk export-diff / import-diff: change sets in Ceph's RBD diff stream
# format (v1 and v2). Referees: qemu-img convert -l of each snapshot (the
# state a stream must rebuild), qemu-img snapshot -l and check; and, when
# Ceph is installed, the rbd CLI against a single-node cluster: streams
# rbd export-diff writes (v1; v2 as the diffs inside rbd export
# --export-format 2) imported by vdisk, and vdisk's streams imported by
# rbd import-diff (v1) and rbd import --export-format 2 (v2), compared
# with rbd export. Bad streams: a clear error naming the stream and the
# fault, exit 1, the target byte-identical.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io python3 sha256sum
tmpdir

sum() { sha256sum < "$1" | cut -d' ' -f1; }
# state IMAGE [SNAP]: sha256 of the raw bytes qemu-img reads.
state()
{
    rm -f st.raw
    if [ -n "${2:-}" ]; then
        $QEMU_IMG convert -O raw -l "snapshot.name=$2" "$1" st.raw
    else
        $QEMU_IMG convert -O raw "$1" st.raw
    fi
    sum st.raw
}
has_snap() { $QEMU_IMG snapshot -l "$1" | awk 'NR > 2 { print $2 }' | grep -qx "$2"; }

# random_ops IMAGE SIZE N: N random writes, zero writes and discards.
random_ops()
{
    local img=$1 size=$2 n=$3 args=() i op off len
    for ((i = 0; i < n; i++)); do
        off=$(( (RANDOM * 32768 + RANDOM) % (size / 512) * 512 ))
        len=$(( (RANDOM % 256 + 1) * 512 ))
        [ $((off + len)) -le "$size" ] || len=$((size - off))
        op=$((RANDOM % 4))
        case $op in
        0|1) args+=(-c "write -P $((RANDOM % 255 + 1)) $off $len") ;;
        2) args+=(-c "write -z $off $len") ;;
        3) args+=(-c "discard $off $len") ;;
        esac
    done
    $QEMU_IO "${args[@]}" "$img" > /dev/null
}

# ---- (1) + (2): between qcow2 snapshots, v1 and v2 ----
size=$((16 << 20))
$QEMU_IMG create -q -f qcow2 -o cluster_size=$((1 << (12 + RANDOM % 5))) img.qcow2 $size
random_ops img.qcow2 $size 40
$QEMU_IMG snapshot -c A img.qcow2
random_ops img.qcow2 $size 40
$QEMU_IMG snapshot -c B img.qcow2
random_ops img.qcow2 $size 20
sum_a=$(state img.qcow2 A)
sum_b=$(state img.qcow2 B)
sum_cur=$(state img.qcow2)
img_sum=$(sum img.qcow2)

for v in 1 2; do
    rm -f ab.$v cur.$v full.$v
    $VDISK export-diff --export-format $v --from-snap A --snapshot B img.qcow2 ab.$v
    head -c 12 ab.$v | grep -q "rbd diff v$v" || fail "v$v: no v$v banner"
    rm -f t.qcow2
    $QEMU_IMG convert -O qcow2 -l snapshot.name=A img.qcow2 t.qcow2
    $QEMU_IMG snapshot -c A t.qcow2
    $VDISK import-diff ab.$v t.qcow2
    [ "$(state t.qcow2)" = "$sum_b" ] || fail "v$v: A + diff(A..B) is not B"
    has_snap t.qcow2 B || fail "v$v: import-diff did not create snapshot B"
    $QEMU_IMG check -q t.qcow2 || fail "v$v: the target is damaged"
    # B to the active layer, on top (from stdin this time: spooled)
    $VDISK export-diff --export-format $v --from-snap B img.qcow2 cur.$v
    $VDISK import-diff - t.qcow2 < cur.$v
    [ "$(state t.qcow2)" = "$sum_cur" ] || fail "v$v: B + diff(B..) is not the current state"
    [ "$(state t.qcow2 B)" = "$sum_b" ] || fail "v$v: snapshot B changed"
    # everything up to A (-l), onto an empty image: creates A
    $VDISK export-diff --export-format $v -l A img.qcow2 - > full.$v
    rm -f e.qcow2
    $QEMU_IMG create -q -f qcow2 e.qcow2 1M
    $VDISK import-diff full.$v e.qcow2
    [ "$(state e.qcow2)" = "$sum_a" ] || fail "v$v: a full stream of A does not give A"
    has_snap e.qcow2 A || fail "v$v: no snapshot A after the full import"
done
# the stream is smaller than the image: only what changed
[ "$(size_of ab.1)" -lt $((size / 2)) ] || echo "note: diff A..B is $(size_of ab.1) bytes"
[ "$(sum img.qcow2)" = "$img_sum" ] || fail "export-diff changed its source image"

# ---- (3) between two vdisk images: raw to qcow2 ----
head -c $((4 << 20)) /dev/urandom > src.raw
truncate -s 12M src.raw
dd if=/dev/urandom of=src.raw bs=64k seek=150 count=3 conv=notrunc status=none
$VDISK export-diff -f raw src.raw raw.1
$QEMU_IMG create -q -f qcow2 r.qcow2 64M
$VDISK import-diff raw.1 r.qcow2
$QEMU_IMG convert -O raw r.qcow2 r.raw
cmp src.raw r.raw || fail "raw -> qcow2: other bytes"
[ "$(size_of raw.1)" -lt $((6 << 20)) ] || fail "the full raw stream holds the holes ($(size_of raw.1) bytes)"
# and back onto a raw file
truncate -s 1M back.raw
$VDISK export-diff r.qcow2 - | $VDISK import-diff -f raw - back.raw
cmp src.raw back.raw || fail "qcow2 -> raw: other bytes"

# ---- (5) bad input: clear errors, exit 1, the target byte-identical ----
rm -f t.qcow2
$QEMU_IMG convert -O qcow2 -l snapshot.name=A img.qcow2 t.qcow2
$QEMU_IMG snapshot -c A t.qcow2
t_sum=$(sum t.qcow2)
# bad STREAM PATTERN: import-diff refuses STREAM onto t.qcow2 with PATTERN
bad()
{
    expect_status 1 $VDISK import-diff "$1" t.qcow2 2> err
    grep -q -- "$2" err || fail "$1: expected '$2', got: $(cat err)"
    grep -q "$1\|(stdin)" err || fail "$1: the error does not name the stream: $(cat err)"
    [ "$(sum t.qcow2)" = "$t_sum" ] || fail "$1: the target changed"
}
python3 - ab.1 ab.2 <<'EOF'
import struct, sys
v1 = open(sys.argv[1], 'rb').read(); v2 = open(sys.argv[2], 'rb').read()
def w(name, b): open(name, 'wb').write(b)
w('trunc-end', v1[:-1])                     # no end record
w('trunc-data', v1[:len(v1) // 2])          # cut inside the records
w('trunc-banner', v1[:5])
w('banner', b'rbd diff v3\n' + v1[12:])
# records after the metadata of v1: f(4+1) t(4+1) s(8)
meta = 12 + 1 + 4 + 1 + 1 + 4 + 1 + 1 + 8
assert v1[meta] in b'wz', v1[meta]
w('tag', v1[:meta] + b'Q' + v1[meta:])
w('past-end', v1[:meta] + b'z' + struct.pack('<QQ', 15 << 20, 2 << 20) + v1[meta:])
w('overflow', v1[:meta] + b'z' + struct.pack('<QQ', 2**64 - 512, 1024) + v1[meta:])
w('meta-after-data', v1[:meta] + b'z' + struct.pack('<QQ', 0, 512) + b's' + struct.pack('<Q', 1 << 20) + v1[meta:])
w('longname', v1[:12] + b'f' + struct.pack('<I', 5000) + b'A' * 5000 + v1[12 + 6:])
w('nosnap', v1[:12] + b'f' + struct.pack('<I', 1) + b'Z' + v1[12 + 6:])
w('exists', v1[:12 + 6] + b't' + struct.pack('<I', 1) + b'A' + v1[12 + 12:])
# v2: a length that disagrees with the record
i = 12 + 9 + 5 + 9 + 5 + 9 + 1 + 9 + 8
assert v2[i] in b'wz', v2[i]
ln = struct.unpack('<Q', v2[i + 1:i + 9])[0]
w('v2-len', v2[:i + 1] + struct.pack('<Q', ln + 1) + v2[i + 9:])
w('v2-size-len', v2[:12 + 9 + 5 + 9 + 5 + 9 + 1] + b's' + struct.pack('<QQ', 4, 1 << 20) + v2[i:])
EOF
bad trunc-end "truncated stream"
bad trunc-data "truncated stream"
bad trunc-banner "truncated stream"
bad banner "not an RBD diff stream"
bad tag "unknown record tag 0x51"
bad past-end "past the image size"
bad overflow "past the image size"
bad meta-after-data "follows data records"
bad longname "longer than 4096"
bad nosnap "start snapshot 'Z'"
bad exists "end snapshot 'A'"
bad v2-len "v2 length"
bad v2-size-len "v2 length"
expect_status 1 $VDISK import-diff - t.qcow2 < trunc-data 2> err
grep -q "(stdin): truncated stream" err || fail "stdin: $(cat err)"
[ "$(sum t.qcow2)" = "$t_sum" ] || fail "stdin: the target changed"
# a stream ending at a snapshot, onto an image that cannot take one
truncate -s 16M t.raw
raw_sum=$(sum t.raw)
expect_status 1 $VDISK import-diff -f raw full.1 t.raw 2> err
grep -q "cannot take snapshots" err || fail "raw + snapshot: $(cat err)"
[ "$(sum t.raw)" = "$raw_sum" ] || fail "raw + snapshot: the target changed"
# export-diff: unknown snapshots, an existing output file (rbd: O_EXCL)
expect_status 1 $VDISK export-diff --from-snap nosuch img.qcow2 x.1 2> err
grep -q "snapshot 'nosuch' not found" err || fail "unknown from-snap: $(cat err)"
[ ! -e x.1 ] || fail "a failed export-diff left its output file"
expect_status 1 $VDISK export-diff --snapshot nosuch img.qcow2 x.1 2> err
grep -q "snapshot 'nosuch' not found" err || fail "unknown snapshot: $(cat err)"
expect_status 1 $VDISK export-diff img.qcow2 ab.1 2> err
grep -q "ab.1: File exists" err || fail "existing output: $(cat err)"
expect_status 1 $VDISK export-diff --export-format 3 img.qcow2 x.1 2> err
[ "$(sum img.qcow2)" = "$img_sum" ] || fail "the bad exports changed the image"

# ---- (4) against the rbd CLI (single-node Ceph cluster) ----
if ! command -v ceph-mon > /dev/null || ! command -v rbd > /dev/null ||
   ! command -v ceph-osd > /dev/null; then
    echo "note: Ceph is not installed: the rbd CLI part is skipped"
    exit 0
fi
source "$(dirname "$0")/../ceph-cluster.sh"
mkdir ceph
cleanup_fn ceph_cluster_stop "$PWD/ceph"
rc=0
ceph_cluster_start "$PWD/ceph" || rc=$?
if [ $rc = 77 ]; then
    echo "note: the Ceph cluster cannot run here: the rbd CLI part is skipped"
    exit 0
fi
[ $rc = 0 ] || fail "the Ceph cluster did not come up (see above)"
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
[ "$(state q.qcow2 s1)" = "$(rsum rbd/x@s1 10M)" ] || fail "rbd v1 stream s1: other bytes"
[ "$(state q.qcow2 s2)" = "$(rsum rbd/x@s2 10M)" ] || fail "rbd v1 stream s1..s2: other bytes"
[ "$(state q.qcow2)" = "$(rsum rbd/x)" ] || fail "rbd v1 stream s2..head: other bytes"
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
[ "$(state q2.qcow2 s1)" = "$(rsum rbd/x@s1 10M)" ] || fail "rbd v2 stream s1: other bytes"
[ "$(state q2.qcow2 s2)" = "$(rsum rbd/x@s2 10M)" ] || fail "rbd v2 stream s2: other bytes"
[ "$(state q2.qcow2)" = "$(rsum rbd/x)" ] || fail "rbd v2 stream head: other bytes"

# vdisk's streams into rbd: v1 through rbd import-diff
rm -f a.1 b.1 c.1
$VDISK export-diff -l A img.qcow2 a.1
$VDISK export-diff --from-snap A -l B img.qcow2 b.1
$VDISK export-diff --from-snap B img.qcow2 c.1
rbd create -s 1M rbd/y
for f in a.1 b.1 c.1; do
    rbd import-diff --no-progress $f rbd/y || fail "rbd import-diff refused vdisk's $f"
done
[ "$(rsum rbd/y@A)" = "$sum_a" ] || fail "rbd import-diff of vdisk's v1 stream: A differs"
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
