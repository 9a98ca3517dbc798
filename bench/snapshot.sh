#!/usr/bin/env bash
# qcow2 internal snapshot create, apply and delete: vdisk against
# qemu-img 7.2 side by side, in two cases.
#
#   bench/snapshot.sh [RUNS] [CASE...]   (default 5 runs; cases: cycle
#                                         diverged, default both)
#
# cycle: a 64 GiB virtual image, one snapshot created, applied and deleted
# per run (below).
#
# diverged: apply and delete of a snapshot the active layer has moved
# away from, as a guest leaves it: a 20 GiB image with 4 GiB allocated
# (64 chunks of 64 MiB), a snapshot, then 256 MiB diverged (4096 whole
# 64 KiB clusters at random places, written in random order, so that
# their host clusters lie side by side in an order unrelated to the
# guest's). Every timed run starts from a fresh copy of that image (it
# needs 3 copies of 4.3 GiB at once in BENCH_DIR; /dev/shm is fast if it
# has the room); the first reverted images of both tools are compared
# with qemu-img compare, and qemu-img check must find every image clean.
#
# BENCH_ALLOC sets how much data is allocated (default 8G, spread over the
# disk in 64 chunks; BENCH_ALLOC=1G for a quick run), BENCH_DIR the
# scratch directory (default /var/tmp), VDISK the binary (default
# build*/tools/vdisk). Each run is create, apply, delete of one snapshot
# on an image that already holds one older snapshot (so apply and delete
# really move references), timed with the wall clock of the whole command
# (open and close included, for both tools). The table shows the medians
# and the ratio qemu time / vdisk time (above 1: vdisk is faster).
set -e -o pipefail

runs=${1:-5}
shift || true
cases=${*:-cycle diverged}
alloc=${BENCH_ALLOC:-8G}
dir=${BENCH_DIR:-/var/tmp}
here=$(cd "$(dirname "$0")/.." && pwd)
VDISK=${VDISK:-$(ls "$here"/build*/tools/vdisk 2>/dev/null | head -1)}
[ -x "$VDISK" ] || { echo "set VDISK=path/to/vdisk" >&2; exit 1; }
VDISK=$(realpath "$VDISK")
command -v qemu-img >/dev/null || { echo "needs qemu-img" >&2; exit 1; }

work=$(mktemp -d "$dir/vdisk-snapbench.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"

now() { date +%s.%N; }
median() { tr ' ' '\n' | grep . | sort -n | awk '{ v[NR] = $1 }
    END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# Times "$@" (one snapshot command) into times[$key].
timed() {
    local key=$1 t0 t1
    shift
    sync
    t0=$(now)
    "$@"
    t1=$(now)
    times[$key]+="$(echo "$t1 - $t0" | bc) "
}

cycle() {
    bytes=$(numfmt --from=iec "$alloc")
    chunk=$((bytes / 64))
    echo "preparing a 64 GiB image with $alloc allocated ($((chunk >> 20)) MiB" \
         "every GiB)..." >&2
    qemu-img create -f qcow2 base.qcow2 64G >/dev/null
    cmds=()
    for i in $(seq 0 63); do
        cmds+=(-c "write -P $((i + 1)) $((i << 30)) $chunk")
    done
    qemu-io "${cmds[@]}" base.qcow2 >/dev/null
    qemu-img snapshot -c old base.qcow2
    qemu-io -c "write -P 99 0 $chunk" base.qcow2 >/dev/null
    cp base.qcow2 q.qcow2
    cp base.qcow2 v.qcow2

    local -A times
    for run in $(seq "$runs"); do
        for tool in qemu vdisk; do
            if [ $tool = qemu ]; then prog=qemu-img; img=q.qcow2
            else prog=$VDISK; img=v.qcow2; fi
            for op in create apply delete; do
                case $op in
                    create) args=(-c new) ;;
                    apply)  args=(-a new) ;;
                    delete) args=(-d new) ;;
                esac
                timed $tool.$op "$prog" snapshot "${args[@]}" "$img"
            done
        done
    done
    qemu-img check q.qcow2 >/dev/null && qemu-img check v.qcow2 >/dev/null ||
        { echo "an image is not clean after the runs" >&2; exit 1; }

    printf "%-8s %12s %12s %8s   (64 GiB virtual, %s allocated, %d runs)\n" \
           op "qemu-img s" "vdisk s" ratio "$alloc" "$runs"
    for op in create apply delete; do
        q=$(echo "${times[qemu.$op]}" | median)
        v=$(echo "${times[vdisk.$op]}" | median)
        printf "%-8s %12.4f %12.4f %8.2f\n" $op "$q" "$v" "$(echo "$q / $v" | bc -l)"
    done
    rm -f base.qcow2 q.qcow2 v.qcow2
}

diverged() {
    local -A times
    local step=320 i cmds=()
    echo "preparing a 20 GiB image, 4 GiB allocated, a snapshot, 256 MiB" \
         "diverged..." >&2
    qemu-img create -f qcow2 base.qcow2 20G >/dev/null
    for i in $(seq 0 63); do
        cmds+=(-c "write -P $((i + 1)) $((i * step))M 64M")
    done
    qemu-io "${cmds[@]}" base.qcow2 >/dev/null
    qemu-img snapshot -c snap base.qcow2
    # 4096 distinct clusters of the 65536 allocated, in a fixed random
    # order (one qemu-io process reading its commands from stdin).
    seq 0 65535 | shuf -n 4096 --random-source=<(yes 42) |
        awk -v step=$step '{ printf "write -P 200 %d 64k\n",
            (int($1 / 1024) * step * 1048576) + ($1 % 1024) * 65536 }' |
        qemu-io base.qcow2 >/dev/null
    for run in $(seq "$runs"); do
        for op in apply delete; do
            [ $op = apply ] && flag=-a || flag=-d
            cp --sparse=always base.qcow2 q.qcow2
            timed qemu.$op qemu-img snapshot $flag snap q.qcow2
            qemu-img check q.qcow2 >/dev/null ||
                { echo "qemu-img's image is not clean after $op" >&2; exit 1; }
            [ "$run$op" = 1apply ] || rm q.qcow2
            cp --sparse=always base.qcow2 v.qcow2
            timed vdisk.$op "$VDISK" snapshot $flag snap v.qcow2
            qemu-img check v.qcow2 >/dev/null ||
                { echo "vdisk's image is not clean after $op" >&2; exit 1; }
            if [ "$run$op" = 1apply ]; then
                qemu-img compare q.qcow2 v.qcow2 >/dev/null ||
                    { echo "the reverted images differ" >&2; exit 1; }
                rm q.qcow2
            fi
            rm v.qcow2
        done
    done
    rm -f base.qcow2
    printf "%-8s %12s %12s %8s   (20 GiB virtual, 4 GiB allocated, 256 MiB" \
           op "qemu-img s" "vdisk s" ratio
    printf " diverged, %d runs)\n" "$runs"
    for op in apply delete; do
        q=$(echo "${times[qemu.$op]}" | median)
        v=$(echo "${times[vdisk.$op]}" | median)
        printf "%-8s %12.4f %12.4f %8.2f\n" $op "$q" "$v" \
               "$(echo "$q / $v" | bc -l)"
    done
}

for c in $cases; do
    case $c in
        cycle|diverged) $c ;;
        *) echo "unknown case $c (cycle, diverged)" >&2; exit 1 ;;
    esac
done
