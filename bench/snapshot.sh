#!/usr/bin/env bash
# qcow2 internal snapshot create, apply and delete: vdisk against
# qemu-img 7.2 side by side on a 64 GiB virtual image.
#
#   bench/snapshot.sh [RUNS]      (default 5 runs per tool and operation)
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
alloc=${BENCH_ALLOC:-8G}
dir=${BENCH_DIR:-/var/tmp}
here=$(cd "$(dirname "$0")/.." && pwd)
VDISK=${VDISK:-$(ls "$here"/build*/tools/vdisk 2>/dev/null | head -1)}
[ -x "$VDISK" ] || { echo "set VDISK=path/to/vdisk" >&2; exit 1; }
command -v qemu-img >/dev/null || { echo "needs qemu-img" >&2; exit 1; }

work=$(mktemp -d "$dir/vdisk-snapbench.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"

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

now() { date +%s.%N; }
declare -A times
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
            sync
            t0=$(now)
            "$prog" snapshot "${args[@]}" "$img"
            t1=$(now)
            times[$tool.$op]+="$(echo "$t1 - $t0" | bc) "
        done
    done
done
qemu-img check q.qcow2 >/dev/null && qemu-img check v.qcow2 >/dev/null ||
    { echo "an image is not clean after the runs" >&2; exit 1; }

median() { tr ' ' '\n' | grep . | sort -n | awk '{ v[NR] = $1 }
    END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

printf "%-8s %12s %12s %8s   (64 GiB virtual, %s allocated, %d runs)\n" \
       op "qemu-img s" "vdisk s" ratio "$alloc" "$runs"
for op in create apply delete; do
    q=$(echo "${times[qemu.$op]}" | median)
    v=$(echo "${times[vdisk.$op]}" | median)
    printf "%-8s %12.4f %12.4f %8.2f\n" $op "$q" "$v" "$(echo "$q / $v" | bc -l)"
done
