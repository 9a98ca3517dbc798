#!/usr/bin/env bash
# vdisk compact killed (SIGKILL) inside each of its phases. The test hook
# VDISK_COMPACT_KILL_AT=N stops the process before its N-th write, flush
# or truncate; =count prints how many there are and the step at which
# each phase starts, so the kill points are deterministic: one inside
# each phase (copy, count, rewrite, release of each level, the moves of
# refcount blocks and of the refcount table, the truncation). Two images:
# A (64 KiB clusters; two snapshots, one deleted; compressed clusters;
# a persistent bitmap added last) moves data, L2 and bitmap tables, L1 tables and
# the bitmap directory, and the snapshot table; B (512-byte clusters,
# 64-bit refcounts, a backing file, a bitmap that QEMU's writes fill; the
# refcount table grew) moves data, bitmap data, refcount blocks and the
# refcount table. After each kill: qemu-img check
# finds no corruption (leaks only), the active layer and every snapshot
# read as before, the bitmap list is the same; a rerun of vdisk compact
# completes, check is clean and every view still reads as before.
# COMPACT_CRASH_ALL=1 tries every step of both runs (slow).
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io
source "$(dirname "$0")/compact-functions.bash"
tmpdir

# Views, lighter than check_views: the active layer, every snapshot, the
# bitmap list.
views_equal()
{
    local img=$1 dir=$2 s
    assert_same_content "$dir/image" "$img"
    for s in $(snapshots "$dir/image"); do
        $QEMU_IMG convert -U -l "$s" -O raw "$img" view.raw
        cmp -s view.raw "$dir/snap-$s" || fail "$img: snapshot $s changed"
    done
    [ "$(bitmap_list "$img")" = "$(cat "$dir/bitmaps")" ] ||
        fail "$img: bitmaps changed"
}

# crash_points IMG PHASE:OFFSET...: kills a compaction of a copy of IMG
# at step (start of PHASE) + OFFSET for each pair, and checks.
crash_points()
{
    local img=$1 k st p
    shift
    save_views "$img" "$img.before"
    cp "$img" w.qcow2
    VDISK_COMPACT_KILL_AT=count $VDISK compact w.qcow2 > /dev/null 2> count.out
    local steps
    steps=$(sed -n 's/^compact: \([0-9]*\) steps$/\1/p' count.out)
    [ -n "$steps" ] || fail "$img: step count: $(cat count.out)"
    check_clean w.qcow2
    views_equal w.qcow2 "$img.before"
    [ "$(size_of w.qcow2)" -lt "$(size_of "$img")" ] || fail "$img: not smaller"
    echo "$img: $steps steps; $(size_of "$img") -> $(size_of w.qcow2) bytes"
    local points=()
    if [ "${COMPACT_CRASH_ALL:-0}" = 1 ]; then
        points=($(seq 1 "$steps"))
    else
        for p in "$@"; do
            local start
            start=$(sed -n "s/^compact: phase ${p%:*} at step \([0-9]*\)$/\1/p" \
                count.out | head -1)
            [ -n "$start" ] || fail "$img: no phase ${p%:*} in $(cat count.out)"
            points+=($((start + ${p#*:})))
        done
    fi
    for k in "${points[@]}"; do
        cp "$img" w.qcow2
        st=0
        VDISK_COMPACT_KILL_AT=$k $VDISK compact w.qcow2 > /dev/null 2>&1 || st=$?
        [ "$st" = 137 ] || fail "$img step $k: expected SIGKILL (137), got $st"
        check_clean w.qcow2 leaks-ok
        views_equal w.qcow2 "$img.before"
        $VDISK compact w.qcow2 > /dev/null 2> rerun.err ||
            fail "$img step $k: rerun failed: $(cat rerun.err)"
        check_clean w.qcow2
        views_equal w.qcow2 "$img.before"
    done
}

# ---- A: every level above the refcount structures ----
$QEMU_IMG create -q -f qcow2 a.qcow2 64M
qio a.qcow2 "write -P 1 0 16M" "write -P 2 16M 16M" "write -P 3 32M 16M"
$QEMU_IMG snapshot -c s1 a.qcow2
qio a.qcow2 "discard 0 8M" "write -P 4 40M 4M" "discard 20M 10M"
$QEMU_IMG snapshot -c s2 a.qcow2
qio a.qcow2 "discard 32M 16M" "write -c -P 7 50M 1M"
$QEMU_IMG snapshot -d s1 a.qcow2
$QEMU_IMG bitmap --add -g 128k a.qcow2 bm0
check_clean a.qcow2 leaks-ok
crash_points a.qcow2 data-copy:2 data-count:2 data-rewrite:2 \
    data-release:2 tables-rewrite:2 top-rewrite:2 snaptable-rewrite:2 \
    snaptable-release:1 truncate:1

# Regression (found in review, before it shipped): a run killed between
# the writes of two L2 tables that share a cluster leaves each copy named
# by one entry without the COPIED flag; a rerun that merely dropped the
# leaked refcounts to 1 would have left qemu-img check reporting
# OFLAG_COPIED corruptions. The rerun must move such clusters instead.
start=$(sed -n 's/^compact: phase data-rewrite at step \([0-9]*\)$/\1/p' count.out)
cp a.qcow2 w.qcow2
st=0
VDISK_COMPACT_KILL_AT=$((start + 2)) $VDISK compact w.qcow2 > /dev/null 2>&1 || st=$?
[ "$st" = 137 ] || fail "split: expected SIGKILL, got $st"
check_clean w.qcow2 leaks-ok
VDISK_COMPACT_KILL_AT=count $VDISK compact w.qcow2 > /dev/null 2> rerun.out
forced=$(sed -n 's/^compact: \([0-9]*\) clusters move for their COPIED flag$/\1/p' rerun.out | head -1)
[ "${forced:-0}" -gt 0 ] || fail "split: no cluster moved for its COPIED flag: $(cat rerun.out)"
check_clean w.qcow2
views_equal w.qcow2 a.qcow2.before
# The rerun packed what those moves left (a second pass): nothing left.
$VDISK compact --output=json w.qcow2 | grep -q '"moved-clusters": 0$' ||
    fail "split: the rerun left clusters to move"

# ---- B: refcount blocks and the refcount table ----
$QEMU_IMG create -q -f qcow2 base.qcow2 2M
qio base.qcow2 "write -P 200 0 2M"
$QEMU_IMG create -q -f qcow2 -b "$PWD/base.qcow2" -F qcow2 \
    -o cluster_size=512,refcount_bits=64 b.qcow2 2M
$QEMU_IMG bitmap --add -g 4096 b.qcow2 bm0
qio b.qcow2 "write -P 1 0 2M"
$QEMU_IMG snapshot -c s1 b.qcow2
qio b.qcow2 "write -P 2 0 1536k" "write -P 3 1536k 256k"
$QEMU_IMG snapshot -c s2 b.qcow2
qio b.qcow2 "write -P 4 512k 128k" "discard 1M 128k" "write -z 1536k 64k"
$QEMU_IMG snapshot -d s1 b.qcow2
check_clean b.qcow2 leaks-ok
crash_points b.qcow2 refblocks-move:2 refblocks-move:4 refblocks-move:6 \
    reftable-move:2 reftable-move:5
