#!/usr/bin/env bash
# vhdx: vdisk against qemu-img 7.2 converting a 2 GiB sparse raw image
# (256 MiB of data in 32 chunks over the disk) to a dynamic and to a
# fixed VHDX and back to raw.
#
#   bench/fmt-vhdx.sh [RUNS]      (default 3 runs per tool and case)
#
# BENCH_DIR: scratch directory (default /var/tmp); VDISK: the binary
# (default the first build*/tools/vdisk). Both tools take turns on the
# same files; each case is the wall time of the whole command. Printed:
# the median per tool, the ratio qemu time / vdisk time (above 1: vdisk
# is faster) and the largest peak RSS of each (GNU time's %M).
set -e -o pipefail

runs=${1:-3}
top=$(cd "$(dirname "$0")/.." && pwd)
VDISK=${VDISK:-$(ls "$top"/build*/tools/vdisk 2>/dev/null | head -1)}
for need in qemu-img qemu-io bc /usr/bin/time; do
    command -v "$need" >/dev/null || { echo "needs $need" >&2; exit 1; }
done
[ -x "$VDISK" ] || { echo "set VDISK=path/to/vdisk" >&2; exit 1; }
scratch=$(mktemp -d "${BENCH_DIR:-/var/tmp}/vdisk-vhdxbench.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
cd "$scratch"

qemu-img create -q -f raw src.raw 2G
w=()
for i in $(seq 0 31); do
    w+=(-c "write -P $((i + 7)) $((i * 64))M 8M")
done
qemu-io -f raw "${w[@]}" src.raw >/dev/null

declare -A secs peak
# timed TOOL CASE ARGS...: one run, its wall time and peak RSS kept.
timed() {
    local who=$1 what=$2 bin=$VDISK start end kib
    shift 2
    [ "$who" = vdisk ] || bin=qemu-img
    start=$(date +%s.%N)
    /usr/bin/time -f %M -o peak.txt "$bin" "$@"
    end=$(date +%s.%N)
    secs[$who.$what]+="$(echo "$end - $start" | bc) "
    kib=$(cat peak.txt)
    [ "${peak[$who.$what]:-0}" -ge "$kib" ] || peak[$who.$what]=$kib
}

for _ in $(seq "$runs"); do
    for who in qemu vdisk; do
        rm -f "$who".vhdx "$who"-fixed.vhdx "$who".raw "$who"-fixed.raw
        timed "$who" raw-to-dynamic convert -f raw -O vhdx src.raw "$who".vhdx
        timed "$who" dynamic-to-raw convert -f vhdx -O raw "$who".vhdx \
            "$who".raw
        timed "$who" raw-to-fixed convert -f raw -O vhdx \
            -o subformat=fixed src.raw "$who"-fixed.vhdx
        timed "$who" fixed-to-raw convert -f vhdx -O raw "$who"-fixed.vhdx \
            "$who"-fixed.raw
    done
    for f in qemu.raw vdisk.raw qemu-fixed.raw vdisk-fixed.raw; do
        cmp src.raw "$f" >/dev/null || { echo "$f differs" >&2; exit 1; }
    done
done

mid() { tr ' ' '\n' | sed '/^$/d' | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
printf '%-15s %9s %9s %7s %13s %13s\n' case qemu-s vdisk-s ratio \
    qemu-rss-KiB vdisk-rss-KiB
for c in raw-to-dynamic dynamic-to-raw raw-to-fixed fixed-to-raw; do
    q=$(mid <<< "${secs[qemu.$c]}")
    v=$(mid <<< "${secs[vdisk.$c]}")
    printf '%-15s %9.3f %9.3f %7.2f %13s %13s\n' "$c" "$q" "$v" \
        "$(echo "$q / $v" | bc -l)" "${peak[qemu.$c]}" "${peak[vdisk.$c]}"
done
