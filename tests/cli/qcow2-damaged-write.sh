#!/usr/bin/env bash
# A write through an L2 entry whose data offset was not cluster-aligned spilled into the next cluster (another guest offset's data).
# Also an extended L2 entry with host offset 0 but allocated subcluster
# bits was written through. qemu-io fails such writes with EIO and marks
# the image corrupt; vdisk must do the same: the request fails, the only
# change to the file is the corrupt bit, the other data stays.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/qcow2-damage-functions.bash"
requires qemu-img qemu-io python3 cmp
tmpdir

damage_bases
damage_make . l2-unal=main.qcow2:l2-unal ext-nohost=ext.qcow2:ext-nohost

# only_corrupt_bit ORIG COPY: COPY is ORIG with the corrupt bit set.
only_corrupt_bit()
{
    python3 - "$1" "$2" <<'PY'
import struct, sys
o, v = (open(f, "rb").read() for f in sys.argv[1:])
bits = struct.unpack(">Q", v[72:80])[0]
assert bits & 2, "the image is not marked corrupt"
v = v[:72] + struct.pack(">Q", bits & ~2) + v[80:]
assert v == o, "the file changed beyond the corrupt bit"
PY
}

# write_fails IMAGE IO-COMMAND: as qemu-io on a copy, the write fails and
# marks the image corrupt, and nothing else changes.
write_fails()
{
    local img=$1 cmd=$2
    cp "$img" q.qcow2
    cp "$img" v.qcow2
    expect_status 1 $QEMU_IO -c "$cmd" q.qcow2 >/dev/null 2>&1
    expect_status 1 "$VDISK" io -c "$cmd" v.qcow2 >out 2>err
    grep -q "v.qcow2" err || fail "$img: the error does not name the file"
    grep -q "marked corrupt" err || fail "$img: not marked corrupt: $(cat err)"
    only_corrupt_bit "$img" q.qcow2
    only_corrupt_bit "$img" v.qcow2
}

# Guest cluster 0's entry points 512 bytes into its data cluster; guest
# cluster 1 (0x44 since the snapshot) must keep its data.
write_fails l2-unal.qcow2 'write -P 0x55 0 64k'
grep -q "Data cluster offset .* unaligned (guest offset: 0)" err ||
    fail "unexpected message: $(cat err)"
$QEMU_IO -r -c 'read -P 0x44 64k 64k' v.qcow2 >/dev/null ||
    fail "the next cluster's data changed"

# Guest 512k: no host cluster, subclusters 0 and 1 marked allocated.
write_fails ext-nohost.qcow2 'write -P 0x55 512k 2k'
grep -q "Invalid cluster entry found" err ||
    fail "unexpected message: $(cat err)"
