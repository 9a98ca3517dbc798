#!/usr/bin/env bash
# resize --shrink kept refcount blocks that no longer counted anything, where QEMU 7.2 drops them and cuts the file after the last used cluster.
# The same image shrunk by qemu-img and by vdisk must check the same,
# map the same, end at the same offset and read the same.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io
tmpdir

for opts in cluster_size=512 cluster_size=512,refcount_bits=64 \
            cluster_size=4k,refcount_bits=1 \
            cluster_size=512,preallocation=metadata; do
    rm -f b.qcow2
    # 512-byte clusters: one refcount block covers 128 KiB (64 KiB with
    # 64-bit refcounts), so a few MiB give many blocks to drop.
    $QEMU_IMG create -q -f qcow2 -o $opts b.qcow2 8M
    $QEMU_IO -c 'write -q -P 1 0 4M' -c 'write -q -P 2 6M 1M' b.qcow2
    for size in 1M 5M; do
        cp b.qcow2 q.qcow2
        cp b.qcow2 v.qcow2
        $QEMU_IMG resize -q --shrink q.qcow2 $size
        "$VDISK" resize -q --shrink v.qcow2 $size
        diff -u <($QEMU_IMG check q.qcow2) <($QEMU_IMG check v.qcow2) ||
            fail "$opts, $size: check differs"
        diff -u <($QEMU_IMG map --output=json q.qcow2) \
                <($QEMU_IMG map --output=json v.qcow2) ||
            fail "$opts, $size: map differs"
        [ "$(size_of q.qcow2)" = "$(size_of v.qcow2)" ] ||
            fail "$opts, $size: file length $(size_of v.qcow2), qemu-img's $(size_of q.qcow2)"
        assert_same_content q.qcow2 v.qcow2
    done
done
