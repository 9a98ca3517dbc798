#!/usr/bin/env bash
# qemu-img convert and vdisk convert side by side on an RBD image in a
# throwaway single-node Ceph cluster (tests/ceph-cluster.sh, memstore
# OSD, so the network and the OSD are what is measured, not a disk):
#
#   rbd->qcow2   convert -O qcow2 rbd:rbd/src local.qcow2
#   raw->rbd     convert -O raw local.raw rbd:rbd/dst (creates the image)
#
# The source holds BENCH_RBD_MIB MiB (default 256) of random data; with
# BENCH_RBD_HOLES=1 every fourth 4 MiB of it is a hole instead (as in
# bench/remote-nbd.sh: a source with extents, so that block status is
# asked once per extent). Runs
# alternate QEMU, vdisk, QEMU, ... (BENCH_RUNS each, default 3); the
# table shows the medians, the ratio (QEMU's time / vdisk's time: above 1
# means vdisk is faster) and the peak RSS of each tool (largest of its
# runs, /usr/bin/time). Every vdisk output is checked against the source
# with qemu-img compare. VDISK names the binary (default: build/tools/
# vdisk of this tree); BENCH_DIR the scratch directory (default /var/tmp).
set -e -o pipefail
here=$(cd "$(dirname "$0")" && pwd)
VDISK=${VDISK:-$here/../build/tools/vdisk}
VDISK=$(realpath "$VDISK")
MIB=${BENCH_RBD_MIB:-256}
RUNS=${BENCH_RUNS:-3}
for c in qemu-img /usr/bin/time ceph-mon rbd; do
    command -v "$c" > /dev/null || { echo "remote-rbd.sh: $c is not installed" >&2; exit 1; }
done
source "$here/../tests/ceph-cluster.sh"
work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/vdisk-bench-rbd.XXXXXX")
cleanup() { ceph_cluster_stop "$work/ceph"; rm -rf "$work"; }
trap cleanup EXIT
mkdir "$work/ceph"
ceph_cluster_start "$work/ceph"
cd "$work"

head -c $((MIB << 20)) /dev/urandom > src.raw
if [ "${BENCH_RBD_HOLES:-0}" = 1 ]; then
    for ((o = 3 * 4; o < MIB; o += 16)); do
        fallocate -p -o $((o << 20)) -l $((4 << 20)) src.raw
    done
fi
# rbd import leaves zeroed objects out (--sparse-size), so holes stay holes.
rbd import src.raw rbd/src > /dev/null 2>&1

# run TOOL CASE: one timed convert; prints "seconds rss_kib".
run()
{
    local tool=$1 case=$2 bin
    if [ "$tool" = qemu ]; then bin=qemu-img; else bin=$VDISK; fi
    rm -f out.qcow2
    rbd rm rbd/dst > /dev/null 2>&1 || true
    case $case in
    rbd-qcow2) args=(convert -f raw -O qcow2 rbd:rbd/src out.qcow2) ;;
    raw-rbd)   args=(convert -f raw -O raw src.raw rbd:rbd/dst) ;;
    esac
    /usr/bin/time -f '%e %M' -o t.out "$bin" "${args[@]}" > /dev/null
    if [ "$tool" = vdisk ]; then
        case $case in
        rbd-qcow2) qemu-img compare -q -f raw -F qcow2 src.raw out.qcow2 ;;
        raw-rbd)   qemu-img compare -q -f raw -F raw src.raw rbd:rbd/dst ;;
        esac || { echo "$case: vdisk's output differs from the source" >&2; exit 1; }
    fi
    cat t.out
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

printf '%-10s %9s %9s %7s %10s %10s\n' case "qemu s" "vdisk s" ratio \
    "qemu RSS" "vdisk RSS"
for case in rbd-qcow2 raw-rbd; do
    : > q.t; : > v.t; : > q.m; : > v.m
    for i in $(seq "$RUNS"); do
        read -r t m < <(run qemu $case); echo "$t" >> q.t; echo "$m" >> q.m
        read -r t m < <(run vdisk $case); echo "$t" >> v.t; echo "$m" >> v.m
    done
    qt=$(median < q.t); vt=$(median < v.t)
    qm=$(sort -n q.m | tail -n 1); vm=$(sort -n v.m | tail -n 1)
    printf '%-10s %9s %9s %7s %8s MiB %6s MiB\n' $case "$qt" "$vt" \
        "$(awk -v q="$qt" -v v="$vt" 'BEGIN { printf "%.2f", (v > 0 ? q / v : 0) }')" \
        $((qm / 1024)) $((vm / 1024))
done
holes=""
[ "${BENCH_RBD_HOLES:-0}" = 1 ] && holes=", every fourth 4 MiB a hole"
echo "($MIB MiB of random data$holes, median of $RUNS runs, ratio = QEMU time / vdisk time)"
