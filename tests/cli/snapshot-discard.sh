#!/usr/bin/env bash
# Snapshot apply and delete give freed clusters back to the file as
# qemu-img does: the same content, a clean image, the same allocated file
# blocks, and runs of freed clusters that lie side by side in the file
# are discarded with no more calls than qemu-img makes, even when the
# guest wrote them in random order (they are freed in guest order).
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io strace python3
tmpdir

# A 64 MiB image with 32 MiB of data written cluster by cluster in a
# shuffled order, a snapshot, then the clusters of 4 MiB rewritten in a
# shuffled order (fixed seeds): the host clusters freed by an apply (the
# new ones) or a delete (the old ones) lie side by side in the file, in
# an order unrelated to their guest offsets.
$QEMU_IMG create -f qcow2 base.qcow2 64M >/dev/null
shuffled() # SEED PATTERN FIRST_CLUSTER COUNT
{
    python3 -c '
import random, sys
seed, pattern, first, count = map(int, sys.argv[1:])
random.seed(seed)
for c in random.sample(range(first, first + count), count):
    print("write -P %d %d 64k" % (pattern, c * 65536))' "$@"
}
shuffled 1 1 0 512 | $QEMU_IO base.qcow2 >/dev/null
$QEMU_IMG snapshot -c snap base.qcow2
shuffled 2 2 100 64 | $QEMU_IO base.qcow2 >/dev/null

# punches TOOL ARGS...: the number of hole punches "TOOL ARGS" makes.
# (LeakSanitizer cannot run under ptrace; the other tests cover leaks.)
punches()
{
    ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0 strace -f -e trace=fallocate -o trace "$@" >/dev/null ||
        fail "$* failed"
    grep -c PUNCH_HOLE trace || true
}

for op in -a -d; do
    cp base.qcow2 q.qcow2
    cp base.qcow2 v.qcow2
    qn=$(punches "$QEMU_IMG" snapshot $op snap q.qcow2)
    vn=$(punches "$VDISK" snapshot $op snap v.qcow2)
    $QEMU_IMG check q.qcow2 >/dev/null || fail "qemu-img $op: not clean"
    $QEMU_IMG check v.qcow2 >/dev/null || fail "vdisk $op: image not clean"
    assert_same_content q.qcow2 v.qcow2
    [ "$(stat -c %b v.qcow2)" = "$(stat -c %b q.qcow2)" ] ||
        fail "snapshot $op: $(stat -c %b v.qcow2) blocks allocated in the" \
             "file, qemu-img leaves $(stat -c %b q.qcow2)"
    [ "$qn" -gt 0 ] || fail "snapshot $op: qemu-img discarded nothing"
    [ "$vn" -le "$qn" ] ||
        fail "snapshot $op: $vn hole punches, qemu-img needs $qn"
done
