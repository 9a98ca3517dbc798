#!/usr/bin/env bash
# resize --shrink on a qcow2 with a zeroed refcount block printed "Image resized." and truncated the file to 0 bytes.
# The same with a refcount table entry cleared (the header uncounted),
# pointing at the L1 table or past the end of the file. qemu-img refuses
# all of them; vdisk must refuse, name the file and leave it untouched.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/qcow2-damage-functions.bash"
requires qemu-img qemu-io python3 sha256sum
tmpdir

damage_bases
damage_make . rb-zero=main.qcow2:rb-zero rt-zero=main.qcow2:rt-zero \
    rt-l1=main.qcow2:rt-l1 rt-far=main.qcow2:rt-far

for img in rb-zero rt-zero rt-l1 rt-far; do
    cp $img.qcow2 q.qcow2
    sum=$(sha256sum < $img.qcow2)
    expect_status 1 $QEMU_IMG resize --shrink q.qcow2 2M 2>/dev/null
    expect_status 1 "$VDISK" resize --shrink $img.qcow2 2M > out 2> err
    grep -q "$img.qcow2" err ||
        fail "$img: the error does not name the file: $(cat err)"
    ! grep -q "Image resized" out || fail "$img: reported success"
    [ "$(sha256sum < $img.qcow2)" = "$sum" ] || fail "$img: the file changed"
done

# The undamaged image shrinks as with qemu-img, to the same content.
cp main.qcow2 q.qcow2
cp main.qcow2 v.qcow2
$QEMU_IMG resize --shrink q.qcow2 2M >/dev/null
"$VDISK" resize --shrink v.qcow2 2M >/dev/null
assert_same_content q.qcow2 v.qcow2
$QEMU_IMG check v.qcow2 >/dev/null || fail "the shrunk image is not clean"
