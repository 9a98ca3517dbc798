#!/usr/bin/env bash
# A snapshot over compressed clusters that share a host cluster checked only that one more reference fit each refcount, so with narrow refcounts it overflowed half-way and left leaks and an L2 table COPIED with refcount 2 (as QEMU 7.2 does); it is now refused before anything is written.
# Found by qcow2-random-ops.sh (2-bit refcounts, 2 KiB clusters). Two
# compressed clusters of a pattern share one host cluster (refcount 2);
# a snapshot adds a reference per compressed cluster: 4 does not fit 2
# bits, fits 4 bits. qemu-img fails where vdisk must refuse, and
# succeeds where vdisk must too, with the same content.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io cmp
tmpdir

for bits in 2 4; do
    for d in q v; do
        rm -f $d.qcow2
        $QEMU_IMG create -q -f qcow2 -o cluster_size=2048,refcount_bits=$bits \
            $d.qcow2 1M
        $QEMU_IO -c 'write -q -c -P 7 0 4096' -c 'write -q -P 9 64k 8k' $d.qcow2
    done
    cp v.qcow2 before.qcow2
    qst=0
    $QEMU_IMG snapshot -c s1 q.qcow2 2>/dev/null || qst=$?
    vst=0
    "$VDISK" snapshot -c s1 v.qcow2 2>err || vst=$?
    [ $vst = $qst ] || fail "bits=$bits: vdisk exit $vst, qemu-img's $qst"
    if [ $qst != 0 ]; then
        grep -q "would overflow" err || fail "bits=$bits: no overflow message"
        cmp before.qcow2 v.qcow2 || fail "bits=$bits: the refused snapshot changed the image"
    else
        $QEMU_IMG compare -U q.qcow2 v.qcow2 >/dev/null || fail "bits=$bits: content"
        $QEMU_IMG snapshot -l v.qcow2 | grep -q s1 || fail "bits=$bits: no snapshot"
        # Applying it adds the same references again.
        $QEMU_IMG snapshot -a s1 q.qcow2
        "$VDISK" snapshot -a s1 v.qcow2
        $QEMU_IMG compare -U q.qcow2 v.qcow2 >/dev/null || fail "bits=$bits: after apply"
    fi
    $QEMU_IMG check -q v.qcow2 || fail "bits=$bits: check"
done
echo ok
