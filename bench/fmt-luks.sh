#!/usr/bin/env bash
# luks throughput benchmark, qemu-img and vdisk side by side in one run:
# a 2 GiB sparse raw image (1 MiB of data in every 16 MiB) is converted
# to luks (QEMU's default cipher, aes-256-xts-plain64; iter-time=10 so
# that PBKDF2 does not count) and a luks image back to raw, REPS times
# per tool, alternating: the whole payload is encrypted or decrypted (a
# luks image has no holes), so these are write and read throughputs.
# CIPHER=aes-128,cipher-mode=cbc,... (extra -o options) measures another
# cipher. The table gives the medians of the wall time, the ratio qemu
# time / vdisk time (above 1: vdisk is faster), the MiB/s of each and
# each tool's peak RSS (the largest of its runs, GNU time's %M).
# The same two conversions with qcow2 and encrypt.format=luks (a LUKS
# header inside the qcow2; only the data clusters are encrypted, 1/16
# of the source, so these MiB/s count the virtual size, not the bytes
# encrypted) follow as to-qcow2-luks and qcow2-luks-to-raw.
#
#   bench/fmt-luks.sh                 SIZE=2G REPS=3 CIPHER=
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
SEC=(--object secret,id=sec0,data=bench)
LOPTS=key-secret=sec0,iter-time=10${CIPHER:+,$CIPHER}
QOPTS=encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10
img() { echo "driver=luks,key-secret=sec0,file.filename=$1"; }
qimg() { echo "driver=qcow2,encrypt.key-secret=sec0,file.filename=$1"; }
if [ -z "${VDISK:-}" ]; then
    for c in "$srcdir"/build/tools/vdisk "$srcdir"/build*/tools/vdisk; do
        if [ -x "$c" ]; then VDISK=$c; break; fi
    done
fi
VDISK=${VDISK:-vdisk}
command -v /usr/bin/time > /dev/null || { echo "needs GNU time" >&2; exit 1; }

dir=$(mktemp -d "${BENCH_DIR:-/var/tmp}/vdisk-luks-bench.XXXXXX")
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
    # qemu-img 7.2's PBKDF2 timing fails now and then on a busy machine
    # ("Unable to get accurate CPU usage"): that run is made again.
    for _ in 1 2 3 4 5; do
        rm -f "$out"
        if /usr/bin/time -f '%e %M' -o t.out "$tool" "$@" > /dev/null \
                2> err.out; then
            cat t.out
            return
        fi
        grep -q "Unable to get accurate CPU usage" err.out || break
    done
    echo "FAILED: $tool $*: $(cat err.out)" >&2
    echo "nan 0"
}

median()
{
    sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2];
                    else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

declare -A times rss
CASES=(to-luks to-raw to-qcow2-luks qcow2-luks-to-raw)
for case in "${CASES[@]}"; do
    for tool in qemu vdisk; do
        times[$case.$tool]=""
        rss[$case.$tool]=0
    done
done
for _ in 1 2 3 4 5; do
    "$QEMU_IMG" convert "${SEC[@]}" -O luks -o "$LOPTS" src.raw ref.luks &&
        break
done
for _ in 1 2 3 4 5; do
    "$QEMU_IMG" convert "${SEC[@]}" -O qcow2 -o "$QOPTS" src.raw ref.qcow2 &&
        break
done
# timed CASE OUT ARGS...: one run of $bin for $tool, recorded
timed()
{
    local case=$1 out=$2 t m
    shift 2
    sync
    read -r t m < <(run "$bin" "$out" "$@")
    times[$case.$tool]+="$t "
    [ "$m" -gt "${rss[$case.$tool]}" ] && rss[$case.$tool]=$m
}

# same_as_src WHAT IMAGE-OPTS: the first run of each tool is checked
same_as_src()
{
    [ "$i" = 0 ] || return 0
    "$QEMU_IMG" compare "${SEC[@]}" --image-opts \
        driver=raw,file.filename=src.raw "$2" > /dev/null ||
        echo "FAILED: $tool's $1 differs from the source" >&2
}

for ((i = 0; i < REPS; i++)); do
    for tool in qemu vdisk; do
        bin=$QEMU_IMG
        [ $tool = vdisk ] && bin=$VDISK
        timed to-luks out.luks convert "${SEC[@]}" -O luks -o "$LOPTS" \
            src.raw out.luks
        same_as_src luks "$(img out.luks)"
        timed to-raw out.raw convert "${SEC[@]}" \
            --image-opts "$(img ref.luks)" -O raw out.raw
        same_as_src raw driver=raw,file.filename=out.raw
        timed to-qcow2-luks out.qcow2 convert "${SEC[@]}" -O qcow2 \
            -o "$QOPTS" src.raw out.qcow2
        same_as_src qcow2 "$(qimg out.qcow2)"
        timed qcow2-luks-to-raw out.raw convert "${SEC[@]}" \
            --image-opts "$(qimg ref.qcow2)" -O raw out.raw
        same_as_src "raw (from qcow2)" driver=raw,file.filename=out.raw
    done
done

printf '%-34s %9s %9s %6s %9s %9s %10s %10s\n' case "qemu s" "vdisk s" \
    ratio "qemu MiB/s" "vdisk MiB/s" "qemu KiB" "vdisk KiB"
for case in "${CASES[@]}"; do
    q=$(tr ' ' '\n' <<< "${times[$case.qemu]}" | grep . | median)
    v=$(tr ' ' '\n' <<< "${times[$case.vdisk]}" | grep . | median)
    r=$(awk -v q="$q" -v v="$v" 'BEGIN { if (v > 0) printf "%.2f", q / v;
                                         else print "nan" }')
    qm=$(awk -v s="$size_b" -v t="$q" 'BEGIN { printf "%.0f", s / 1048576 / t }')
    vm=$(awk -v s="$size_b" -v t="$v" 'BEGIN { printf "%.0f", s / 1048576 / t }')
    printf '%-34s %9s %9s %6s %9s %9s %10s %10s\n' "convert $case ($SIZE)" \
        "$q" "$v" "$r" "$qm" "$vm" "${rss[$case.qemu]}" "${rss[$case.vdisk]}"
done
