#!/usr/bin/env bash
# Zero writes over part of a cluster that reads as zeros, in flight with a write to the rest of it, must not wipe that write (QEMU 7.2 does: it widens the zero write to the whole cluster, loses the data and leaves a refcount-0 cluster in use).
# Found by qcow2-random-ops.sh, where QEMU's twin was the one that was
# wrong. Clusters 0 and 1 are allocated zero clusters (data, then write
# -z without unmap); three aio requests go at once: a zero write inside
# cluster 0, one across the boundary of clusters 0 and 1, and data into
# the rest of cluster 1. The reference is qemu-io issuing the same
# requests one after another on a twin; vdisk's image must read the
# same and check clean, under every cluster size and with 1-bit
# refcounts.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io
tmpdir

for opts in cluster_size=65536 cluster_size=524288,refcount_bits=1 \
            cluster_size=4096 cluster_size=65536,extended_l2=on; do
    cs=${opts%%,*}
    cs=${cs#cluster_size=}
    reqs=("write -q -z -u $((cs / 8)) $((cs / 2))"
          "write -q -z -u $((cs - cs / 16)) $((cs / 8))"
          "write -q -P 216 $((cs + cs / 4)) $((cs / 2))")
    for d in q v; do
        rm -f $d.qcow2
        $QEMU_IMG create -q -f qcow2 -o "$opts" $d.qcow2 $((2 * cs))
        $QEMU_IO -c "write -q -P 1 0 $((2 * cs))" -c "write -q -z 0 $((2 * cs))" \
            $d.qcow2
    done
    $QEMU_IO -c "${reqs[0]}" -c "${reqs[1]}" -c "${reqs[2]}" q.qcow2
    for i in 1 2 3 4 5; do
        cp v.qcow2 run.qcow2
        "$VDISK" io -c "aio_${reqs[0]}" -c "aio_${reqs[1]}" -c "aio_${reqs[2]}" \
            -c aio_flush run.qcow2
        $QEMU_IMG compare q.qcow2 run.qcow2 >/dev/null ||
            fail "$opts: the write to the rest of cluster 1 was lost (run $i)"
        $QEMU_IMG check -q run.qcow2 || fail "$opts: check (run $i)"
    done
done
echo ok
