#!/usr/bin/env bash
# qed conversion benchmark, qemu-img and vdisk side by side in one run:
# a 2 GiB sparse raw image (1 MiB of data in every 16 MiB) is
# converted to qed (default options) and the result back to raw, REPS
# times per tool, alternating. The table gives the medians of the wall
# time, the ratio qemu time / vdisk time (above 1: vdisk is faster) and
# each tool's peak RSS (the largest of its runs, GNU time's %M).
#
#   bench/fmt-qed.sh                 SIZE=2G REPS=3
#
# The source: SIZE of raw with 1 MiB of random data at the start of every
# 16 MiB (1/16 data, the rest holes). Every conversion is checked with
# qemu-img compare against the source once per tool.
# VDISK (default build*/tools/vdisk), QEMU_IMG, BENCH_DIR (default
# /var/tmp; needs about 3/16 of SIZE per image), BENCH_KEEP=1 keeps them.
set -u -o pipefail

here=$(cd "$(dirname "$0")" && pwd)
srcdir=$(dirname "$here")
QEMU_IMG=${QEMU_IMG:-qemu-img}
SIZE=${SIZE:-2G}
REPS=${REPS:-3}
if [ -z "${VDISK:-}" ]; then
    for c in "$srcdir"/build/tools/vdisk "$srcdir"/build*/tools/vdisk; do
        if [ -x "$c" ]; then VDISK=$c; break; fi
    done
fi
VDISK=${VDISK:-vdisk}
command -v /usr/bin/time > /dev/null || { echo "needs GNU time" >&2; exit 1; }

dir=$(mktemp -d "${BENCH_DIR:-/var/tmp}/vdisk-qed-bench.XXXXXX")
[ "${BENCH_KEEP:-0}" = 1 ] || trap 'rm -rf "$dir"' EXIT
cd "$dir" || exit 1

size_b=$(numfmt --from=iec "$SIZE")
truncate -s "$size_b" src.raw
for ((off = 0; off < size_b; off += 16 << 20)); do
    head -c $((1 << 20)) /dev/urandom |
        dd of=src.raw bs=1M seek=$((off >> 20)) conv=notrunc status=none
done

# run TOOL OUT ARGS...: wall seconds and peak KiB on one line
run()
{
    local tool=$1 out=$2
    shift 2
    local t0 t1
    rm -f "$out"
    # GNU time's %e has 10 ms steps, too coarse for these 50 ms runs: the
    # wall time comes from the clock, the peak RSS from time.
    t0=$(date +%s.%N)
    /usr/bin/time -f '%M' -o t.out "$tool" "$@" > /dev/null 2> err.out ||
        { echo "FAILED: $tool $*: $(cat err.out)" >&2; echo "nan 0"; return; }
    t1=$(date +%s.%N)
    echo "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f", b - a }') $(cat t.out)"
}

median()
{
    sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2];
                    else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

declare -A times rss
for case in to-qed to-raw; do
    for tool in qemu vdisk; do
        times[$case.$tool]=""
        rss[$case.$tool]=0
    done
done
"$QEMU_IMG" convert -O qed src.raw ref.qed
for ((i = 0; i < REPS; i++)); do
    for tool in qemu vdisk; do
        bin=$QEMU_IMG
        [ $tool = vdisk ] && bin=$VDISK
        sync
        read -r t m < <(run "$bin" out.qed convert -O qed src.raw out.qed)
        times[to-qed.$tool]+="$t "
        [ "$m" -gt "${rss[to-qed.$tool]}" ] && rss[to-qed.$tool]=$m
        if [ "$i" = 0 ]; then
            "$QEMU_IMG" compare src.raw out.qed > /dev/null ||
                echo "FAILED: $tool's qed differs from the source" >&2
        fi
        sync
        read -r t m < <(run "$bin" out.raw convert -O raw ref.qed out.raw)
        times[to-raw.$tool]+="$t "
        [ "$m" -gt "${rss[to-raw.$tool]}" ] && rss[to-raw.$tool]=$m
        if [ "$i" = 0 ]; then
            cmp -s src.raw out.raw ||
                echo "FAILED: $tool's raw differs from the source" >&2
        fi
    done
done

printf '%-22s %10s %10s %7s %12s %12s\n' case "qemu s" "vdisk s" ratio \
    "qemu KiB" "vdisk KiB"
for case in to-qed to-raw; do
    q=$(tr ' ' '\n' <<< "${times[$case.qemu]}" | grep . | median)
    v=$(tr ' ' '\n' <<< "${times[$case.vdisk]}" | grep . | median)
    r=$(awk -v q="$q" -v v="$v" 'BEGIN { if (v > 0) printf "%.2f", q / v;
                                         else print "nan" }')
    printf '%-22s %10s %10s %7s %12s %12s\n' "convert $case ($SIZE)" "$q" \
        "$v" "$r" "${rss[$case.qemu]}" "${rss[$case.vdisk]}"
done
