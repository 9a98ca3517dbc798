#!/usr/bin/env bash
# http(s) sources side by side: one throwaway nginx on 127.0.0.1 (the
# tests' tests/cli/http-server.bash) serves a 512 MiB qcow2 image (fully
# written) and a 512 MiB raw image; `qemu-img convert` (QEMU's curl
# driver) and `vdisk convert` copy each over http and https into a local
# qcow2, alternating, N runs each; vdisk runs twice per round, with
# qemu-img's -m (vdisk1) and with its own default (vdisk). Prints per
# case the median seconds of each, the ratios qemu/vdisk (above 1: vdisk
# is faster) and each one's peak RSS over the runs (/usr/bin/time -f
# %M). The https cases use the self-signed certificate with
# sslverify=off.
#
#   bench/remote-http.sh [RUNS]        (default 3)
#
# QEMU 7.2's curl driver hangs in convert with several coroutines on
# this libcurl (7.88), so qemu-img runs with -m $QEMU_M (default 1, the
# setting that works); vdisk runs with its default. VDISK names the
# binary (default build/tools/vdisk), BENCH_DIR the scratch directory
# (default /var/tmp; about 2.5 GiB).
set -euo pipefail

runs=${1:-3}
root=$(cd "$(dirname "$0")/.." && pwd)
VDISK=${VDISK:-$root/build/tools/vdisk}
QEMU_M=${QEMU_M:-1}
[ -x "$VDISK" ] || { echo "no vdisk binary at $VDISK (build first)" >&2; exit 1; }
for c in qemu-img qemu-io /usr/bin/time; do
    command -v $c >/dev/null || { echo "missing $c" >&2; exit 1; }
done

dir=$(mktemp -d "${BENCH_DIR:-/var/tmp}/vdisk-http-bench.XXXXXX")
cd "$dir"
# What tests/cli/http-server.bash expects of tests/functions.sh.
_cleanups=()
cleanup_fn() { _cleanups+=("$*"); }
fail() { echo "FAIL: $*" >&2; exit 1; }
requires() { for c; do command -v "$c" >/dev/null || fail "missing $c"; done; }
cleanup()
{
    local c
    for c in "${_cleanups[@]}"; do $c; done
    cd /
    rm -rf "$dir"
}
trap cleanup EXIT
source "$root/tests/cli/http-server.bash"

mkdir www
qemu-img create -q -f qcow2 www/disk.qcow2 512M
qemu-io -f qcow2 -c 'write -P 0x5a 0 512M' www/disk.qcow2 >/dev/null
head -c $((512 << 20)) /dev/urandom > www/disk.raw
http_server_start "$dir/www"

median()
{
    sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'
}

# run TOOL SOURCE-ARGS...: one convert; appends "secs rss_kib" to TOOL.t
run()
{
    local tool=$1
    shift
    local cmd
    if [ "$tool" = qemu ]; then
        cmd=(qemu-img convert -m "$QEMU_M")
    elif [ "$tool" = vdisk1 ]; then
        cmd=("$VDISK" convert -m "$QEMU_M")
    else
        cmd=("$VDISK" convert)
    fi
    rm -f out.qcow2
    sync
    /usr/bin/time -f '%e %M' -o time.out "${cmd[@]}" -O qcow2 "$@" \
        out.qcow2
    cat time.out >> "$tool.t"
}

printf '%-20s %7s %8s %7s %7s %7s %10s %10s %10s\n' case qemu_s vdisk1_s \
    ratio1 vdisk_s ratio qemu_rss vdisk1_rss vdisk_rss
for c in "http qcow2" "http raw" "https qcow2" "https raw"; do
    set -- $c
    proto=$1 fmt=$2
    if [ "$proto" = http ]; then
        src=(-f "$fmt" "$HTTP_URL/disk.$fmt")
    else
        src=(--image-opts "driver=$fmt,file.driver=https,file.url=$HTTPS_URL/disk.$fmt,file.sslverify=off")
    fi
    rm -f qemu.t vdisk.t vdisk1.t
    for i in $(seq "$runs"); do
        run qemu "${src[@]}"
        run vdisk1 "${src[@]}"
        run vdisk "${src[@]}"
        if [ "$i" = 1 ]; then
            qemu-img compare -q -f "$fmt" -F qcow2 "www/disk.$fmt" out.qcow2 ||
                fail "vdisk's copy of $c differs"
        fi
    done
    q=$(cut -d' ' -f1 qemu.t | median)
    v1=$(cut -d' ' -f1 vdisk1.t | median)
    v=$(cut -d' ' -f1 vdisk.t | median)
    qr=$(cut -d' ' -f2 qemu.t | sort -n | tail -1)
    v1r=$(cut -d' ' -f2 vdisk1.t | sort -n | tail -1)
    vr=$(cut -d' ' -f2 vdisk.t | sort -n | tail -1)
    printf '%-20s %7s %8s %7.2f %7s %7.2f %8s K %8s K %8s K\n' "$c" "$q" \
        "$v1" "$(echo "$q / $v1" | bc -l)" "$v" "$(echo "$q / $v" | bc -l)" \
        "$qr" "$v1r" "$vr"
done
