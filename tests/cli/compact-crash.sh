#!/usr/bin/env bash
# vdisk compact killed (SIGKILL) at chosen steps: the test hook
# VDISK_COMPACT_KILL_AT=N stops the process before its N-th write, flush
# or truncate (=count prints how many there are), so the kill points are
# deterministic. The image (512-byte clusters and 64-bit refcounts, so
# that refcount blocks, the grown refcount table, L1 and L2 tables, the snapshot table and the
# bitmap directory and tables all lie above big holes and move) has two
# snapshots taken, one deleted, and a persistent bitmap. After each kill:
# qemu-img check finds no corruption (leaks only), the active layer and
# every snapshot read as before, the bitmap is listed as before and holds
# the same extents; a rerun of vdisk compact completes and check is then
# clean. COMPACT_CRASH_ALL=1 tries every step (slow); the default is 8
# steps spread over the run, the first and the last included.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io
source "$(dirname "$0")/compact-functions.bash"
tmpdir

$QEMU_IMG create -q -f qcow2 base.qcow2 2M
qio base.qcow2 "write -P 200 0 2M"
$QEMU_IMG create -q -f qcow2 -b "$PWD/base.qcow2" -F qcow2 \
    -o cluster_size=512,refcount_bits=64 img.qcow2 2M
$QEMU_IMG bitmap --add -g 4096 img.qcow2 bm0
qio img.qcow2 "write -P 1 0 2M"
$QEMU_IMG snapshot -c s1 img.qcow2
qio img.qcow2 "write -P 2 0 1536k" "write -P 3 1536k 256k"
$QEMU_IMG snapshot -c s2 img.qcow2
qio img.qcow2 "write -P 4 512k 128k" "discard 1M 128k" "write -z 1536k 64k"
$QEMU_IMG snapshot -d s1 img.qcow2
check_clean img.qcow2 leaks-ok
save_views img.qcow2 before

cp img.qcow2 w.qcow2
VDISK_COMPACT_KILL_AT=count $VDISK compact w.qcow2 > /dev/null 2> count.out
steps=$(sed -n 's/^compact: \([0-9]*\) steps$/\1/p' count.out)
[ -n "$steps" ] && [ "$steps" -gt 20 ] || fail "step count: $(cat count.out)"
check_clean w.qcow2
check_views w.qcow2 before
[ "$(size_of w.qcow2)" -lt "$(size_of img.qcow2)" ] || fail "not smaller"
echo "$steps steps; $(size_of img.qcow2) -> $(size_of w.qcow2) bytes"

if [ "${COMPACT_CRASH_ALL:-0}" = 1 ]; then
    points=$(seq 1 "$steps")
else
    points=$(python3 -c "n=$steps; print(*sorted({1, 2, n} | {1 + (n - 1) * i // 7 for i in range(8)}))")
fi
for k in $points; do
    cp img.qcow2 w.qcow2
    st=0
    VDISK_COMPACT_KILL_AT=$k $VDISK compact w.qcow2 > /dev/null 2>&1 || st=$?
    [ "$st" = 137 ] || fail "step $k: expected SIGKILL (137), got $st"
    check_clean w.qcow2 leaks-ok
    check_views w.qcow2 before
    $VDISK compact w.qcow2 > /dev/null 2>&1 || fail "step $k: rerun failed"
    check_clean w.qcow2
    check_views w.qcow2 before
done
