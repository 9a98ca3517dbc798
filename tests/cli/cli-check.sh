#!/usr/bin/env bash
# vdisk check basics: exit 63 and qemu-img's message for raw, the human
# and JSON reports of clean qcow2 images (plain, with a backing file,
# compressed), -q, and option errors. Damaged images are covered by
# qcow2-check.sh.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
requires qemu-img qemu-io
tmpdir

$QEMU_IMG create -f raw raw.img 4M >/dev/null
$QEMU_IO -f raw -c 'write -P 0x5a 1M 512k' raw.img >/dev/null
$QEMU_IMG create -f qcow2 base.qcow2 64M >/dev/null
$QEMU_IO -f qcow2 -c 'write -P 0xcd 0 2M' base.qcow2 >/dev/null
$QEMU_IMG create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2 >/dev/null
$QEMU_IO -f qcow2 -c 'write -P 0xab 0 1M' -c 'write -P 0xef 8M 64k' overlay.qcow2 >/dev/null
$QEMU_IMG convert -c -f raw -O qcow2 raw.img comp.qcow2
$QEMU_IMG create -f qcow2 empty.qcow2 1M >/dev/null

same check raw.img
same check -f raw raw.img
same check --output=json -f raw raw.img
for img in base.qcow2 overlay.qcow2 comp.qcow2 empty.qcow2; do
    same check "$img"
    same check --output=json "$img"
    same check -q "$img"
    same check -U -f qcow2 "$img"
done
same check -r bogus base.qcow2
same check --output=xml base.qcow2
same check missing.qcow2
same check
same check base.qcow2 raw.img

split_dirs
same_rw check -r leaks base.qcow2
same_rw check -r all --output=json overlay.qcow2
