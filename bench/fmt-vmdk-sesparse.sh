#!/usr/bin/env bash
# vmdk seSparse read: convert a 2 GiB seSparse image (ESXi's layout,
# 256 MiB of data in 32 runs of 8 MiB spread over the disk, plus zeroed
# grains) to raw, vdisk against qemu-img 7.2 side by side. qemu-img
# cannot create seSparse images: tests/cli/fmt-functions.bash's
# sesparsegen writes it.
#
#   bench/fmt-vmdk-sesparse.sh [RUNS]      (default 3 runs per tool)
#
# BENCH_DIR is the scratch directory (default /var/tmp), VDISK the binary
# (default build*/tools/vdisk). Each run is timed with the wall clock of
# the whole command; the table shows the medians, the ratio qemu time /
# vdisk time (above 1: vdisk is faster) and each tool's largest peak RSS
# (GNU time's %M).
set -e -o pipefail

runs=${1:-3}
dir=${BENCH_DIR:-/var/tmp}
# The release build, not the first build* that ls finds (build-asan).
source "$(dirname "$0")/functions.bash"
here=$srcdir
command -v qemu-img >/dev/null || { echo "needs qemu-img" >&2; exit 1; }
command -v python3 >/dev/null || { echo "needs python3" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "needs GNU time (/usr/bin/time)" >&2; exit 1; }

work=$(mktemp -d "$dir/vdisk-sesparsebench.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"

echo "writing a 2 GiB seSparse image with 256 MiB of data..." >&2
# shellcheck source=../tests/cli/fmt-functions.bash
source "$here/tests/cli/fmt-functions.bash"
sesparsegen
python3 - <<'PYEOF'
from sesparse import *
data, zero = {}, []
for i in range(32):
    first = i << 14                      # every 64 MiB
    for g in range(first, first + 2048):  # 8 MiB
        data[g] = bytes([i + 1]) * 4095 + bytes([g & 0xff])
    zero += range(first + 2048, first + 2056)
sesparse('src', 4 << 20, data=data, zero=zero)
PYEOF

declare -A times rss
# run TOOL ARGS...: one timed run of qemu-img or vdisk.
run() {
    local tool=$1 prog m t0 t1
    shift
    [ "$tool" = qemu ] && prog=qemu-img || prog=$VDISK
    t0=$(date +%s.%N)
    /usr/bin/time -f %M -o rss.txt "$prog" "$@"
    t1=$(date +%s.%N)
    times[$tool]+="$(echo "$t1 - $t0" | bc) "
    m=$(cat rss.txt)
    [ "${rss[$tool]:-0}" -ge "$m" ] || rss[$tool]=$m
}

for _ in $(seq "$runs"); do
    for tool in qemu vdisk; do
        rm -f $tool.raw
        run $tool convert -f vmdk -O raw src.vmdk $tool.raw
    done
    cmp qemu.raw vdisk.raw >/dev/null ||
        { echo "the two tools read differently" >&2; exit 1; }
done

median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
printf '%-14s %10s %10s %7s %12s %12s\n' case qemu-s vdisk-s ratio \
    qemu-rss-KiB vdisk-rss-KiB
q=$(echo "${times[qemu]}" | median)
v=$(echo "${times[vdisk]}" | median)
printf '%-14s %10.3f %10.3f %7.2f %12s %12s\n' sesparse-to-raw "$q" "$v" \
    "$(echo "$q / $v" | bc -l)" "${rss[qemu]}" "${rss[vdisk]}"
