#!/usr/bin/env bash
# Backing-chain benchmarks, qemu-img and vdisk side by side in one run:
#
#   commit    a SIZE overlay with ALLOC allocated (16 runs spread over the
#             disk) over a SIZE base with ALLOC of data: qemu-img commit vs
#             vdisk commit (the overlay is emptied afterwards: both do it)
#   rebase    safe rebase of the same overlay onto a second base that
#             differs from the first in a quarter of its data: every
#             unallocated range of the overlay is read through both chains
#             and compared (qemu-img rebase -b vs vdisk rebase -b)
#   read-seq  sequential 1 MiB reads of the whole ALLOC region through a
#             chain of depth 10 (each layer holds a tenth): qemu-img bench
#             vs vdisk bench
#   read-4k   random-ish 4 KiB reads (qemu-img bench -S step) through the
#             same chain
#
# Each case runs REPS times per tool, alternating, on fresh copies of the
# images (copying is outside the timing); the table gives the medians and
# the ratio qemu time / vdisk time (above 1: vdisk is faster).
#
#   bench/chain.sh                 SIZE=4G ALLOC=1G REPS=3
#   SIZE=1G ALLOC=256M bench/chain.sh    (when time or disk is short)
#
# VDISK (default build*/tools/vdisk), QEMU_IMG, QEMU_IO, BENCH_DIR (default
# /var/tmp; needs about 6*ALLOC of space), BENCH_KEEP=1 keeps the files.
set -u -o pipefail

here=$(cd "$(dirname "$0")" && pwd)
srcdir=$(dirname "$here")
QEMU_IMG=${QEMU_IMG:-qemu-img}
QEMU_IO=${QEMU_IO:-qemu-io}
SIZE=${SIZE:-4G}
ALLOC=${ALLOC:-1G}
REPS=${REPS:-3}
if [ -z "${VDISK:-}" ]; then
    for c in "$srcdir"/build/tools/vdisk "$srcdir"/build*/tools/vdisk; do
        if [ -x "$c" ]; then VDISK=$c; break; fi
    done
fi
VDISK=${VDISK:-vdisk}

bytes() { numfmt --from=iec "$1"; }
size_b=$(bytes "$SIZE")
alloc_b=$(bytes "$ALLOC")
piece=$((alloc_b / 16))
stride=$((size_b / 16))

dir=$(mktemp -d "${BENCH_DIR:-/var/tmp}/vdisk-chain-bench.XXXXXX")
[ "${BENCH_KEEP:-0}" = 1 ] || trap 'rm -rf "$dir"' EXIT
cd "$dir" || exit 1
log=$dir/log

now() { date +%s.%N; }
elapsed() { echo "$2 - $1" | bc; }
median()
{
    sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2];
                    else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

echo "preparing images in $dir (SIZE=$SIZE ALLOC=$ALLOC)" >&2
$QEMU_IMG create -q -f qcow2 base.qcow2 "$SIZE"
$QEMU_IO -c "write -P 1 0 $alloc_b" base.qcow2 >>"$log"
cp --sparse=always base.qcow2 base2.qcow2
$QEMU_IO -c "write -P 3 0 $((alloc_b / 4))" base2.qcow2 >>"$log"
$QEMU_IMG create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
cmds=()
for i in $(seq 0 15); do
    cmds+=(-c "write -P 2 $((i * stride)) $piece")
done
$QEMU_IO "${cmds[@]}" top.qcow2 >>"$log"

# The depth-10 chain for reads: layer i holds the i-th tenth of ALLOC.
tenth=$((alloc_b / 10 / 65536 * 65536))
$QEMU_IMG create -q -f qcow2 c0.qcow2 "$SIZE"
$QEMU_IO -c "write -P 10 0 $tenth" c0.qcow2 >>"$log"
for i in $(seq 1 9); do
    $QEMU_IMG create -q -f qcow2 -b c$((i - 1)).qcow2 -F qcow2 c$i.qcow2
    $QEMU_IO -c "write -P $((10 + i)) $((i * tenth)) $tenth" c$i.qcow2 >>"$log"
done

declare -A result
run_case()   # NAME PREPARE-FUNCTION QEMU-CMD... -- VDISK-CMD...
{
    local name=$1 prep=$2 qcmd=() vcmd=() seen=0 a
    shift 2
    for a in "$@"; do
        if [ "$a" = -- ]; then seen=1; continue; fi
        if [ $seen = 0 ]; then qcmd+=("$a"); else vcmd+=("$a"); fi
    done
    local qt=() vt=() t0 t1 r
    for r in $(seq "$REPS"); do
        $prep
        t0=$(now); "${qcmd[@]}" >>"$log" 2>&1 || { result[$name]=FAILED; return; }
        t1=$(now); qt+=("$(elapsed "$t0" "$t1")")
        $prep
        t0=$(now); "${vcmd[@]}" >>"$log" 2>&1 || { result[$name]=FAILED; return; }
        t1=$(now); vt+=("$(elapsed "$t0" "$t1")")
    done
    local qm vm
    qm=$(printf '%s\n' "${qt[@]}" | median)
    vm=$(printf '%s\n' "${vt[@]}" | median)
    result[$name]=$(printf '%8.3f s %8.3f s %6.2fx' "$qm" "$vm" \
                    "$(echo "$qm / $vm" | bc -l)")
}

fresh()
{
    cp --sparse=always base.qcow2 w-base.qcow2
    cp --sparse=always base2.qcow2 w-base2.qcow2
    cp --sparse=always top.qcow2 w-top.qcow2
    $QEMU_IMG rebase -u -b w-base.qcow2 -F qcow2 w-top.qcow2
    sync
}
none() { :; }

run_case commit fresh $QEMU_IMG commit -q w-top.qcow2 -- \
    "$VDISK" commit -q w-top.qcow2
run_case rebase fresh $QEMU_IMG rebase -b w-base2.qcow2 -F qcow2 w-top.qcow2 -- \
    "$VDISK" rebase -b w-base2.qcow2 -F qcow2 w-top.qcow2
nreq=$((tenth * 10 / 1048576))
run_case read-seq none $QEMU_IMG bench -c "$nreq" -d 8 -s 1M -f qcow2 c9.qcow2 -- \
    "$VDISK" bench -c "$nreq" -d 8 -s 1M -f qcow2 c9.qcow2
run_case read-4k none $QEMU_IMG bench -c 100000 -d 1 -s 4k -S 12k -f qcow2 c9.qcow2 -- \
    "$VDISK" bench -c 100000 -d 1 -s 4k -S 12k -f qcow2 c9.qcow2

printf '%-10s %10s %10s %7s   (SIZE=%s ALLOC=%s, median of %s)\n' case \
    qemu-img vdisk ratio "$SIZE" "$ALLOC" "$REPS"
for c in commit rebase read-seq read-4k; do
    printf '%-10s %s\n' "$c" "${result[$c]}"
done
