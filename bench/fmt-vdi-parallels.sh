#!/usr/bin/env bash
# vdi and parallels: convert a 2 GiB sparse raw image (256 MiB of data in
# 64 pieces spread over the disk) to the format and back, qemu-img 7.2
# and vdisk side by side. The vdisk binary should be a release build
# (meson setup build-rel -Dbuildtype=release).
#
#   bench/fmt-vdi-parallels.sh [RUNS] [FORMAT...]  (default 3; vdi parallels)
#
# BENCH_DIR is the scratch directory (default /var/tmp), VDISK the binary
# (default build*/tools/vdisk; use a release build). Each run times the
# whole command (wall clock) and records its peak RSS (GNU time's %M);
# the table shows the medians and the ratio vdisk speed / qemu speed
# (qemu time / vdisk time: above 1, vdisk is faster).
set -e -o pipefail

runs=${1:-3}
shift || true
formats=("$@")
[ ${#formats[@]} -gt 0 ] || formats=(vdi parallels)
dir=${BENCH_DIR:-/var/tmp}
# The release build, not the first build* that ls finds (build-asan).
source "$(dirname "$0")/functions.bash"
here=$srcdir
command -v qemu-img >/dev/null || { echo "needs qemu-img" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "needs GNU time (/usr/bin/time)" >&2; exit 1; }

work=$(mktemp -d "$dir/vdisk-fmtbench.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"

echo "preparing a 2 GiB sparse raw source with 256 MiB of data..." >&2
truncate -s 2G src.raw
for i in $(seq 0 63); do
    # 4 MiB of incompressible data every 32 MiB, at an odd offset.
    dd if=/dev/urandom of=src.raw bs=1M count=4 seek=$((i * 32 + 1)) \
       conv=notrunc status=none
done

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# run TOOL-PROGRAM ARGS...: prints "seconds rss_kib"
run() {
    local t0 t1 rss
    sync
    t0=$(date +%s.%N)
    /usr/bin/time -f %M -o rss.txt "$@" >/dev/null
    t1=$(date +%s.%N)
    rss=$(tail -1 rss.txt)
    echo "$(echo "$t1 - $t0" | bc) $rss"
}

printf '%-10s %-8s %10s %10s %7s %12s %12s\n' format direction qemu_s \
    vdisk_s ratio qemu_rss_kib vdisk_rss_kib
for fmt in "${formats[@]}"; do
    for dirn in to from; do
        declare -A t=() r=()
        if [ $dirn = from ]; then
            qemu-img convert -f raw -O "$fmt" src.raw in.img
        fi
        for _ in $(seq "$runs"); do
            for tool in qemu vdisk; do
                if [ $tool = qemu ]; then prog=qemu-img; else prog=$VDISK; fi
                rm -f out.img back.raw
                if [ $dirn = from ]; then
                    set -- $(run "$prog" convert -f "$fmt" -O raw in.img back.raw)
                else
                    set -- $(run "$prog" convert -f raw -O "$fmt" src.raw out.img)
                fi
                t[$tool]+="$1 "
                r[$tool]+="$2 "
            done
        done
        # shellcheck disable=SC2086
        qt=$(median ${t[qemu]}); vt=$(median ${t[vdisk]})
        # shellcheck disable=SC2086
        qr=$(median ${r[qemu]}); vr=$(median ${r[vdisk]})
        printf '%-10s %-8s %10.3f %10.3f %7.2f %12s %12s\n' "$fmt" "$dirn" \
            "$qt" "$vt" "$(echo "$qt / $vt" | bc -l)" "$qr" "$vr"
        unset t r
    done
done
