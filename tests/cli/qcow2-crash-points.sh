#!/usr/bin/env bash
# qcow2 crash-point loop (power loss simulation): a write/flush workload
# runs through the blkdebug filter, which cuts the power right after the
# N-th write reached the disk, for N from 1 to the workload's number of
# writes (with a stride that keeps about 30 points per configuration).
# At the cut, the writes since the last completed flush are all kept, all
# lost, or a random subset is lost (blkdebug's crash-unflushed), as a
# disk with a volatile write cache may do. Afterwards `qemu-img check`
# may find leaks but no corruption, and every cycle acknowledged by a
# flush before the cut must read back. This checks the driver's metadata
# write order and its flushes between dependent writes.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/qcow2-crash-functions.bash"
requires qemu-img python3
tmpdir

CYCLES=60
modes=(keep drop random)

for opts in cluster_size=512 cluster_size=4k,refcount_bits=1 \
            cluster_size=64k,extended_l2=on compat=0.10,cluster_size=4k; do
    seed=${#opts}
    crash_gen "$seed" "$CYCLES" >cmds
    crash_load_args cmds

    # Count the writes the workload makes to the file.
    writes=$(crash_count_writes "$opts")
    [ -n "$writes" ] && [ "$writes" -gt 10 ] || fail "no write count from blkdebug"
    crash_verify "$seed" "$CYCLES" out img.qcow2 >/dev/null

    step=$(( (writes + 29) / 30 ))
    for ((n = 1; n <= writes; n += step)); do
        mode=${modes[n % 3]}
        crash_at "$opts" $n $mode
        crash_check_clean img.qcow2 || fail "crash after write $n ($mode, $opts)"
        crash_verify "$seed" "$CYCLES" out img.qcow2 >verify.out ||
            fail "crash after write $n ($mode, $opts): flushed data lost"
    done
    echo "$opts: $writes writes, crash points every $step: ok"
done
