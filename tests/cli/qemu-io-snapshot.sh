#!/usr/bin/env bash
# qemu-io -s / --snapshot / open -s, by QEMU's qemu-io and by vdisk under
# qemu-io's name: writes go to a temporary qcow2 overlay and are gone at
# exit, the image itself is never written (byte-compared with its copy
# from before), qemu-io's output is matched, and no temporary file is
# left behind, even when the program is killed.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/io-functions.bash"
requires qemu-img qemu-io
tmpdir
# The overlays go here, so that leftovers can be counted.
mkdir overlays
export TMPDIR=$PWD/overlays

for fmt in $(io_formats); do
    rm -rf q v
    io_create "$fmt" disk.img 4M
    "$QEMU_IO" -f "$fmt" -c 'write -P 0x5a 0 1M' q/disk.img > /dev/null
    cp q/disk.img v/disk.img
    cp q/disk.img orig.img

    io_compare -f "$fmt" -s -c 'write -P 0x11 0 64k' -c 'read -P 0x11 0 64k' \
        -c 'read -P 0x5a 64k 960k' -c 'write -z 2M 64k' -c 'map' -c 'info' \
        -c 'discard 0 64k' -c 'truncate 8M' -c 'length' disk.img
    io_compare -f "$fmt" --snapshot -r -c 'write 0 512' -c 'read -P 0x5a 0 4k' \
        disk.img
    io_compare -c "open -s -o driver=$fmt disk.img" -c 'write -P 0x22 1M 4k' \
        -c 'map' -c 'close' -c "open -r -o driver=$fmt disk.img" \
        -c 'read -P 0 1M 4k'
    io_compare -s --image-opts -c 'write -P 0x33 0 4k' -c 'read -P 0x33 0 4k' \
        "driver=$fmt,file.filename=disk.img"
    # Killed in the middle: the image is untouched, no overlay stays.
    io_compare -f "$fmt" -s -c 'write -P 0x44 0 1M' -c 'sigraise 9' disk.img
    for d in q v; do
        cmp orig.img "$d/disk.img" || fail "-s wrote to the image ($d, $fmt)"
    done
    assert_same_content -f "$fmt" -F "$fmt" q/disk.img v/disk.img
done

# Copy-on-read with -s fills the overlay, never the image under it.
io_backed_pair 1M
cp v/top.qcow2 top.orig
io_compare -s -C -c 'read -P 0x66 0 1M' -c 'map' -c 'write -P 1 2M 4k' \
    top.qcow2
cmp top.orig v/top.qcow2 || fail "-s -C wrote to the image"
"$QEMU_IMG" map --output=json q/top.qcow2 > q.map
"$QEMU_IMG" map --output=json v/top.qcow2 > v.map
diff -u q.map v.map || fail "qemu-img map differs after -s -C"

left=$(ls overlays | wc -l)
[ "$left" = 0 ] || fail "$left temporary overlays left behind: $(ls overlays)"
exit 0
