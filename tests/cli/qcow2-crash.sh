#!/usr/bin/env bash
# qcow2 crash safety under kill -9: `vdisk io` runs write/flush cycles on
# a qcow2 image (new L2 tables, refcount updates, zero writes, discards)
# and is killed at a random moment. Whatever the writer saw acknowledged
# by a flush must read back, and `qemu-img check` may find leaked
# clusters but no corruption. The kill only loses what the driver held
# in memory (the page cache survives), so this tests the order in which
# the driver writes its metadata, for several cluster sizes.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/qcow2-crash-functions.bash"
requires qemu-img python3 stdbuf
tmpdir

CYCLES=2000
round=0
for opts in cluster_size=512 cluster_size=4k,refcount_bits=1 \
            cluster_size=64k,extended_l2=on compat=0.10,cluster_size=4k; do
    # An uninterrupted run gives the duration T that the kills aim into.
    crash_gen 0 "$CYCLES" >cmds
    crash_load_args cmds
    rm -f img.qcow2
    "$VDISK" create -q -f qcow2 -o "$opts" img.qcow2 "$CRASH_IMG_SIZE"
    t0=$(date +%s%N)
    "$VDISK" io -f qcow2 "${ARGS[@]}" img.qcow2 >out 2>&1
    t_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    crash_check_clean img.qcow2
    crash_verify 0 "$CYCLES" out img.qcow2
    for seed in 1 2 3 4; do
        round=$((round + 1))
        rm -f img.qcow2 out
        "$VDISK" create -q -f qcow2 -o "$opts" img.qcow2 "$CRASH_IMG_SIZE"
        crash_gen "$seed" "$CYCLES" >cmds
        crash_load_args cmds
        # Unbuffered output: every line the writer printed before the kill
        # is in the file, in order.
        stdbuf -o0 -e0 "$VDISK" io -f qcow2 "${ARGS[@]}" img.qcow2 \
            >out 2>&1 &
        pid=$!
        # A different moment each round, between 5% and 95% of T.
        ms=$(( t_ms * ((round * 37) % 90 + 5) / 100 ))
        sleep "$((ms / 1000)).$(printf '%03d' $((ms % 1000)))"
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        crash_check_clean img.qcow2
        crash_verify "$seed" "$CYCLES" out img.qcow2
    done
done
