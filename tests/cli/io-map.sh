#!/usr/bin/env bash
# vdisk io: map, alloc, info, length and truncate print what qemu-io
# prints for the same sequence of writes, zero writes and discards.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/io-functions.bash"
requires qemu-img qemu-io
tmpdir

for fmt in $(io_formats); do
    rm -rf q v
    io_create "$fmt" disk.img 2M
    io_compare -f "$fmt" -c map -c 'alloc 0' -c 'alloc 0 2M' -c length -c info \
        disk.img
    io_compare -f "$fmt" \
        -c 'write 0 64k' -c 'write 192k 4k' -c 'write -P 3 1M 128k' \
        -c map -c 'alloc 0 1M' -c 'alloc 64k' -c 'alloc 1' -c 'alloc 0 1' \
        -c 'alloc 190k 8k' -c 'alloc 1M 1M' -c 'alloc 2M' -c 'alloc 0 3M' \
        -c 'alloc 0 x' -c 'write -z 1M 64k' -c map -c 'write -z -u 1088k 64k' \
        -c map -c 'discard 0 64k' -c map -c 'alloc 0 2M' disk.img
    io_compare -f "$fmt" -c 'truncate 3G' -c length -c map -c info \
        -c 'truncate 1M' -c length -c map -c 'truncate 1000' -c length \
        -c 'truncate x' disk.img
done

# qcow2 with a different cluster size and extended L2 entries.
for opts in cluster_size=4096 cluster_size=1M extended_l2=on,cluster_size=128k; do
    rm -rf q v
    mkdir q v
    "$QEMU_IMG" create -q -f qcow2 -o "$opts" q/disk.img 100M
    cp q/disk.img v/disk.img
    io_compare -f qcow2 -c info -c 'write 5k 10k' -c map -c 'alloc 0 64k' disk.img
done
