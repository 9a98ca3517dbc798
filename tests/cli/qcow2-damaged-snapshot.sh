#!/usr/bin/env bash
# With the header's refcount zeroed, snapshot -c wrote its L1 copy over the qcow2 header (the file then probed as raw).
# Also: with the active L2 table's refcount zeroed it created an
# unreadable snapshot; snapshot -a through an L1 entry pointing at the L1
# table left the live L1 cluster with refcount 0; L1 or L2 entries far
# past the end of the file and compressed descriptors running past it
# were referenced (and refcount blocks created out there). qemu-img
# refuses all of them; vdisk must refuse before its first write: exit 1,
# the file named, the file byte-identical.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/qcow2-damage-functions.bash"
requires qemu-img qemu-io python3 sha256sum timeout
tmpdir

damage_bases
damage_make . rc-hdr=main.qcow2:rc-hdr rc-l2=main.qcow2:rc-l2 \
    l1-l1=main.qcow2:l1-l1 l1-far=main.qcow2:l1-far \
    l2-far=main.qcow2:l2-far comp-far=main.qcow2:comp-far

# refused IMAGE ARGS...: qemu-img refuses ARGS on a copy; vdisk refuses
# them on IMAGE, naming it, and leaves it as it was.
refused()
{
    local img=$1 sum
    shift
    cp "$img" q.qcow2
    sum=$(sha256sum < "$img")
    expect_status 1 $QEMU_IMG "$@" q.qcow2 2>/dev/null
    expect_status 1 timeout 20 "$VDISK" "$@" "$img" 2> err
    grep -q "$img" err || fail "$img $*: the error does not name the file"
    [ "$(sha256sum < "$img")" = "$sum" ] || fail "$img $*: the file changed"
    $QEMU_IMG info "$img" | grep -q "file format: qcow2" ||
        fail "$img no longer probes as qcow2"
}

refused rc-hdr.qcow2 snapshot -c new
refused rc-l2.qcow2 snapshot -c new
refused l1-l1.qcow2 snapshot -a s1
refused l1-far.qcow2 snapshot -c new
refused l2-far.qcow2 snapshot -c new
refused comp-far.qcow2 snapshot -c new
grep -q "lies outside the file" err || fail "no reason given: $(cat err)"

# The undamaged image: the snapshot reads back, and applying it brings
# back what was there.
cp main.qcow2 v.qcow2
"$VDISK" snapshot -c new v.qcow2
$QEMU_IO -c 'write -q -P 0x66 0 64k' v.qcow2
"$VDISK" snapshot -a new v.qcow2
$QEMU_IO -r -c 'read -P 0x11 0 64k' v.qcow2 > out ||
    fail "the snapshot did not restore the data: $(cat out)"
$QEMU_IMG check v.qcow2 >/dev/null || fail "not clean after the snapshots"
