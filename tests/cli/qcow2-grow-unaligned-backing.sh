#!/usr/bin/env bash
# Growing a qcow2 overlay whose old size was not cluster-aligned zeroed only the first subcluster of the new range, so the backing file's data showed through the rest (vdisk resize and commit to a smaller base).
# The new range must read as zeros, as after qemu-img resize, whenever
# the backing file is longer than the old size; the case that failed
# had zeros in the backing under the partial last cluster and data
# further on. Both ways in are tried: resize, and commit -b into a base
# smaller than the top (commit grows the base first). Expected content
# comes from qemu-img doing the same on a twin.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io
tmpdir

for cs in 4096 65536 "65536,extended_l2=on"; do
    for old in 524800 528384 589824; do
        for d in q v; do
            rm -rf $d && mkdir $d
            $QEMU_IMG create -q -f qcow2 $d/b.qcow2 1M
            $QEMU_IO -c 'write -q -P 0xaa 600k 424k' $d/b.qcow2
            $QEMU_IMG create -q -f qcow2 -o cluster_size=$cs \
                -b b.qcow2 -F qcow2 $d/o.qcow2 $old
            $QEMU_IO -c 'write -q -P 0x11 0 4k' $d/o.qcow2
        done
        $QEMU_IMG resize -q q/o.qcow2 1M
        $VDISK resize -q v/o.qcow2 1M
        $QEMU_IO -r -c "read -q -P 0 $old $((1048576 - old))" q/o.qcow2 ||
            fail "qemu-img's twin does not read zeros (cs=$cs old=$old)"
        $QEMU_IMG compare q/o.qcow2 v/o.qcow2 >/dev/null ||
            fail "resize cs=$cs old=$old: the grown range differs from qemu-img's"
        $QEMU_IMG check -q v/o.qcow2 || fail "resize cs=$cs old=$old: check"
    done
done

# commit -b: base (old size unaligned) below a longer top; the top must
# read the same after the commit, and the base must hold what it read.
for d in q v; do
    rm -rf $d && mkdir $d
    $QEMU_IMG create -q -f qcow2 -o extended_l2=on $d/l0.qcow2 1M
    $QEMU_IO -c 'write -q -P 0xb2 544k 80k' $d/l0.qcow2
    $QEMU_IMG create -q -f qcow2 -o cluster_size=4096 -b l0.qcow2 -F qcow2 \
        $d/l1.qcow2 524800
    $QEMU_IMG create -q -f qcow2 -o cluster_size=4096 -b l1.qcow2 -F qcow2 \
        $d/l2.qcow2 1088k
    $QEMU_IO -c 'write -q -P 0x22 0 64k' $d/l2.qcow2
done
$QEMU_IMG convert -O raw q/l2.qcow2 before.raw
$QEMU_IMG commit -q -b l1.qcow2 q/l2.qcow2
$VDISK commit -q -b l1.qcow2 v/l2.qcow2
$QEMU_IMG compare q/l2.qcow2 before.raw >/dev/null ||
    fail "qemu-img's commit changed the top"
$QEMU_IMG compare v/l2.qcow2 before.raw >/dev/null ||
    fail "commit -b into a smaller base changed what the top reads"
$QEMU_IMG compare q/l1.qcow2 v/l1.qcow2 >/dev/null ||
    fail "commit -b: the base differs from qemu-img's"
$QEMU_IMG check -q v/l1.qcow2 || fail "commit: check"
echo ok
