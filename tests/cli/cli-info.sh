#!/usr/bin/env bash
# vdisk info, human and JSON, single image and --backing-chain: the same
# bytes as qemu-img info on raw and qcow2 images (snapshots, backing
# files, zstd/extended L2, v2 images, lazy refcounts, sizes that exercise
# qemu's human size format).
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
requires qemu-img qemu-io
tmpdir

$QEMU_IMG create -f raw raw.img 64M >/dev/null
$QEMU_IO -f raw -c 'write -P 0x5a 1M 512k' raw.img >/dev/null
$QEMU_IMG create -f raw odd.img 1000000 >/dev/null
$QEMU_IMG create -f raw empty.img 0 >/dev/null
$QEMU_IMG create -f raw huge.img 1536G >/dev/null
$QEMU_IMG create -f qcow2 -o compat=1.1 base.qcow2 64M >/dev/null
$QEMU_IO -f qcow2 -c 'write -P 0xcd 0 2M' base.qcow2 >/dev/null
$QEMU_IMG create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2 >/dev/null
$QEMU_IMG snapshot -c snap1 overlay.qcow2
$QEMU_IO -f qcow2 -c 'write -P 0xab 0 1M' overlay.qcow2 >/dev/null
$QEMU_IMG snapshot -c snap2 overlay.qcow2
$QEMU_IMG create -f qcow2 -b overlay.qcow2 -F qcow2 top.qcow2 >/dev/null
$QEMU_IMG create -f qcow2 -o compression_type=zstd,extended_l2=on,cluster_size=128k zstd.qcow2 16M >/dev/null
$QEMU_IMG create -f qcow2 -o compat=0.10 v2.qcow2 16M >/dev/null
$QEMU_IMG create -f qcow2 -b raw.img -F raw rawback.qcow2 >/dev/null
mkdir sub
$QEMU_IMG create -f qcow2 -b ../base.qcow2 -F qcow2 sub/rel.qcow2 >/dev/null

for img in raw.img odd.img empty.img huge.img base.qcow2 overlay.qcow2 \
           top.qcow2 zstd.qcow2 v2.qcow2 rawback.qcow2 sub/rel.qcow2; do
    same info "$img"
    same info --output=json "$img"
    same info --backing-chain "$img"
    same info --backing-chain --output=json "$img"
    same info -U --output=human "$img"
done
same info -f raw raw.img
same info -f raw --output=json base.qcow2
same info -f qcow2 raw.img
same info missing.img
same info
same info raw.img base.qcow2
same info --output=xml raw.img
same info -z raw.img
same info raw.img -f
