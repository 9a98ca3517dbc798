#!/usr/bin/env bash
# vdisk export-diff / import-diff of a change set between two internal
# snapshots: a BENCH_VSIZE (10G) qcow2 with BENCH_BASE_MIB (1024) MiB
# written before snapshot A and BENCH_CHANGED_MIB (1024) MiB changed
# before snapshot B. No QEMU tool writes a change set, so the figure
# beside it is what a QEMU user runs instead to carry state B elsewhere:
# qemu-img convert -l B to a new qcow2 (all of B, not only the change).
#
#   bench/export-diff.sh     # BENCH_RUNS (3) runs, medians printed
#
# Data lands in 4 MiB runs spread over the disk; half of the changed runs
# overwrite runs of A, half are new. Needs qemu-img, qemu-io, GNU time
# and about 3 x (base + changed) free in BENCH_DIR (default /var/tmp).
set -u -o pipefail

source "$(dirname "$0")/functions.bash"
runs=${BENCH_RUNS:-3}
vsize=${BENCH_VSIZE:-10G}
base=$(( ${BENCH_BASE_MIB:-1024} / 4 ))
changed=$(( ${BENCH_CHANGED_MIB:-1024} / 4 ))
work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/vdisk-xdiff-bench.XXXXXX") || exit 2
trap 'rm -rf "$work"' EXIT
cd "$work" || exit 2

echo "preparing a $vsize image: $((base * 4)) MiB, snapshot A, " \
     "$((changed * 4)) MiB changed, snapshot B..." >&2
qemu-img create -q -f qcow2 img.qcow2 "$vsize"
vmib=$(( $(qemu-img info --output=json img.qcow2 |
           sed -n 's/.*"virtual-size": \([0-9]*\).*/\1/p') >> 20 ))
stride=$(( vmib / (base + changed / 2 + 1) / 4 * 4 ))
[ "$stride" -ge 4 ] || { echo "the image is too small" >&2; exit 2; }
cmds=()
for ((i = 0; i < base; i++)); do
    cmds+=(-c "write -P $((i % 250 + 1)) $((i * stride))M 4M")
done
qemu-io "${cmds[@]}" img.qcow2 > /dev/null || exit 1
qemu-img snapshot -c A img.qcow2
cmds=()
for ((i = 0; i < changed; i++)); do
    if ((i % 2 == 0 && i / 2 < base)); then
        off=$(( (i / 2) * stride ))               # overwrites a run of A
    else
        off=$(( (base + i / 2) * stride ))        # new
    fi
    cmds+=(-c "write -P $((i % 250 + 2)) ${off}M 4M")
done
qemu-io "${cmds[@]}" img.qcow2 > /dev/null || exit 1
qemu-img snapshot -c B img.qcow2
echo "image file: $(du -h img.qcow2 | cut -f1)" >&2

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
timed() { /usr/bin/time -f %e -o t.out "$@" > /dev/null && cat t.out; }

for ((r = 0; r < runs; r++)); do
    rm -f ab.diff b.qcow2 t.qcow2
    sync
    timed "$VDISK" export-diff --from-snap A --snapshot B img.qcow2 ab.diff \
        >> export.t || exit 1
    qemu-img create -q -f qcow2 t.qcow2 "$vsize"
    qemu-img snapshot -c A t.qcow2
    timed "$VDISK" import-diff ab.diff t.qcow2 >> import.t || exit 1
    timed qemu-img convert -O qcow2 -l snapshot.name=B img.qcow2 b.qcow2 \
        >> convert.t || exit 1
done
e=$(median < export.t)
i=$(median < import.t)
c=$(median < convert.t)
echo "change set A..B: $(du -h ab.diff | cut -f1) stream" \
     "($(stat -c %s ab.diff) bytes)"
echo "vdisk export-diff --from-snap A --snapshot B: ${e} s"
echo "vdisk import-diff (onto an empty image with snapshot A): ${i} s"
echo "qemu-img convert -l B -O qcow2 (all of B): ${c} s"
awk -v e="$e" -v c="$c" 'BEGIN { if (e > 0) printf "ratio convert/export-diff: %.2f\n", c / e }'
