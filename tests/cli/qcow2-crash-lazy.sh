#!/usr/bin/env bash
# qcow2 crash points with lazy_refcounts=on: the power is cut after the
# N-th write of a write/flush workload (blkdebug, as qcow2-crash-points.sh,
# with the writes since the last flush kept, lost or randomly lost). With
# lazy refcounts the refcounts on disk may lag behind the L2 tables, so
# the image may be dirty and `qemu-img check` may report corruption; what
# must hold is what QEMU promises: `qemu-img check -r all` and `vdisk
# check -r all` repair it (clean afterwards), a read-write open repairs
# it the same way, and every cycle acknowledged by a flush reads back.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/qcow2-crash-functions.bash"
requires qemu-img python3
tmpdir

CYCLES=30
modes=(keep drop random)
dirty_seen=0

dirty() { $QEMU_IMG info --output=json -U "$1" |
          python3 -c 'import json,sys; print(json.load(sys.stdin)["dirty-flag"])'; }

for opts in lazy_refcounts=on,cluster_size=4k \
            lazy_refcounts=on,cluster_size=64k,extended_l2=on; do
    seed=${#opts}
    crash_gen "$seed" "$CYCLES" >cmds
    crash_load_args cmds

    # Count the writes the workload makes to the file.
    writes=$(crash_count_writes "$opts")
    [ -n "$writes" ] && [ "$writes" -gt 10 ] || fail "no write count from blkdebug"

    step=$(( (writes + 7) / 8 ))
    for ((n = 1; n <= writes; n += step)); do
        mode=${modes[n % 3]}
        crash_at "$opts" $n $mode
        [ "$(dirty img.qcow2)" = True ] && dirty_seen=$((dirty_seen + 1))

        for how in qemu-check vdisk-check vdisk-open; do
            cp img.qcow2 fix.qcow2
            case $how in
            qemu-check) $QEMU_IMG check -r all fix.qcow2 >fix.out 2>&1 ||
                            { cat fix.out; fail "qemu-img check -r all failed after write $n"; } ;;
            vdisk-check) "$VDISK" check -r all fix.qcow2 >fix.out 2>&1 ||
                            { cat fix.out; fail "vdisk check -r all failed after write $n ($mode, $opts)"; } ;;
            vdisk-open) "$VDISK" io -c flush fix.qcow2 >fix.out 2>&1 ||
                            { cat fix.out; fail "vdisk io could not open the image after write $n ($mode, $opts)"; } ;;
            esac
            $QEMU_IMG check fix.qcow2 >check.out 2>&1 ||
                { cat check.out; fail "$how left corruption after write $n ($mode, $opts)"; }
            [ "$(dirty fix.qcow2)" = False ] ||
                fail "$how left the dirty bit after write $n ($mode, $opts)"
            crash_verify "$seed" "$CYCLES" out fix.qcow2 >verify.out ||
                fail "crash after write $n ($mode, $opts, $how): flushed data lost"
        done
    done
    echo "$opts: $writes writes, crash points every $step: ok"
done
# The deferral is exercised: some crashes hit a dirty image.
[ "$dirty_seen" -gt 0 ] || fail "no crash point left a dirty image"
echo "dirty images after a crash: $dirty_seen"
