#!/usr/bin/env bash
# Side-by-side benchmarks: QEMU's tools and vdisk on the same work, in one
# run, with a table of medians at the end. See bench/README.md for what
# each case measures and why it is measured this way.
#
#   bench/run.sh [quick|full]      (default quick)
#
# Environment:
#   VDISK       the vdisk binary (default: build*/tools/vdisk in the
#               source tree, then `vdisk` on PATH)
#   QEMU_IMG    qemu-img (default: qemu-img on PATH)
#   BENCH_DIR   where the scratch directory goes (default /var/tmp)
#   BENCH_CACHE cache mode for the bench cases (default writeback, as
#               qemu-img bench; "none" measures the device more than the
#               software)
#   BENCH_KEEP=1  keep the scratch directory
#   BENCH_CASES an extended regular expression: only the cases whose
#               name matches run (default: all)
#   FIO         fio, for the raw-file figures beside the O_DIRECT cases
#               (default: fio on PATH; without it they are left out)
#
# Organisation: helpers (timing, medians, table), image preparation, one
# function per kind of case, then the case list. Each case runs QEMU and
# vdisk alternately N times (N=3 quick, 5 full) so drift in the machine
# hits both equally. A case whose vdisk run fails prints FAILED and the
# script goes on.
set -u -o pipefail

mode=${1:-quick}
case $mode in
quick) reps=3; rand_count=100000; seq_passes=2 ;;
full)  reps=5; rand_count=400000; seq_passes=4 ;;
*) echo "usage: $0 [quick|full]" >&2; exit 2 ;;
esac

here=$(cd "$(dirname "$0")" && pwd)
srcdir=$(dirname "$here")
QEMU_IMG=${QEMU_IMG:-qemu-img}
cache=${BENCH_CACHE:-writeback}

if [ -z "${VDISK:-}" ]; then
    for c in "$srcdir"/build/tools/vdisk "$srcdir"/build*/tools/vdisk; do
        if [ -x "$c" ]; then VDISK=$c; break; fi
    done
fi
if [ -z "${VDISK:-}" ]; then
    VDISK=$(command -v vdisk || true)
fi
if [ -z "${VDISK:-}" ] || [ ! -x "$VDISK" ]; then
    echo "$0: set VDISK to the vdisk binary (no build*/tools/vdisk found)" >&2
    exit 2
fi
for c in "$QEMU_IMG" /usr/bin/time; do
    if ! command -v "$c" >/dev/null; then
        echo "$0: $c is required (apt-get install qemu-utils time)" >&2
        exit 2
    fi
done

work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/vdisk-bench.XXXXXX") || exit 2
cleanup()
{
    if [ "${BENCH_KEEP:-0}" = 1 ]; then
        echo "kept $work"
    else
        # Slow on file systems mounted with -o discard: every freed block
        # is discarded synchronously.
        echo "removing $work"
        rm -rf "$work"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log=$work/log
: >"$log"
results=()   # one line per case: name|unit|qemu|vdisk|ratio|qrss|vrss
sizes=()     # one line per convert case: output sizes of both tools

# ---- helpers ----

# median V1 V2 ...: the middle value (mean of the two middle ones for an
# even count). Empty when no values.
median()
{
    [ $# -gt 0 ] || return 0
    printf '%s\n' "$@" | sort -g |
        awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2];
                                   else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

maxof()
{
    printf '%s\n' "$@" | sort -g | tail -n 1
}

now_ns()
{
    date +%s%N
}

# timed OUTFILE CMD ARGS...: runs CMD under /usr/bin/time; stdout+stderr go
# to OUTFILE, the peak RSS (KiB) to OUTFILE.rss and the wall time in
# seconds to OUTFILE.wall. Returns CMD's status.
timed()
{
    local out=$1 t0 t1 st=0
    shift
    t0=$(now_ns)
    /usr/bin/time -f '%M' -o "$out.rss" "$@" >"$out" 2>&1 || st=$?
    t1=$(now_ns)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f\n", (b - a) / 1e9 }' \
        >"$out.wall"
    {
        echo "\$ $*"
        cat "$out"
    } >>"$log"
    # /usr/bin/time appends "Command exited with non-zero status N".
    tail -n 1 "$out.rss" | tr -dc '0-9' >"$out.rss1"
    return $st
}

# bench_seconds FILE: the number in "Run completed in X seconds.", or
# nothing when the line is missing.
bench_seconds()
{
    sed -nE 's/^Run completed in ([0-9]+\.[0-9]+) seconds\.$/\1/p' "$1"
}

add_row()
{
    results+=("$1|$2|$3|$4|$5|$6|$7")
    printf '  %-40s %s\n' "$1" "done"
}

# case_wanted NAME: whether BENCH_CASES selects the case.
case_wanted()
{
    [[ $1 =~ ${BENCH_CASES:-.} ]]
}

fail_row()
{
    results+=("$1|$2|${3:-FAILED}|FAILED|-|${4:--}|-")
    printf '  %-40s FAILED (%s)\n' "$1" "$5"
}

# ---- images ----

size=$((1024 * 1024 * 1024))
echo "vdisk benchmarks ($mode, $reps runs per tool and case) in $work"
echo "qemu: $($QEMU_IMG --version | head -n 1)"
echo "vdisk: $VDISK"
echo "preparing images..."

# Fully allocated 1 GiB images, one copy per tool so that a tool's writes
# never change what the other tool reads or allocates; made before the
# first case that uses them (BENCH_CASES may select none).
base_images()
{
    [ -e "$work/vdisk.qcow2" ] && return 0
    $QEMU_IMG create -q -f raw -o preallocation=full "$work/base.raw" \
        "$size" || exit 1
    $QEMU_IMG create -q -f qcow2 -o preallocation=full "$work/base.qcow2" \
        "$size" || exit 1
    # --sparse=never: cp would otherwise leave holes where the file holds
    # zeros, and writes there would allocate blocks of the host file.
    for tool in qemu vdisk; do
        cp --sparse=never "$work/base.raw" "$work/$tool.raw"
        cp --sparse=never "$work/base.qcow2" "$work/$tool.qcow2"
    done
    rm -f "$work/base.raw" "$work/base.qcow2"
    sync
}

# 2 GiB, half data half holes: 4 MiB of incompressible data at every other
# 4 MiB, so convert meets 256 data extents and 256 holes.
if case_wanted "convert 2G half-sparse raw->qcow2" ||
    case_wanted "convert 2G half-sparse qcow2->raw"; then
chunk=$((4 * 1024 * 1024))
head -c "$chunk" /dev/urandom >"$work/chunk"
truncate -s $((2 * size)) "$work/conv-src.raw"
for ((i = 0; i < 2 * size / chunk; i += 2)); do
    dd if="$work/chunk" of="$work/conv-src.raw" bs="$chunk" seek="$i" \
        conv=notrunc status=none
done
rm -f "$work/chunk"
$QEMU_IMG convert -f raw -O qcow2 "$work/conv-src.raw" "$work/conv-src.qcow2" ||
    exit 1
fi
sync

# ---- cases ----

# bench_case NAME UNIT FMT COUNT BYTES_PER_REQ ARGS...: qemu-img bench vs
# vdisk bench with the same ARGS on each tool's own image. UNIT is IOPS
# or MiB/s; the value comes from the tool's own "Run completed" time, so
# open and close are not counted.
bench_case()
{
    local name=$1 unit=$2 fmt=$3 count=$4 reqbytes=$5 r t s
    shift 5
    local -a qv=() vv=() qr=() vr=()
    local why="" fresh=${fresh:-}

    case_wanted "$name" || return 0
    [ -n "$fresh" ] || [ -n "${image:-}" ] || base_images
    for ((r = 0; r < reps; r++)); do
        for t in qemu vdisk; do
            local prog=$QEMU_IMG
            [ $t = vdisk ] && prog=$VDISK
            local img=$work/$t.${image:-$fmt}
            if [ -n "$fresh" ]; then
                # A new empty image for every run (first-write cases).
                img=$work/fresh-$t.$fmt
                rm -f "$img"
                if [ "$fmt" = raw ]; then
                    truncate -s "$size" "$img"
                else
                    $QEMU_IMG create -q -f "$fmt" "$img" "$size" >>"$log" 2>&1
                fi
            fi
            if ! timed "$work/out" "$prog" bench -f "$fmt" -t "$cache" \
                -c "$count" "$@" "$img"; then
                why="$t: $(tail -n 1 "$work/out")"
                break 2
            fi
            s=$(bench_seconds "$work/out")
            if [ -z "$s" ]; then
                why="$t: no timing line"
                break 2
            fi
            # The tools print milliseconds; a run under 1 ms counts as 1 ms.
            s=$(awk -v s="$s" 'BEGIN { print (s < 0.001) ? 0.001 : s }')
            if [ "$unit" = IOPS ]; then
                v=$(awk -v c="$count" -v s="$s" 'BEGIN { printf "%.0f", c / s }')
            else
                v=$(awk -v c="$count" -v b="$reqbytes" -v s="$s" \
                    'BEGIN { printf "%.1f", c * b / s / 1048576 }')
            fi
            if [ $t = qemu ]; then
                qv+=("$v"); qr+=("$(cat "$work/out.rss1")")
            else
                vv+=("$v"); vr+=("$(cat "$work/out.rss1")")
            fi
        done
    done
    if [ -z "$why" ] && [ -n "$fresh" ] && [ "$fmt" = qcow2 ] &&
        ! $QEMU_IMG check -q -f qcow2 "$work/fresh-vdisk.qcow2" >>"$log" 2>&1; then
        why="vdisk: qemu-img check of its image failed"
    fi
    rm -f "$work/fresh-qemu.$fmt" "$work/fresh-vdisk.$fmt"
    if [ -n "$why" ]; then
        local qm="" qrm=""
        if [ ${#qv[@]} -gt 0 ]; then
            qm=$(median "${qv[@]}"); qrm=$(maxof "${qr[@]}")
        fi
        fail_row "$name" "$unit" "${qm:-FAILED}" "${qrm:--}" "$why"
        return
    fi
    # A write case through qcow2 leaves vdisk's image consistent.
    if [ "$fmt" = qcow2 ] &&
        ! $QEMU_IMG check -q "$work/vdisk.${image:-$fmt}" >>"$log" 2>&1; then
        fail_row "$name" "$unit" "$(median "${qv[@]}")" "$(maxof "${qr[@]}")" \
            "vdisk: qemu-img check failed"
        return
    fi
    local qm vm
    qm=$(median "${qv[@]}")
    vm=$(median "${vv[@]}")
    last_vdisk=$vm
    add_row "$name" "$unit" "$qm" "$vm" \
        "$(awk -v q="$qm" -v v="$vm" 'BEGIN { printf "%.2f", v / q }')" \
        "$(maxof "${qr[@]}")" "$(maxof "${vr[@]}")"
}

# fresh_case ARGS...: bench_case on a new empty image for every run.
fresh_case()
{
    local fresh=1
    bench_case "$@"
}

# convert_case NAME SRC SRCFMT DSTFMT [OPTION...]: qemu-img convert vs
# vdisk convert with the same OPTIONs, wall time of the whole command. The
# first vdisk output is checked with qemu-img compare (and a qcow2 one with
# qemu-img check), so a fast but wrong convert cannot score. The sizes of
# the first outputs go below the table (what -c saves matters as much as
# how fast it goes).
convert_case()
{
    local name=$1 src=$2 sfmt=$3 dfmt=$4 r t
    shift 4
    local -a qv=() vv=() qr=() vr=() qs=() vs=()
    local why="" dst=$work/conv-dst.$dfmt

    case_wanted "$name" || return 0
    for ((r = 0; r < reps; r++)); do
        for t in qemu vdisk; do
            local prog=$QEMU_IMG
            [ $t = vdisk ] && prog=$VDISK
            rm -f "$dst"
            if ! timed "$work/out" "$prog" convert "$@" -f "$sfmt" \
                -O "$dfmt" "$src" "$dst"; then
                why="$t: $(tail -n 1 "$work/out")"
                break 2
            fi
            if [ "$r" = 0 ]; then
                if [ $t = qemu ]; then
                    qs=("$(stat -c %s "$dst")")
                else
                    vs=("$(stat -c %s "$dst")")
                fi
            fi
            if [ $t = vdisk ] && [ "$r" = 0 ] &&
                ! $QEMU_IMG compare -q -f "$sfmt" -F "$dfmt" "$src" "$dst" \
                    >>"$log" 2>&1; then
                why="vdisk: output differs from the source"
                break 2
            fi
            if [ $t = vdisk ] && [ "$r" = 0 ] && [ "$dfmt" = qcow2 ] &&
                ! $QEMU_IMG check -q -f qcow2 "$dst" >>"$log" 2>&1; then
                why="vdisk: qemu-img check of its output failed"
                break 2
            fi
            if [ $t = qemu ]; then
                qv+=("$(cat "$work/out.wall")"); qr+=("$(cat "$work/out.rss1")")
            else
                vv+=("$(cat "$work/out.wall")"); vr+=("$(cat "$work/out.rss1")")
            fi
        done
    done
    rm -f "$dst"
    if [ -n "$why" ]; then
        local qm="" qrm=""
        if [ ${#qv[@]} -gt 0 ]; then
            qm=$(median "${qv[@]}"); qrm=$(maxof "${qr[@]}")
        fi
        fail_row "$name" s "${qm:-FAILED}" "${qrm:--}" "$why"
        return
    fi
    local qm vm
    qm=$(median "${qv[@]}")
    vm=$(median "${vv[@]}")
    # For times the faster tool has the smaller number: ratio = qemu/vdisk.
    add_row "$name" s "$qm" "$vm" \
        "$(awk -v q="$qm" -v v="$vm" 'BEGIN { printf "%.2f", q / v }')" \
        "$(maxof "${qr[@]}")" "$(maxof "${vr[@]}")"
    sizes+=("$(printf '%-40s %12s %12s %7s' "$name" "${qs[0]}" "${vs[0]}" \
        "$(awk -v q="${qs[0]}" -v v="${vs[0]}" \
            'BEGIN { printf "%.3f", v / q }')")")
}

# 4 KiB "random" requests: both tools walk the same scattered sequence.
# qemu-img 7.2 bench wraps with "offset = (offset + step) % image_size",
# so with STEP = 104729 * 4 KiB request k goes to block k * 104729 mod
# 262144 of the 1 GiB image: 104729 is odd, hence coprime with 2^18, so
# the walk is a permutation of all 4 KiB blocks (every block once per
# 262144 requests, each about 400 MiB from the last, never past the end).
# See README.md for why this rather than fio over NBD.
rstep=$((104729 * 4096))
seq_count=$((seq_passes * size / 65536))

echo "running cases..."
for fmt in raw qcow2; do
    for qd in 1 32; do
        bench_case "$fmt 4k rand read  QD$qd" IOPS "$fmt" "$rand_count" 4096 \
            -d "$qd" -s 4k -S "$rstep"
        bench_case "$fmt 4k rand write QD$qd" IOPS "$fmt" "$rand_count" 4096 \
            -d "$qd" -s 4k -S "$rstep" -w
    done
    bench_case "$fmt 64k seq read  QD32" MiB/s "$fmt" "$seq_count" 65536 \
        -d 32 -s 64k
    bench_case "$fmt 64k seq write QD32" MiB/s "$fmt" "$seq_count" 65536 \
        -d 32 -s 64k -w
done
# Many L2 tables: a 16 GiB qcow2 with 4 KiB clusters and one cluster
# written in every 2 MiB, i.e. 8192 L2 tables in use (as many as the L2
# cache holds at its cap), read 4 KiB at each written cluster in turn:
# the cost of finding a table among many cached ones (QEMU's default
# cache is smaller and reads tables again from the page cache).
if case_wanted "qcow2 4k-cluster 8192 L2 tables read"; then
    $QEMU_IMG create -q -f qcow2 -o cluster_size=4096 "$work/c4k.qcow2" 16G
    for ((i = 0; i < 8192; i++)); do
        echo "write -q $((i * 2097152)) 4k"
    done | qemu-io "$work/c4k.qcow2" >>"$log" 2>&1
    cp "$work/c4k.qcow2" "$work/qemu.c4k.qcow2"
    mv "$work/c4k.qcow2" "$work/vdisk.c4k.qcow2"
    image=c4k.qcow2 bench_case "qcow2 4k-cluster 8192 L2 tables read" IOPS \
        qcow2 "$rand_count" 4096 -d 32 -s 4k -S 2M
    rm -f "$work/qemu.c4k.qcow2" "$work/vdisk.c4k.qcow2"
fi
# fio_raw_row NAME ARGS...: the hardware's figure beside the case just
# run: fio with ARGS writing 4 KiB blocks with O_DIRECT at random
# offsets of a fully allocated 1 GiB raw file in the same directory, as
# many requests as the bench cases, median IOPS of N runs. The ratio
# column is the last vdisk median over it (vdisk / raw file).
fio_raw_row()
{
    local name=$1 r v
    local -a fv=()
    shift
    [ -n "$fio" ] && [ -n "${last_vdisk:-}" ] || return 0
    [ -e "$work/fio.raw" ] ||
        $QEMU_IMG create -q -f raw -o preallocation=full "$work/fio.raw" \
            "$size" || return 0
    for ((r = 0; r < reps; r++)); do
        v=$("$fio" --name=raw --filename="$work/fio.raw" --direct=1 \
                --rw=randwrite --bs=4k --size="$size" \
                --io_size=$((rand_count * 4096)) --output-format=json "$@" \
                2>>"$log" |
            python3 -c 'import json, sys
t = sys.stdin.read()
print("%.0f" % sum(j["write"]["iops"] for j in
                   json.loads(t[t.index("{"):])["jobs"]))') || v=
        [ -n "$v" ] && fv+=("$v")
    done
    if [ ${#fv[@]} = 0 ]; then
        fail_row "$name" IOPS - - "fio failed"
        return
    fi
    local fm
    fm=$(median "${fv[@]}")
    add_row "$name" IOPS - "$fm" \
        "$(awk -v f="$fm" -v v="$last_vdisk" 'BEGIN { printf "v/raw %.2f", v / f }')" \
        - -
}

# The O_DIRECT write case of the performance issue, whatever BENCH_CACHE
# says, with the raw file's figure beside it: fio at the same depth from
# one thread (io_uring), and from 32 threads (pvsync2, how vdisk keeps
# its 32 requests in flight). Then both tools with aio=io_uring.
fio=${FIO:-$(command -v fio || true)}
odirect=(-d 32 -s 4k -S "$rstep" -w)
last_vdisk=
cache=none bench_case "qcow2 4k randwrite QD32 none" IOPS qcow2 \
    "$rand_count" 4096 "${odirect[@]}"
fio_raw_row "  raw file: fio io_uring QD32" --ioengine=io_uring --iodepth=32
fio_raw_row "  raw file: fio pvsync2 32 jobs" --ioengine=pvsync2 \
    --numjobs=32 --io_size=$((rand_count * 4096 / 32))
last_vdisk=
cache=none bench_case "qcow2 4k randwrite QD32 none uring" IOPS \
    qcow2 "$rand_count" 4096 "${odirect[@]}" -i io_uring
# First-write allocation: on a new empty image, request k goes to
# cluster k * 6425 mod 16384 of the 1 GiB image (6425 is odd: every
# 64 KiB cluster once), so every request is the first write to its
# cluster and allocates it; the raw row is the same bench on a new
# sparse raw file (the file system allocates a block instead).
astep=$((6425 * 65536))
acount=$((size / 65536))
fresh_case "raw 4k first-write QD32" IOPS raw "$acount" 4096 \
    -d 32 -s 4k -S "$astep" -w
fresh_case "qcow2 4k first-write QD32" IOPS qcow2 "$acount" 4096 \
    -d 32 -s 4k -S "$astep" -w
convert_case "convert 2G half-sparse raw->qcow2" "$work/conv-src.raw" raw qcow2
convert_case "convert 2G half-sparse qcow2->raw" "$work/conv-src.qcow2" qcow2 raw
rm -f "$work/conv-src.raw" "$work/conv-src.qcow2"
# Compressed convert (issue 17): text-like data (bench/text-image.py; about
# 45% of its size once deflated), 256 MiB of it as one raw image, and 1 GiB
# of it spread in runs over an 8 GiB sparse raw image (the 256 MiB four
# times: each cluster is compressed on its own, so the repeat is not seen).
# Both tools with their defaults: convert -c -O qcow2 SRC DST.
ctext="convert -c 256M compressible raw->qcow2"
csparse="convert -c 8G sparse 1G data raw->qcow2"
if case_wanted "$ctext" || case_wanted "$csparse"; then
    if ! python3 "$here/text-image.py" text $((256 << 20)) \
        "$work/text.raw"; then
        case_wanted "$ctext" && fail_row "$ctext" s - - "python3 needed"
        case_wanted "$csparse" && fail_row "$csparse" s - - "python3 needed"
    else
        convert_case "$ctext" "$work/text.raw" raw qcow2 -c
        if case_wanted "$csparse"; then
            python3 "$here/text-image.py" sparse "$work/text.raw" \
                "$work/text-sparse.raw" $((8 << 30)) $((1 << 30)) &&
                convert_case "$csparse" "$work/text-sparse.raw" raw qcow2 -c
        fi
    fi
    rm -f "$work/text.raw" "$work/text-sparse.raw"
fi

# ---- table ----

echo
echo "Medians of $reps runs (cache=$cache for bench cases unless named). ratio ="
echo "vdisk/qemu performance: > 1 means vdisk is faster (v/raw: vdisk over"
echo "the raw file's fio figure). RSS = peak resident KiB."
echo "vs raw = vdisk's qcow2 figure / vdisk's figure of the same case on raw."
printf '%-40s %-6s %12s %12s %7s %7s %10s %10s\n' \
    case unit qemu vdisk ratio "vs raw" "qemu RSS" "vdisk RSS"
printf '%.0s-' {1..111}
echo
declare -A vmed=()
for row in "${results[@]}"; do
    IFS='|' read -r n u q v ra qr vr <<<"$row"
    vmed[$n]=$v
done
for row in "${results[@]}"; do
    IFS='|' read -r n u q v ra qr vr <<<"$row"
    vr_raw=-
    rawcase=${n/#qcow2 /raw }
    if [ "$rawcase" != "$n" ] && [ "$u" != s ] &&
        [[ "${vmed[$rawcase]:-}" =~ ^[0-9.]+$ ]] && [[ "$v" =~ ^[0-9.]+$ ]]; then
        vr_raw=$(awk -v a="$v" -v b="${vmed[$rawcase]}" \
            'BEGIN { printf "%.2f", a / b }')
    fi
    printf '%-40s %-6s %12s %12s %7s %7s %10s %10s\n' "$n" "$u" "$q" "$v" \
        "$ra" "$vr_raw" "$qr" "$vr"
done
if [ ${#sizes[@]} -gt 0 ]; then
    echo
    echo "Output sizes of the first run of each convert case, bytes:"
    printf '%-40s %12s %12s %7s\n' case qemu vdisk "v/q"
    printf '%s\n' "${sizes[@]}"
fi
if [ "${BENCH_KEEP:-0}" = 1 ]; then
    echo "command log: $log"
fi
