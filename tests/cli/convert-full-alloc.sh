#!/usr/bin/env bash
# convert -S 0 wrote zero chunks as zero clusters (or fallocated holes) where qemu-img writes them as data and allocates the whole target.
# Targets of raw and qcow2 (plain, preallocated, compressed, with a
# backing file) converted by both tools must map the same.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
requires qemu-img qemu-io
tmpdir

$QEMU_IMG create -q -f qcow2 base.qcow2 4M
$QEMU_IO -c 'write -q -P 1 0 1M' base.qcow2
$QEMU_IMG create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
$QEMU_IO -c 'write -q -P 2 2M 64k' -c 'write -q -z 3M 64k' \
    -c 'write -q -P 3 3200k 4k' top.qcow2

split_dirs
for args in "-O qcow2" "-O raw" "-O qcow2 -o preallocation=metadata" \
            "-O qcow2 -c" "-O qcow2 -B base.qcow2 -F qcow2" \
            "-O qcow2 -o cluster_size=16k,extended_l2=on"; do
    rm -f q/t.img v/t.img
    same_rw convert -S 0 $args top.qcow2 t.img
    diff -u <($QEMU_IMG map --output=json q/t.img) \
            <($QEMU_IMG map --output=json v/t.img) ||
        fail "-S 0 $args: map differs"
    assert_same_content q/t.img v/t.img >/dev/null
done
# The refused sizes.
for s in 100 1x 17M -1; do
    same_rw convert -S "$s" -O qcow2 top.qcow2 t2.img
    [ ! -e v/t2.img ] || fail "-S $s created the target"
done
