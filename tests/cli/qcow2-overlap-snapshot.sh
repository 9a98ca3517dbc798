#!/usr/bin/env bash
# Overlap checks against internal snapshots' metadata: an active L2 entry
# crafted to point at a snapshot's L1 table (checked from mode "cached"
# on) or at an L2 table only a snapshot still uses (checked in mode "all"
# only). vdisk must refuse or allow each write exactly as qemu-io does,
# name the same structure, and leave a byte-identical file. Guards the
# sorted range sets of overlap.c, which must follow snapshot creation,
# copy-on-write of L2 tables and snapshot deletion.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io python3 cmp
tmpdir

# Prints the host offset of structure $2 of image $1: snap-l1 (the first
# snapshot's L1 table), snap-l2 (the L2 table its first entry names).
where()
{
    python3 - "$1" "$2" <<'PY'
import struct, sys
f = open(sys.argv[1], 'rb')
h = f.read(72)
nb, so = struct.unpack('>IQ', h[60:72])
assert nb >= 1
f.seek(so); sl1 = struct.unpack('>Q', f.read(8))[0]
f.seek(sl1); sl2 = struct.unpack('>Q', f.read(8))[0] & 0x00fffffffffffe00
print({'snap-l1': sl1, 'snap-l2': sl2}[sys.argv[2]])
PY
}

# Sets entry $2 of the active first L2 table of image $1 to host offset
# $3 with the COPIED flag, so that a write there goes in place.
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

# An image whose snapshot keeps the old first L2 table: the write after
# the snapshot copies it for the active state.
rm -f base.qcow2
$QEMU_IMG create -q -f qcow2 -o cluster_size=4k base.qcow2 16M
$QEMU_IO -c "write -P 1 0 16k" base.qcow2 >/dev/null
$QEMU_IMG snapshot -c s1 base.qcow2
$QEMU_IO -c "write -P 2 0 4k" base.qcow2 >/dev/null
[ "$(where base.qcow2 snap-l2)" != "" ] || fail "no snapshot L2 table"

# $1 structure, $2 mode, $3 expected name or "" (write allowed).
try()
{
    local what=$1 mode=$2 name=$3 qs=0 vs=0
    cp base.qcow2 q.qcow2
    set_l2 q.qcow2 3 "$(where q.qcow2 "$what")"
    cp q.qcow2 v.qcow2
    $QEMU_IO --image-opts -c "write -P 0xee 12k 4k" \
        driver=qcow2,overlap-check=$mode,file.filename=q.qcow2 \
        >q.out 2>&1 || qs=$?
    "$VDISK" io -c "write -P 0xee 12k 4k" \
        --image-opts driver=qcow2,overlap-check=$mode,file.filename=v.qcow2 \
        >v.out 2>&1 || vs=$?
    if [ -n "$name" ]; then
        grep -q "overlaps with $name)" q.out ||
            fail "$what/$mode: qemu-io did not refuse: $(cat q.out)"
        grep -q "Preventing invalid write on metadata (overlaps with $name)" \
            v.out || fail "$what/$mode: vdisk did not refuse: $(cat v.out)"
    else
        grep -q "Preventing invalid write" q.out &&
            fail "$what/$mode: qemu-io refused: $(cat q.out)"
        [ $vs = 0 ] || fail "$what/$mode: vdisk refused: $(cat v.out)"
    fi
    cmp q.qcow2 v.qcow2 || fail "$what/$mode: files differ after the write"
}

try snap-l1 cached "inactive L1 table"
try snap-l1 all "inactive L1 table"
try snap-l1 constant ""
try snap-l2 all "inactive L2 table"
try snap-l2 cached ""

# The per-structure switch turns the "all" check off for that structure.
cp base.qcow2 x.qcow2
set_l2 x.qcow2 3 "$(where x.qcow2 snap-l2)"
"$VDISK" io -c "write -P 0xee 12k 4k" --image-opts \
    driver=qcow2,overlap-check=all,overlap-check.inactive-l2=off,file.filename=x.qcow2 \
    >out 2>&1 || fail "overlap-check.inactive-l2=off refused: $(cat out)"

# Within one session: a snapshot taken, written past (copying the L2
# table) and deleted moves the checked structures; writes in mode "all"
# keep working and leave a clean image.
rm -f s.qcow2
"$VDISK" create -q -f qcow2 -o cluster_size=4k s.qcow2 16M
"$VDISK" io -c "write -P 1 0 64k" s.qcow2 >/dev/null
"$VDISK" snapshot -c a s.qcow2
"$VDISK" io -c "write -P 2 0 64k" -c "write -P 3 8M 64k" --image-opts \
    driver=qcow2,overlap-check=all,file.filename=s.qcow2 >/dev/null ||
    fail "writes after a snapshot refused"
"$VDISK" snapshot -c b s.qcow2
"$VDISK" snapshot -d a s.qcow2
"$VDISK" io -c "write -P 4 0 1M" -c "read -P 4 0 1M" --image-opts \
    driver=qcow2,overlap-check=all,file.filename=s.qcow2 >/dev/null ||
    fail "writes after a snapshot deletion refused"
$QEMU_IMG check -q s.qcow2 || fail "checked writes left a bad image"
true
