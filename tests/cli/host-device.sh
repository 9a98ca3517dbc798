#!/usr/bin/env bash
# host_device and host_cdrom against qemu-img and qemu-io on loop
# devices: a device filename is host_device's, 'file' refuses a device
# and the device drivers a regular file (QEMU's words), images are
# created on devices as QEMU does (too small, preallocation, the first
# sector cleared), and data written by one tool reads back in the other.
# Needs root and free loop devices (losetup); skips otherwise.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io losetup
tmpdir

[ "$(id -u)" = 0 ] || { echo "$0: skipped: losetup needs root"; exit 77; }
truncate -s 4M lo-q.img
truncate -s 4M lo-v.img
LQ=$(losetup -f --show lo-q.img 2>/dev/null) ||
    { echo "$0: skipped: no loop device (losetup -f failed)"; exit 77; }
cleanup_fn losetup -d "$LQ"
LV=$(losetup -f --show lo-v.img 2>/dev/null) ||
    { echo "$0: skipped: no second loop device"; exit 77; }
cleanup_fn losetup -d "$LV"

# both NAME TOOL-ARGS...: qemu-img/qemu-io and vdisk (TOOL is img or io)
# with @ standing for each side's device; the same output and status.
both()
{
    local name=$1 tool=$2 qo=0 vo=0 a
    shift 2
    local -a qa=() va=()
    for a in "$@"; do
        qa+=("${a//@/$LQ}")
        va+=("${a//@/$LV}")
    done
    if [ "$tool" = img ]; then
        $QEMU_IMG "${qa[@]}" > "$name.q" 2>&1 || qo=$?
        "$VDISK" "${va[@]}" > "$name.v" 2>&1 || vo=$?
    else
        $QEMU_IO "${qa[@]}" > "$name.q" 2>&1 || qo=$?
        "$VDISK" io "${va[@]}" > "$name.v" 2>&1 || vo=$?
    fi
    [ "$vo" != 86 ] || { cat "$name.v"; fail "$name: sanitizer report"; }
    sed -e "s|$LQ|DEV|g" -e 's/^qemu-img: //;s/^qemu-io: //' \
        -e 's/, [0-9.]* [a-zA-Z]*\/sec.*//' -e '/ops; [0-9]/d' \
        "$name.q" > "$name.qn"
    sed -e "s|$LV|DEV|g" -e 's/^vdisk: //' \
        -e 's/, [0-9.]* [a-zA-Z]*\/sec.*//' -e '/ops; [0-9]/d' \
        "$name.v" > "$name.vn"
    diff -u "$name.qn" "$name.vn" || fail "$name: output differs"
    [ "$qo" = "$vo" ] || fail "$name: exit $vo, the peer's $qo"
}

both info img info --output=json @
both info-prefix img info --output=json host_device:@
both file-on-device img info --image-opts driver=file,filename=@
$QEMU_IMG create -q -f raw plain.img 1M
both device-on-file img info --image-opts driver=host_device,filename=plain.img
both cdrom-on-file img info --image-opts driver=host_cdrom,filename=plain.img
both cdrom-on-device img info --image-opts driver=host_cdrom,filename=@
both too-small img create -f raw @ 8M
both prealloc img create -f raw -o preallocation=full @ 1M
both create-qcow2 img create -f qcow2 @ 1M
both info-qcow2 img info @
both write-qcow2 io -c 'write -P 5 0 64k' -c 'read -P 5 0 64k' @
both check img check @
# Written by one, read by the other, through the same device.
"$VDISK" io -f qcow2 -c 'write -P 6 64k 64k' "$LQ" > /dev/null
$QEMU_IO -f qcow2 -c 'read -P 6 64k 64k' "$LQ" | grep -q '^read 65536' ||
    fail "qemu-io does not read what vdisk wrote"
both create-raw img create -f raw @ 1M
both raw-probed io -c 'read -P 0 0 512' @
exit 0
