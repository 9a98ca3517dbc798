#!/usr/bin/env bash
# vdisk map: JSON lines and the human table, merged extents, depth in a
# backing chain, zero clusters, compressed clusters, --start-offset and
# --max-length, all as qemu-img map prints them.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
requires qemu-img qemu-io
tmpdir

$QEMU_IMG create -f raw raw.img 64M >/dev/null
$QEMU_IO -f raw -c 'write -P 0x5a 1M 512k' -c 'write -P 1 10M 3000' \
    -c 'write -P 2 20M 64k' raw.img >/dev/null
$QEMU_IMG create -f qcow2 base.qcow2 64M >/dev/null
$QEMU_IO -f qcow2 -c 'write -P 0xcd 0 2M' base.qcow2 >/dev/null
$QEMU_IMG create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2 >/dev/null
$QEMU_IO -f qcow2 -c 'write -P 0xab 0 1M' -c 'write -z 4M 1M' \
    -c 'write -P 0xef 8M 64k' overlay.qcow2 >/dev/null
$QEMU_IMG create -f qcow2 -b overlay.qcow2 -F qcow2 top.qcow2 >/dev/null
$QEMU_IO -f qcow2 -c 'write -P 0x11 12M 128k' top.qcow2 >/dev/null
$QEMU_IMG convert -f qcow2 -O qcow2 overlay.qcow2 flat.qcow2
$QEMU_IMG convert -c -f raw -O qcow2 raw.img comp.qcow2
$QEMU_IMG create -f raw empty.img 0 >/dev/null

for img in raw.img base.qcow2 overlay.qcow2 top.qcow2 flat.qcow2 empty.img; do
    same map --output=json "$img"
    same map "$img"
    same map --output=human "$img"
done
same map --output=json comp.qcow2
same map comp.qcow2                 # human format refuses compressed data
same map --output=json -f raw raw.img
same map --output=json -f raw base.qcow2
same map --output=json --start-offset=1M --max-length=10M raw.img
same map --start-offset=1M --max-length=10M overlay.qcow2
same map --output=json --start-offset=1000 --max-length=5000 overlay.qcow2
same map --output=json --start-offset=100M raw.img
same map --output=json --max-length=0 raw.img
same map --output=xml raw.img
same map missing.img
same map
# A filter over a chain shows the whole chain, depths counted without
# the filter (vdisk stopped at the filter and called everything below
# the top's own layer unallocated; a mirror of such a filter copied
# zeros for it).
for f in '{"driver":"blkdebug","image":{"driver":"qcow2","file":{"driver":"file","filename":"top.qcow2"}}}' \
         '{"driver":"qcow2","file":{"driver":"blkdebug","image":{"driver":"file","filename":"top.qcow2"}}}'; do
    same map --output=json "json:$f"
    same map "json:$f"
done
