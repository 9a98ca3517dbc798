#!/usr/bin/env bash
# vdisk du of a qcow2 with 20 internal snapshots (issue 18's target:
# under 1 s). No QEMU tool accounts space per snapshot; the nearest peer
# is qemu-img check, which walks the same metadata (every L1 tree and the
# refcounts) to rebuild the refcounts, so its time is printed beside, with
# the ratio.
#
#   bench/du.sh              # BENCH_VSIZE (20G) virtual, BENCH_SNAPS (20)
#                            # snapshots, BENCH_STEP_MIB (100) MiB written
#                            # before each (2 GiB of data)
#
# Each step writes 1 MiB runs spread over the disk (new clusters and
# overwrites of the clusters earlier snapshots hold), then takes a
# snapshot; a bitmap is added half way. Needs qemu-img, qemu-io, GNU time
# and about 2.5 GiB free in BENCH_DIR (default /var/tmp). Medians of
# BENCH_RUNS (5).
set -u -o pipefail

# VDISK, or the release build before the others.
top=$(cd "$(dirname "$0")/.." && pwd)
for cand in "${VDISK:-}" "$top"/build-release/tools/vdisk "$top"/build*/tools/vdisk; do
    [ -n "$cand" ] && [ -x "$cand" ] && { VDISK=$cand; break; }
done
[ -x "${VDISK:-}" ] || { echo "set VDISK=path/to/vdisk" >&2; exit 2; }
vsize=${BENCH_VSIZE:-20G} snaps=${BENCH_SNAPS:-20} step=${BENCH_STEP_MIB:-100}
runs=${BENCH_RUNS:-5}
work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/vdisk-du-bench.XXXXXX") || exit 2
trap 'rm -rf "$work"' EXIT
cd "$work" || exit 2

vmib=$(( $(numfmt --from=iec "$vsize") >> 20 ))
echo "preparing a $vsize image, $snaps snapshots, $step MiB before each..." >&2
qemu-img create -q -f qcow2 img.qcow2 "$vsize" || exit 1
RANDOM=1
for ((s = 1; s <= snaps; s++)); do
    cmds=()
    for ((i = 0; i < step; i++)); do
        # Half the runs land in the first 2 GiB (overwrites of what the
        # snapshots hold), half anywhere (new clusters).
        if ((i % 2)); then
            off=$(( (RANDOM * 32768 + RANDOM) % vmib ))
        else
            off=$(( RANDOM % 2048 ))
        fi
        cmds+=(-c "write -P $((s % 250 + 1)) ${off}M 1M")
    done
    qemu-io "${cmds[@]}" img.qcow2 > /dev/null || exit 1
    qemu-img snapshot -c "s$s" img.qcow2 || exit 1
    if ((s == snaps / 2)); then
        qemu-img bitmap --add img.qcow2 b0 || exit 1
    fi
done
echo "image file: $(du -h img.qcow2 | cut -f1)" >&2

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
timed() { /usr/bin/time -f %e -o t.out "$@" > out.txt && cat t.out; }

for ((r = 0; r < runs; r++)); do
    timed "$VDISK" du --output=json img.qcow2 >> du.t || exit 1
    timed "$VDISK" du img.qcow2 >> human.t || exit 1
    timed qemu-img check --output=json img.qcow2 >> check.t || exit 1
done
"$VDISK" du img.qcow2 >&2
d=$(median < du.t)
c=$(median < check.t)
printf '%-44s %8s\n' case "median s"
printf '%-44s %8s\n' "vdisk du --output=json ($snaps snapshots)" "$d"
printf '%-44s %8s\n' "vdisk du (human)" "$(median < human.t)"
printf '%-44s %8s\n' "qemu-img check --output=json" "$c"
printf '%-44s %8s\n' "ratio du / check" \
    "$(awk -v a="$d" -v b="$c" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')"
exit 0
