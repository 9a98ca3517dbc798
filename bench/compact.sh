#!/usr/bin/env bash
# vdisk compact of a 4 GiB qcow2 with 50% holes against qemu-img convert
# -O qcow2 of the same image (issue 18's target: compact at least as fast
# as convert). The image: 4 GiB written, then every other 1 MiB piece
# discarded (2 GiB of data left, holes all over the file). Each run times
# vdisk compact of a fresh copy (the copy itself not timed) and qemu-img
# convert -O qcow2 of the image to a new file; both end with the data on
# disk (compact flushes between its phases, convert closes its target
# with a flush). Prints both times, the ratio and the resulting sizes;
# medians of BENCH_RUNS (3). Needs qemu-img, qemu-io and about 7 GiB free
# in BENCH_DIR (default /var/tmp).
#
#   bench/compact.sh        # BENCH_SIZE (4G), BENCH_RUNS (3)
set -u -o pipefail

source "$(dirname "$0")/functions.bash"
runs=${BENCH_RUNS:-3}
size=${BENCH_SIZE:-4G}
work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/vdisk-compact-bench.XXXXXX") || exit 2
trap 'rm -rf "$work"' EXIT
cd "$work" || exit 2

bytes=$(numfmt --from=iec "$size")
mib=$((bytes >> 20))
echo "preparing a $size image, every other MiB discarded..." >&2
qemu-img create -q -f qcow2 img.qcow2 "$size" || exit 1
cmds=()
for ((i = 0; i < mib; i += 256)); do
    cmds+=(-c "write -P $((i / 256 % 250 + 1)) ${i}M 256M")
done
qemu-io "${cmds[@]}" img.qcow2 >/dev/null || exit 1
cmds=()
for ((i = 0; i < mib; i += 2)); do
    cmds+=(-c "discard ${i}M 1M")
done
qemu-io "${cmds[@]}" img.qcow2 >/dev/null || exit 1
qemu-img check -q img.qcow2 || exit 1

now() { date +%s.%N; }
median() { sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

tc=() tq=()
for ((r = 0; r < runs; r++)); do
    cp --sparse=always img.qcow2 c.qcow2 && sync c.qcow2
    t0=$(now)
    "$VDISK" compact -q c.qcow2 || exit 1
    t1=$(now)
    rm -f q.qcow2
    t2=$(now)
    qemu-img convert -O qcow2 img.qcow2 q.qcow2 || exit 1
    t3=$(now)
    tc+=("$(echo "$t1 - $t0" | bc)")
    tq+=("$(echo "$t3 - $t2" | bc)")
done
qemu-img check -q c.qcow2 || { echo "compacted image fails check" >&2; exit 1; }
qemu-img compare -q img.qcow2 c.qcow2 || { echo "compacted image differs" >&2; exit 1; }
mc=$(printf '%s\n' "${tc[@]}" | median)
mq=$(printf '%s\n' "${tq[@]}" | median)
printf 'image: %s virtual, %s bytes before\n' "$size" "$(stat -c %s img.qcow2)"
printf '%-28s %8.2f s  -> %s bytes\n' "vdisk compact" "$mc" "$(stat -c %s c.qcow2)"
printf '%-28s %8.2f s  -> %s bytes\n' "qemu-img convert -O qcow2" "$mq" "$(stat -c %s q.qcow2)"
printf 'ratio compact/convert: %.2f (target <= 1)\n' "$(echo "$mc / $mq" | bc -l)"
