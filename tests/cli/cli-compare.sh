#!/usr/bin/env bash
# vdisk compare: identical and different images, the offset of the first
# difference, images of different sizes (tail must be zero, "Warning:
# Image size mismatch!"), strict mode, -q, qcow2 chains, and exit codes
# 0/1/2 exactly as qemu-img compare.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
requires qemu-img qemu-io
tmpdir

$QEMU_IMG create -f raw a.img 64M >/dev/null
$QEMU_IO -f raw -c 'write -P 0x5a 1M 512k' -c 'write -P 2 20M 64k' a.img >/dev/null
cp --sparse=always a.img same.img
cp a.img a-dense.img
cp a.img b.img
$QEMU_IO -f raw -c 'write -P 7 5000 1' b.img >/dev/null
cp a.img c.img
$QEMU_IO -f raw -c 'write -P 7 40M 1' c.img >/dev/null
$QEMU_IMG create -f raw big.img 80M >/dev/null
$QEMU_IMG convert -n -f raw -O raw a.img big.img
cp big.img big2.img
$QEMU_IO -f raw -c 'write -P 9 70M 100' big2.img >/dev/null
$QEMU_IMG create -f raw short.img 1M >/dev/null
$QEMU_IMG create -f raw zeros.img 2M >/dev/null
$QEMU_IMG create -f qcow2 base.qcow2 64M >/dev/null
$QEMU_IO -f qcow2 -c 'write -P 0xcd 0 2M' base.qcow2 >/dev/null
$QEMU_IMG create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2 >/dev/null
$QEMU_IO -f qcow2 -c 'write -P 0xab 0 1M' -c 'write -P 0xef 8M 64k' overlay.qcow2 >/dev/null
$QEMU_IMG convert -O qcow2 overlay.qcow2 flat.qcow2

for args in "a.img same.img" "a.img a-dense.img" "a.img b.img" "b.img a.img" \
            "a.img c.img" "a.img big.img" "big.img a.img" "a.img big2.img" \
            "big2.img a.img" "short.img zeros.img" "zeros.img short.img" \
            "-s a.img same.img" "-s a.img a-dense.img" "-s a.img b.img" \
            "-s a.img big.img" "-q a.img b.img" "-q a.img same.img" \
            "-f raw -F raw a.img b.img" "overlay.qcow2 flat.qcow2" \
            "base.qcow2 overlay.qcow2" "-s base.qcow2 overlay.qcow2" \
            "-s overlay.qcow2 flat.qcow2" "-f raw -F qcow2 a.img base.qcow2" \
            "-U a.img b.img" "-p a.img c.img"; do
    # shellcheck disable=SC2086
    same compare $args
done
same compare a.img missing.img
same compare missing.img a.img
same compare a.img
same compare
same compare -f qcow2 a.img b.img
