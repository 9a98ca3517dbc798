#!/usr/bin/env bash
# NBD servers side by side: qemu-nbd and `vdisk serve` export the same
# fully allocated qcow2 image over a UNIX socket, and fio's nbd engine
# drives each in turn with the same jobs. Prints, per case, the median
# IOPS and MiB/s of each server over N runs, the ratio vdisk/qemu-nbd
# (above 1: vdisk is faster), the lowest and highest ratio of one run
# pair (the servers alternate, so a pair shares the machine's load),
# each server's peak resident memory over the runs, and the same fio job
# on a raw file (io_uring, same queue depth, same page-cache state: what
# the machine gives without NBD or qcow2) with vdisk's share of it.
# After every run `qemu-img check` must find the image clean.
#
#   bench/nbd.sh [quick|full] [CASE...]
#
# quick: 3 runs x 5 s, full: 5 runs x 15 s. A CASE is "RW BS QD" as in
# the first column ("randwrite 4k 32"), or "RW BS QD compress": both
# servers export a new empty qcow2 image through QEMU's compress filter
# (every write stored compressed; fio writes 60% compressible data; no
# raw figure); by default all run.
# VDISK names the binary (default: build/tools/vdisk), BENCH_DIR the
# scratch directory (default /var/tmp), BENCH_FOLIOS=small caches the
# image in 4 KiB folios instead of the large ones a sequential fill
# leaves (see bench/README.md). Needs qemu-utils and fio with the
# nbd engine (Debian's fio has it).
set -euo pipefail

mode=${1:-quick}
case "$mode" in
quick) runs=3 secs=5 ;;
full) runs=5 secs=15 ;;
*) echo "usage: $0 [quick|full] [CASE...]" >&2; exit 2 ;;
esac
shift || true
if [ $# -gt 0 ]; then
    cases=("$@")
else
    cases=("randread 4k 1" "randread 4k 32" "randwrite 4k 1"
           "randwrite 4k 32" "read 1m 4" "read 1m 8" "write 1m 8"
           "write 1m 4 compress")
fi
root=$(cd "$(dirname "$0")/.." && pwd)
VDISK=${VDISK:-$root/build/tools/vdisk}
[ -x "$VDISK" ] || { echo "no vdisk binary at $VDISK (build first)" >&2; exit 1; }
for c in qemu-img qemu-nbd fio; do
    command -v $c >/dev/null || { echo "missing $c" >&2; exit 1; }
done
fio --enghelp=nbd >/dev/null 2>&1 || { echo "fio has no nbd engine" >&2; exit 1; }

dir=$(mktemp -d "${BENCH_DIR:-/var/tmp}/vdisk-nbd-bench.XXXXXX")
server_pid=
cleanup()
{
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

img=$dir/img.qcow2
qemu-img create -q -f qcow2 -o preallocation=metadata "$img" 1G
# Fully allocated, so reads hit data clusters, not holes.
qemu-io -f qcow2 -c 'write -P 0x5a 0 1G' "$img" >/dev/null
# The raw file of the raw-file figure, filled the same way.
raw=$dir/raw.img
qemu-img create -q -f raw "$raw" 1G
qemu-io -f raw -c 'write -P 0x5a 0 1G' "$raw" >/dev/null
# The compress cases write to a new image each run.
cimg=$dir/compress.qcow2
sock=$dir/sock

# Every run starts from the same page-cache state: the whole image cached
# and clean. Without this a run pays for the previous run's dirty pages
# being written back (or for pages not yet read), and single runs of the
# same server on the same work differ by 4x.
settle()
{
    sync "$img" "$raw"
    # Other processes' memory may have pushed parts of the images out of
    # the cache (which is then a disk benchmark, the raw file first):
    # read back what is missing (large folios; BENCH_FOLIOS=small keeps
    # its own state instead).
    if [ "${BENCH_FOLIOS:-large}" != small ]; then
        cat "$img" "$raw" > /dev/null
    fi
    # Writeback of other files on the disk competes for the same device.
    for _ in $(seq 50); do
        dirty=$(awk '/^Dirty:/ {print $2}' /proc/meminfo)
        [ "$dirty" -lt 8192 ] && break
        sleep 0.1
    done
}
if [ "${BENCH_FOLIOS:-large}" = small ]; then
    # Drop the images from the cache and read them back 4 KiB at a time
    # without readahead, so they are cached in 4 KiB folios
    # (bench/README.md).
    sync "$img" "$raw"
    python3 - "$img" "$raw" <<'EOF'
import os, sys
for name in sys.argv[1:]:
    fd = os.open(name, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    for off in range(0, os.fstat(fd).st_size, 4096):
        os.pread(fd, 4096, off)
    os.close(fd)
EOF
else
    cat "$img" "$raw" > /dev/null
fi

# start_server TOOL [compress]
start_server()
{
    local opts=(-f qcow2 -t -e 8 --cache=writeback -k "$sock")
    local what=$img
    rm -f "$sock"
    if [ "${2:-}" = compress ]; then
        rm -f "$cimg"
        qemu-img create -q -f qcow2 "$cimg" 1G
        opts=(--image-opts -t -e 8 --cache=writeback -k "$sock")
        what=driver=compress,file.driver=qcow2,file.file.filename=$cimg
    fi
    if [ "$1" = qemu ]; then
        qemu-nbd "${opts[@]}" "$what" &
    else
        "$VDISK" serve "${opts[@]}" "$what" &
    fi
    server_pid=$!
    for _ in $(seq 100); do
        [ -S "$sock" ] && return 0
        sleep 0.05
    done
    echo "server $1 did not start" >&2
    exit 1
}

stop_server()
{
    # Peak memory before it exits.
    rss=$(awk '/^VmHWM/ {print $2}' "/proc/$server_pid/status" 2>/dev/null || echo 0)
    kill "$server_pid"
    wait "$server_pid" 2>/dev/null || true
    server_pid=
}

# fio job: $1 rw, $2 bs, $3 iodepth, $4 "compress" or empty, $5 "raw" for
# the raw file instead of the NBD server; prints "IOPS MiBps".
run_fio()
{
    local target=(--ioengine=nbd --uri="nbd+unix:///?socket=$sock")
    local data=()
    # --invalidate=0: fio drops a file's cached pages before it starts by
    # default, which would measure the raw file from an empty cache (new
    # 4 KiB folios, or reads from the disk) while the servers write into
    # and read from the large cached folios settle() leaves: not the same
    # job. The nbd engine has no file of its own to drop.
    [ "${5:-}" = raw ] &&
        target=(--ioengine=io_uring --invalidate=0 --filename="$raw")
    [ "${4:-}" = compress ] &&
        data=(--buffer_compress_percentage=60 --refill_buffers)
    fio --name=b "${target[@]}" "${data[@]}" \
        --rw="$1" --bs="$2" --iodepth="$3" --size=1G --time_based \
        --runtime="$secs" --ramp_time=1 --numjobs=1 --group_reporting \
        --output-format=json 2>/dev/null |
        python3 -c '
import json, sys
text = sys.stdin.read()
j = json.loads(text[text.index("{"):])["jobs"][0]  # fio prints a line first
iops = j["read"]["iops"] + j["write"]["iops"]
bw = (j["read"]["bw_bytes"] + j["write"]["bw_bytes"]) / 1048576
print("%.0f %.1f" % (iops, bw))'
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

printf '%-22s %10s %10s %10s %10s %7s %10s %8s %8s %10s %9s\n' case \
    qemu-IOPS vdisk-IOPS qemu-MiB/s vdisk-MiB/s ratio spread qemu-RSS \
    vdisk-RSS raw-IOPS vdisk/raw
for spec in "${cases[@]}"; do
    set -- $spec
    kind=${4:-}
    : > "$dir/qemu.iops"; : > "$dir/vdisk.iops"; : > "$dir/raw.iops"
    : > "$dir/qemu.bw"; : > "$dir/vdisk.bw"; : > "$dir/pair.ratio"
    qrss=0 vrss=0 bad=
    tools="qemu vdisk raw"
    [ "$kind" = compress ] && tools="qemu vdisk"
    for _ in $(seq "$runs"); do
        for tool in $tools; do
            settle
            if [ $tool = raw ]; then
                read -r iops bw < <(run_fio "$1" "$2" "$3" "$kind" raw)
                echo "$iops" >> "$dir/raw.iops"
                printf '  raw file %s %s qd%s: %s IOPS\n' "$1" "$2" "$3" \
                    "$iops" >&2
                continue
            fi
            start_server $tool "$kind"
            read -r iops bw < <(run_fio "$1" "$2" "$3" "$kind")
            stop_server
            # The image each server leaves must be consistent.
            checked=$img
            [ "$kind" = compress ] && checked=$cimg
            if ! qemu-img check -q "$checked" >/dev/null 2>&1; then
                echo "  $tool $spec: qemu-img check FAILED" >&2
                bad=1
            fi
            echo "$iops" >> "$dir/$tool.iops"
            # Every run, on stderr: the medians hide how runs scatter.
            printf '  %s %s %s qd%s%s: %s IOPS\n' "$tool" "$1" "$2" "$3" \
                "${kind:+ $kind}" "$iops" >&2
            echo "$bw" >> "$dir/$tool.bw"
            if [ $tool = qemu ]; then
                [ "$rss" -gt "$qrss" ] && qrss=$rss
                qpair=$iops
            else
                [ "$rss" -gt "$vrss" ] && vrss=$rss
                awk -v a="$iops" -v b="$qpair" \
                    'BEGIN { printf "%.2f\n", (b > 0 ? a / b : 0) }' \
                    >> "$dir/pair.ratio"
            fi
        done
    done
    spread=$(sort -n "$dir/pair.ratio" | awk 'NR == 1 {lo = $1} {hi = $1}
        END {print lo "-" hi}')
    qi=$(median < "$dir/qemu.iops"); vi=$(median < "$dir/vdisk.iops")
    qb=$(median < "$dir/qemu.bw"); vb=$(median < "$dir/vdisk.bw")
    ratio=$(awk -v a="$vi" -v b="$qi" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')
    [ -n "$bad" ] && ratio=FAILED
    ri=- vr=-
    if [ -s "$dir/raw.iops" ]; then
        ri=$(median < "$dir/raw.iops")
        vr=$(awk -v a="$vi" -v b="$ri" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')
    fi
    printf '%-22s %10s %10s %10s %10s %7s %10s %7sK %7sK %10s %9s\n' \
        "$1 $2 qd$3${kind:+ $kind}" "$qi" "$vi" "$qb" "$vb" "$ratio" \
        "$spread" "$qrss" "$vrss" "$ri" "$vr"
done
