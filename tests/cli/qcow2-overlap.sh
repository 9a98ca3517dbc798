#!/usr/bin/env bash
# Metadata overlap checks (option overlap-check): an L2 entry crafted to
# point at the L1 table, the refcount table, a refcount block or an L2
# table makes a write through vdisk fail and mark the image corrupt
# instead of overwriting the metadata, exactly as qemu-io leaves the same
# image (files compared byte for byte); overlap-check=none lets the write
# through; bad option values are refused.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io python3 cmp
tmpdir

# Prints the host offset of structure $2 of image $1: l1, reftable,
# refblock (the first), l2 (the first).
where()
{
    python3 - "$1" "$2" <<'PY'
import struct, sys
f = open(sys.argv[1], 'rb')
h = f.read(72)
l1 = struct.unpack('>Q', h[40:48])[0]
rt = struct.unpack('>Q', h[48:56])[0]
f.seek(l1); l2 = struct.unpack('>Q', f.read(8))[0] & 0x00fffffffffffe00
f.seek(rt); rb = struct.unpack('>Q', f.read(8))[0] & ~0x1ff
print({'l1': l1, 'reftable': rt, 'refblock': rb, 'l2': l2}[sys.argv[2]])
PY
}

# Sets L2 entry $2 of the first L2 table of image $1 to host offset $3
# (a standard cluster with the COPIED flag: writes go in place).
set_l2()
{
    python3 - "$1" "$2" "$3" <<'PY'
import struct, sys
name, idx, host = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
f = open(name, 'r+b')
h = f.read(72)
l1 = struct.unpack('>Q', h[40:48])[0]
f.seek(l1); l2 = struct.unpack('>Q', f.read(8))[0] & 0x00fffffffffffe00
f.seek(l2 + 8 * idx)
f.write(struct.pack('>Q', host | (1 << 63)))
PY
}

for what in l1 reftable refblock l2; do
    rm -f base.qcow2
    $QEMU_IMG create -q -f qcow2 -o cluster_size=4k base.qcow2 16M
    $QEMU_IO -c "write -P 1 0 16k" base.qcow2 >/dev/null
    set_l2 base.qcow2 2 "$(where base.qcow2 $what)"
    cp base.qcow2 q.qcow2
    cp base.qcow2 v.qcow2
    $QEMU_IO -c "write -P 0xee 8k 4k" q.qcow2 >q.out 2>&1 || true
    st=0
    "$VDISK" io -c "write -P 0xee 8k 4k" v.qcow2 >v.out 2>&1 || st=$?
    grep -q "Preventing invalid write on metadata" q.out ||
        fail "$what: qemu-io did not refuse the write"
    grep -q "Preventing invalid write on metadata (overlaps with" v.out ||
        fail "$what: vdisk did not refuse the write: $(cat v.out)"
    cmp q.qcow2 v.qcow2 || fail "$what: files differ after the refused write"
    $QEMU_IMG info --output=json v.qcow2 | grep -q '"corrupt": true' ||
        fail "$what: image not marked corrupt"
    # A corrupt image opens read-only only.
    "$VDISK" io -c "read 0 4k" v.qcow2 >/dev/null 2>&1 &&
        fail "$what: corrupt image opened for writing"
    "$VDISK" io -r -c "read -P 1 0 4k" v.qcow2 >/dev/null ||
        fail "$what: corrupt image unreadable"

    # Without the check the write goes where the entry says.
    cp base.qcow2 n.qcow2
    "$VDISK" io -c "write -P 0xee 8k 4k" \
        --image-opts driver=qcow2,overlap-check=none,file.filename=n.qcow2 \
        >/dev/null 2>&1 || fail "$what: overlap-check=none refused the write"
    $QEMU_IMG info --output=json n.qcow2 | grep -q '"corrupt": true' &&
        fail "$what: overlap-check=none marked the image corrupt"
    true
done

# The overlap names, one per structure.
rm -f base.qcow2
$QEMU_IMG create -q -f qcow2 -o cluster_size=4k base.qcow2 16M
$QEMU_IO -c "write -P 1 0 16k" base.qcow2 >/dev/null
for pair in "l1:active L1 table" "reftable:refcount table" \
            "refblock:refcount block" "l2:active L2 table"; do
    cp base.qcow2 x.qcow2
    set_l2 x.qcow2 3 "$(where x.qcow2 ${pair%%:*})"
    "$VDISK" io -c "write 12k 4k" x.qcow2 >out 2>&1 || true
    grep -q "overlaps with ${pair#*:})" out || fail "${pair%%:*}: $(cat out)"
done

# Per-structure switches and modes.
cp base.qcow2 y.qcow2
set_l2 y.qcow2 3 "$(where y.qcow2 l1)"
"$VDISK" io -c "write 12k 4k" \
    --image-opts driver=qcow2,overlap-check.active-l1=off,file.filename=y.qcow2 \
    >/dev/null 2>&1 || fail "overlap-check.active-l1=off refused the write"
for mode in constant cached all; do
    cp base.qcow2 z.qcow2
    set_l2 z.qcow2 3 "$(where z.qcow2 l1)"
    "$VDISK" io -c "write 12k 4k" \
        --image-opts driver=qcow2,overlap-check=$mode,file.filename=z.qcow2 \
        >out 2>&1 && fail "overlap-check=$mode let the write through"
    grep -q "overlaps with active L1 table" out || fail "$mode: $(cat out)"
done
"$VDISK" io -c "read 0 4k" \
    --image-opts driver=qcow2,overlap-check=bogus,file.filename=base.qcow2 \
    >out 2>&1 && fail "overlap-check=bogus accepted"
grep -q "Unsupported value 'bogus' for qcow2 option 'overlap-check'" out ||
    fail "bad overlap-check message: $(cat out)"

# Ordinary use is not disturbed by the checks.
rm -f w.qcow2
"$VDISK" create -q -f qcow2 -o cluster_size=512 w.qcow2 8M
"$VDISK" io -c "write -P 3 0 8M" -c "write -z 1M 1M" -c "discard 3M 1M" \
    -c "write -P 4 3M 512k" \
    --image-opts driver=qcow2,overlap-check=all,file.filename=w.qcow2 >/dev/null
$QEMU_IMG check -q w.qcow2 || fail "checked writes left a bad image"

# cache-clean-interval is accepted; l2-cache-entry-size other than the
# cluster size is refused clearly.
"$VDISK" io -c "read 0 4k" \
    --image-opts driver=qcow2,cache-clean-interval=1,file.filename=base.qcow2 \
    >/dev/null || fail "cache-clean-interval refused"
"$VDISK" io -c "read 0 4k" \
    --image-opts driver=qcow2,l2-cache-entry-size=4k,file.filename=base.qcow2 \
    >/dev/null || fail "l2-cache-entry-size equal to the cluster size refused"
"$VDISK" io -c "read 0 4k" \
    --image-opts driver=qcow2,l2-cache-entry-size=1k,file.filename=base.qcow2 \
    >out 2>&1 && fail "l2-cache-entry-size=1k accepted"
grep -q "l2-cache-entry-size" out || fail "unclear message: $(cat out)"
