#!/usr/bin/env bash
# vmdk: convert a 2 GiB sparse raw image (256 MiB of data in 32 chunks
# spread over the disk) to a monolithicSparse and to a streamOptimized
# vmdk (zlib-compressed grains) and back, vdisk against qemu-img 7.2 side
# by side.
#
#   bench/fmt-vmdk.sh [RUNS]      (default 3 runs per tool and case)
#
# BENCH_DIR is the scratch directory (default /var/tmp), VDISK the binary
# (default build*/tools/vdisk). Each case is timed with the wall clock of
# the whole command, the page cache dropped only by the file system's own
# doing (both tools run alternately on the same files). The table shows
# the medians, the ratio qemu time / vdisk time (above 1: vdisk is
# faster) and each tool's largest peak RSS (GNU time's %M).
set -e -o pipefail

runs=${1:-3}
dir=${BENCH_DIR:-/var/tmp}
# The release build, not the first build* that ls finds (build-asan).
source "$(dirname "$0")/functions.bash"
here=$srcdir
command -v qemu-img >/dev/null || { echo "needs qemu-img" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "needs GNU time (/usr/bin/time)" >&2; exit 1; }

work=$(mktemp -d "$dir/vdisk-vmdkbench.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"

echo "preparing a 2 GiB sparse raw image with 256 MiB of data..." >&2
qemu-img create -f raw src.raw 2G >/dev/null
cmds=()
for i in $(seq 0 31); do
    cmds+=(-c "write -P $((i + 1)) $((i << 26)) 8M")
done
qemu-io -f raw "${cmds[@]}" src.raw >/dev/null

declare -A times rss
# run TOOL CASE ARGS...: one timed run of qemu-img or vdisk.
run() {
    local tool=$1 case=$2 prog m t0 t1
    shift 2
    [ "$tool" = qemu ] && prog=qemu-img || prog=$VDISK
    t0=$(date +%s.%N)
    /usr/bin/time -f %M -o rss.txt "$prog" "$@"
    t1=$(date +%s.%N)
    times[$tool.$case]+="$(echo "$t1 - $t0" | bc) "
    m=$(cat rss.txt)
    [ "${rss[$tool.$case]:-0}" -ge "$m" ] || rss[$tool.$case]=$m
}

cases="to-sparse from-sparse to-stream from-stream"
for r in $(seq "$runs"); do
    for tool in qemu vdisk; do
        rm -f $tool.vmdk $tool-s.vmdk $tool.raw
        run $tool to-sparse convert -f raw -O vmdk src.raw $tool.vmdk
        run $tool from-sparse convert -f vmdk -O raw $tool.vmdk $tool.raw
        rm -f $tool.raw
        run $tool to-stream convert -f raw -O vmdk \
            -o subformat=streamOptimized src.raw $tool-s.vmdk
        run $tool from-stream convert -f vmdk -O raw $tool-s.vmdk $tool.raw
    done
    cmp qemu.raw vdisk.raw >/dev/null ||
        { echo "the two tools' round trips differ" >&2; exit 1; }
done

median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
printf '%-14s %10s %10s %7s %12s %12s\n' case qemu-s vdisk-s ratio \
    qemu-rss-KiB vdisk-rss-KiB
for c in $cases; do
    q=$(echo "${times[qemu.$c]}" | median)
    v=$(echo "${times[vdisk.$c]}" | median)
    printf '%-14s %10.3f %10.3f %7.2f %12s %12s\n' "$c" "$q" "$v" \
        "$(echo "$q / $v" | bc -l)" "${rss[qemu.$c]}" "${rss[vdisk.$c]}"
done
