#!/usr/bin/env bash
# Builds the libFuzzer targets in tests/fuzz/ with clang and the address
# and undefined-behaviour sanitizers, and runs each for a bounded time.
#
#   bash tests/fuzz/run.sh [SECONDS]      (default 60 per target)
#
# The library is built by meson into build-fuzz/ (or $FUZZ_BUILD_DIR) with
# -fsanitize=fuzzer-no-link; each tests/fuzz/fuzz-*.c is then linked
# against it with -fsanitize=fuzzer. Seed images are made at run time with
# qemu-img (nothing binary is committed); new corpus entries accumulate in
# build-fuzz/corpus/TARGET and crashes land in build-fuzz/artifacts/.
# Exit status: 0 when no target failed, 1 when one crashed, 77 (skip) when
# clang or qemu-img is missing.
set -euo pipefail

secs=${1:-60}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
build=${FUZZ_BUILD_DIR:-$root/build-fuzz}

for tool in clang qemu-img meson ninja pkg-config; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "run.sh: $tool not found, skipping" >&2
        exit 77
    fi
done

san='-fsanitize=address,undefined -fno-sanitize-recover=undefined'
if [ ! -f "$build/build.ninja" ]; then
    CC=clang meson setup "$build" "$root" \
        -Dbuildtype=debugoptimized -Dwerror=false \
        -Dc_args="-fsanitize=fuzzer-no-link $san -fno-omit-frame-pointer" \
        -Dc_link_args="$san" >/dev/null
fi
ninja -C "$build" libvdisk.a >/dev/null

libs=$(pkg-config --libs zlib libzstd json-c)
if pkg-config --exists liburing; then
    libs="$libs $(pkg-config --libs liburing)"
fi

# --whole-archive: the driver registry refers to drivers through weak
# symbols, which do not pull their objects out of a static archive.
targets=()
for src in "$here"/fuzz-*.c; do
    name=$(basename "$src" .c)
    # shellcheck disable=SC2086
    clang -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer $san \
        -I"$root/include" -o "$build/$name" "$src" \
        -Wl,--whole-archive "$build/libvdisk.a" -Wl,--no-whole-archive \
        $libs -lpthread -lm
    targets+=("$name")
done

# Seeds: small images covering the features the parser must handle.
seeds="$build/seeds"
rm -rf "$seeds"
mkdir -p "$seeds" "$build/artifacts"
(
    cd "$seeds"
    q() { qemu-img "$@" >/dev/null 2>&1 || true; }
    qio() { qemu-io "$@" >/dev/null 2>&1 || true; }
    head -c 65536 /dev/urandom > data.raw
    q create -f qcow2 -o cluster_size=512 empty.qcow2 1M
    q create -f qcow2 -o cluster_size=512,compat=0.10 v2.qcow2 1M
    qio -c 'write -P 0x5a 0 8k' -c 'write -z 16k 4k' v2.qcow2
    q create -f qcow2 -o cluster_size=512 data.qcow2 1M
    qio -c 'write -P 0x11 0 4k' -c 'write -P 0x22 512k 1k' \
        -c 'write -z 8k 2k' data.qcow2
    q create -f qcow2 -o cluster_size=4096,refcount_bits=1 rc1.qcow2 256k
    qio -c 'write -P 0x33 4k 8k' rc1.qcow2
    q create -f qcow2 -o cluster_size=512,extended_l2=on l2x.qcow2 1M
    qio -c 'write -P 0x44 0 3k' -c 'write -z 4k 1k' l2x.qcow2
    q convert -c -f raw -O qcow2 -o cluster_size=4096 data.raw zlib.qcow2
    q convert -c -f raw -O qcow2 \
        -o cluster_size=4096,compression_type=zstd data.raw zstd.qcow2
    q create -f qcow2 -o cluster_size=512 snap.qcow2 1M
    qio -c 'write -P 0x55 0 2k' snap.qcow2
    q snapshot -c snap1 snap.qcow2
    qio -c 'write -P 0x66 1k 2k' snap.qcow2
    q create -f qcow2 -o cluster_size=512 -b data.qcow2 -F qcow2 \
        overlay.qcow2
    q create -f qcow2 -o cluster_size=512 bitmap.qcow2 1M
    q bitmap --add bitmap.qcow2 b0
    rm -f data.raw
)

status=0
for t in "${targets[@]}"; do
    corpus="$build/corpus/$t"
    mkdir -p "$corpus"
    echo "== $t: ${secs}s"
    if ! "$build/$t" "$corpus" "$seeds" -max_total_time="$secs" \
            -max_len=262144 -timeout=20 -rss_limit_mb=2048 \
            -close_fd_mask=3 -print_final_stats=1 \
            -artifact_prefix="$build/artifacts/$t-"; then
        echo "run.sh: $t failed; see $build/artifacts/" >&2
        status=1
    fi
done
exit $status
