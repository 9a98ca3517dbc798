#!/usr/bin/env bash
# vdisk export-diff / import-diff: change sets in Ceph's RBD diff stream
# format (v1 and v2). On randomized qcow2 images with snapshots A and B,
# A plus the stream A..B is B and has snapshot B, B plus B..(active) is
# the active layer, a full stream up to A rebuilds A; raw to qcow2 and
# back, through files and pipes. Referees: qemu-img convert -l of each
# state (sha256), qemu-img snapshot -l and check. Bad streams (fourteen
# faults, on stdin too) and bad exports: a clear error naming the stream
# and the fault, exit 1, the image byte-identical. The rbd CLI's side is
# export-diff-rbd.sh.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io python3 sha256sum
tmpdir

source "$(dirname "$0")/export-diff.bash"

# ---- (1) + (2): between qcow2 snapshots, v1 and v2 ----
size=$((8 << 20))
$QEMU_IMG create -q -f qcow2 -o cluster_size=$((1 << (12 + RANDOM % 5))) img.qcow2 $size
random_ops img.qcow2 $size 30
$QEMU_IMG snapshot -c A img.qcow2
random_ops img.qcow2 $size 30
$QEMU_IMG snapshot -c B img.qcow2
random_ops img.qcow2 $size 15
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
w('past-end', v1[:meta] + b'z' + struct.pack('<QQ', 7 << 20, 2 << 20) + v1[meta:])
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
w('nosize-past', b'rbd diff v1\n' + b'z' + struct.pack('<QQ', 8 << 20, 512) + b'e')
# an unknown v2 record is skipped by its length, as rbd does
w('v2-unknown', v2[:12] + b'X' + struct.pack('<Q', 5) + b'hello' + v2[12:])
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
bad nosize-past "past the image size 8388608"
bad v2-size-len "v2 length"
expect_status 1 $VDISK import-diff - t.qcow2 < trunc-data 2> err
grep -q "(stdin): truncated stream" err || fail "stdin: $(cat err)"
[ "$(sum t.qcow2)" = "$t_sum" ] || fail "stdin: the target changed"
cp t.qcow2 u.qcow2
$VDISK import-diff v2-unknown u.qcow2 || fail "an unknown v2 record was not skipped"
[ "$(state u.qcow2)" = "$sum_b" ] || fail "v2 with an unknown record: not B"
# a stream ending at a snapshot, onto an image that cannot take one
truncate -s 8M t.raw
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
# qemu-img's -l forms name the same snapshots (ids from qemu-img's list);
# a mismatched pair is no snapshot, an unknown key qemu-img's error.
id_a=$($QEMU_IMG snapshot -l img.qcow2 | awk '$2 == "A" { print $1 }')
$VDISK export-diff --from-snap "snapshot.id=$id_a" -l snapshot.name=B \
    img.qcow2 forms.1 || fail "the snapshot.id=/snapshot.name= forms"
cmp forms.1 ab.1 || fail "the -l forms export another diff than the names"
expect_status 1 $VDISK export-diff -l "snapshot.id=$id_a,snapshot.name=B" \
    img.qcow2 x.1 2> err
grep -q "not found" err || fail "a mismatched id and name: $(cat err)"
expect_status 1 $VDISK export-diff -l snapshot.foo=1 img.qcow2 x.1 2> err
expect_status 1 $QEMU_IMG convert -l snapshot.foo=1 img.qcow2 x.raw 2> qerr
diff -u <(sed 's/^[a-z-]*: //' qerr) <(sed 's/^[a-z-]*: //' err) ||
    fail "an unknown -l key: not qemu-img's messages"
[ ! -e x.1 ] || fail "a failed export-diff left its output file"
[ "$(sum img.qcow2)" = "$img_sum" ] || fail "the bad exports changed the image"
exit 0
