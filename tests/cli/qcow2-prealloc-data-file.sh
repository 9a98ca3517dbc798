#!/usr/bin/env bash
# create and resize with preallocation=metadata and an external data file aborted on a write-permission assertion and would have allocated the data file; QEMU leaves it unallocated.
# Images made by qemu-img and by vdisk (create, then resize) must have the
# same map, check and qcow2 file, and the data file the same length and
# allocation (a new data file holds only the zeros of its first block).
source "$(dirname "$0")/../functions.sh"
requires qemu-img stat cmp
tmpdir

blocks() { stat -c %b "$1"; }

compare()
{
    local what=$1
    diff -u <($QEMU_IMG map --output=json q.qcow2) \
            <($QEMU_IMG map --output=json v.qcow2) || fail "$what: map"
    diff -u <($QEMU_IMG check q.qcow2) <($QEMU_IMG check v.qcow2) ||
        fail "$what: check"
    [ "$(size_of q.data)" = "$(size_of v.data)" ] ||
        fail "$what: data file length $(size_of v.data), qemu-img's $(size_of q.data)"
    [ "$(blocks v.data)" -le "$(blocks q.data)" ] ||
        fail "$what: data file allocates $(blocks v.data) blocks, qemu-img's $(blocks q.data)"
    [ "$(size_of q.qcow2)" = "$(size_of v.qcow2)" ] || fail "$what: qcow2 length"
}

for cs in 65536 4096; do
    rm -f q.* v.*
    $QEMU_IMG create -q -f qcow2 \
        -o data_file=q.data,preallocation=metadata,cluster_size=$cs q.qcow2 4M
    "$VDISK" create -q -f qcow2 \
        -o data_file=v.data,preallocation=metadata,cluster_size=$cs v.qcow2 4M
    compare "create, cluster_size=$cs"
    # The header differs only in the data file's name.
    cmp <(dd if=q.qcow2 bs=512 skip=1 2>/dev/null) \
        <(dd if=v.qcow2 bs=512 skip=1 2>/dev/null) ||
        fail "create, cluster_size=$cs: metadata differs"

    rm -f q.* v.*
    $QEMU_IMG create -q -f qcow2 -o data_file=q.data,cluster_size=$cs q.qcow2 1M
    $QEMU_IMG create -q -f qcow2 -o data_file=v.data,cluster_size=$cs v.qcow2 1M
    $QEMU_IO -c 'write -q -P 1 0 64k' q.qcow2
    $QEMU_IO -c 'write -q -P 1 0 64k' v.qcow2
    $QEMU_IMG resize -q --preallocation=metadata q.qcow2 4M
    "$VDISK" resize -q --preallocation=metadata v.qcow2 4M
    compare "resize, cluster_size=$cs"
    $QEMU_IO -r -c 'read -q -P 1 0 64k' -c 'read -q -P 0 64k 4032k' v.qcow2 ||
        fail "resize, cluster_size=$cs: data"
done

# Without a data file the image file itself is the same too.
rm -f q.* v.*
$QEMU_IMG create -q -f qcow2 q.qcow2 1M
$QEMU_IMG create -q -f qcow2 v.qcow2 1M
$QEMU_IMG resize -q --preallocation=metadata q.qcow2 4M
"$VDISK" resize -q --preallocation=metadata v.qcow2 4M
cmp q.qcow2 v.qcow2 || fail "resize without a data file: files differ"
