#!/usr/bin/env bash
# Builds the libFuzzer targets in tests/fuzz/ with clang and the address
# and undefined-behaviour sanitizers, and runs each for a bounded time.
#
#   bash tests/fuzz/run.sh [SECONDS]      (default 60 per target)
#
# Environment: FUZZ_TARGETS (space-separated names, default all),
# FUZZ_JOBS (targets built and run at once, default one per CPU),
# FUZZ_TIMEOUT (per-input seconds before libFuzzer calls it a hang,
# default 20), FUZZ_BUILD_DIR.
#
# The library is built by meson into build-fuzz/ (or $FUZZ_BUILD_DIR) with
# -fsanitize=fuzzer-no-link; each tests/fuzz/fuzz-*.c is then linked
# against it with -fsanitize=fuzzer. Seed images are made at run time with
# qemu-img (and, for the formats it cannot write, the cli tests'
# generator), and text seeds (QMP lines, option strings) with printf:
# nothing binary is committed. New corpus entries accumulate in
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

libs=$(pkg-config --libs zlib libzstd json-c nettle)
if pkg-config --exists liburing; then
    libs="$libs $(pkg-config --libs liburing)"
fi
# The NBD server and luks in libvdisk.a use gnutls when meson found it;
# the remote protocol drivers load their libraries with dlopen()
# (src/common/dlib.h).
for pc in gnutls; do
    if pkg-config --exists $pc; then
        libs="$libs $(pkg-config --libs $pc)"
    fi
done
libs="$libs -ldl"
# dmg's bzip2 chunks: libbz2 when meson found it (no pkg-config file).
if grep -q VDISK_HAVE_BZIP2 "$build/build.ninja"; then
    libs="$libs -lbz2"
fi

# --whole-archive: the targets reach internal functions (the NBD
# server's nbd_conn_serve()) that nothing else would pull out of the
# archive.
# Targets are built and run FUZZ_JOBS at a time (default: one per CPU):
# each is one process, so the CPUs of a CI machine all work.
jobs=${FUZZ_JOBS:-$(nproc 2>/dev/null || echo 1)}
# wait_slot: waits until fewer than $jobs background jobs run; returns
# 1 if one that ended failed.
wait_slot()
{
    local rc=0
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do
        wait -n || rc=1
    done
    return $rc
}
# wait_all: waits for every background job; returns 1 if one failed.
wait_all()
{
    local rc=0
    while [ "$(jobs -rp | wc -l)" -gt 0 ]; do
        wait -n || rc=1
    done
    return $rc
}

targets=()
build_status=0
for src in "$here"/fuzz-*.c; do
    name=$(basename "$src" .c)
    if [ -n "${FUZZ_TARGETS:-}" ] && [[ " $FUZZ_TARGETS " != *" $name "* ]]; then
        continue
    fi
    wait_slot || build_status=1
    clang -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer $san \
        -I"$root/include" -I"$root/src" -o "$build/$name" "$src" \
        -Wl,--whole-archive "$build/libvdisk.a" -Wl,--no-whole-archive \
        $libs -lpthread -lm &
    targets+=("$name")
done
wait_all || build_status=1
if [ "$build_status" != 0 ]; then
    echo "run.sh: a fuzz target failed to build" >&2
    exit 1
fi

# Seeds: small images covering the features the parser must handle.
seeds="$build/seeds"
rm -rf "$seeds"
mkdir -p "$seeds/img" "$build/artifacts"
(
    cd "$seeds/img"
    # qemu-img, again (up to 20 times) when QEMU 7.2's PBKDF2 timing fails
    # at random on a busy machine ("Unable to get accurate CPU usage");
    # a seed it cannot make is left out, never fatal.
    q()
    {
        local _
        for _ in $(seq 20); do
            qemu-img "$@" >/dev/null 2>q.err && break
            grep -q "Unable to get accurate CPU usage" q.err || break
        done
        rm -f q.err
        return 0
    }
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
    # Bitmaps with data over several clusters, one disabled, one in use
    # (a writer killed after loading it): the bitmap target's material.
    q create -f qcow2 -o cluster_size=512 bmdata.qcow2 2M
    q bitmap --add -g 512 bmdata.qcow2 fine
    q bitmap --add --disable bmdata.qcow2 off
    qio -c 'write 0 4k' -c 'write -z 1M 64k' -c 'discard 1536k 8k' \
        bmdata.qcow2
    cp bmdata.qcow2 bminuse.qcow2
    qemu-io -c 'write 8k 1k' -c 'sigraise 9' bminuse.qcow2 \
        >/dev/null 2>&1 || true
    # qed: two cluster and table sizes, data, zero clusters, a backing
    # name, and the need-check flag left by a killed writer
    q create -f qed -o cluster_size=4k,table_size=2 qed-small.qed 4M
    qio -c 'write -P 0x77 0 6k' -c 'write -z 1M 8k' qed-small.qed
    q create -f qed -o cluster_size=4k -b data.qcow2 -F qcow2 qed-back.qed
    cp qed-small.qed qed-dirty.qed
    qemu-io -c 'write 2M 4k' -c 'sigraise 9' qed-dirty.qed \
        >/dev/null 2>&1 || true
    # qcow (v1): plain and compressed clusters, a backing name
    q create -f qcow qcow-plain.qcow 2M
    qio -c 'write -P 0x12 0 5k' -c 'write -P 0x34 1M 4k' qcow-plain.qcow
    q convert -c -f raw -O qcow data.raw qcow-zlib.qcow
    q create -f qcow -b data.qcow2 -F qcow2 qcow-back.qcow
    # vdi: dynamic with data in two blocks, static, empty.
    q create -f vdi dyn.vdi 4M
    qio -f vdi -c 'write -P 0x77 0 4k' -c 'write -P 0x78 2M 1k' dyn.vdi
    q create -f vdi -o static=on static.vdi 2M
    q create -f vdi empty.vdi 0
    # parallels: 64 KiB and odd (1 KiB) clusters with data, one left in use.
    q create -f parallels -o cluster_size=64k p64.hds 1M
    qio -f parallels -c 'write -P 0x79 0 70k' -c 'write -P 0x7a 512k 1k' \
        p64.hds
    q create -f parallels -o cluster_size=1000 podd.hds 256k
    qio -f parallels -c 'write -P 0x7b 3k 5k' podd.hds
    cp p64.hds pinuse.hds
    qemu-io -f parallels -c 'write 8k 1k' -c 'sigraise 9' pinuse.hds \
        >/dev/null 2>&1 || true
    # vpc: dynamic with data, fixed, force_size (current_size sizing).
    q create -f vpc vpc-dyn.vhd 5M
    qio -f vpc -c 'write -P 0x77 0 4k' -c 'write -P 0x78 2M 1k' vpc-dyn.vhd
    q create -f vpc -o subformat=fixed vpc-fixed.vhd 64k
    q create -f vpc -o force_size=on vpc-qem2.vhd 3M
    # vhdx: dynamic with data, fixed, and a dirty log (a writer killed
    # after journalling a BAT update is hard to time: the seed's log is
    # whatever qemu-io left). fuzz-vhdx takes patches of a sparse file,
    # so each image becomes its non-zero 4 KiB pages (fuzz-vhdx.c).
    q create -f vhdx vhdx-dyn.vhdx 20M
    qio -f vhdx -c 'write -P 0x77 0 4k' -c 'write -P 0x78 9M 1k' vhdx-dyn.vhdx
    q create -f vhdx -o subformat=fixed,block_size=1M vhdx-fixed.vhdx 2M
    if command -v python3 >/dev/null; then
        for f in vhdx-*.vhdx; do
            python3 - "$f" <<'PYEOF'
import struct, sys
b = open(sys.argv[1], 'rb').read()
out = bytearray()
for o in range(0, len(b), 4096):
    page = b[o:o + 4096].rstrip(b'\0')
    if page:
        out += struct.pack('<I', o // 512)[:3] + struct.pack('<H', len(page))
        out += page
open(sys.argv[1] + '.patches', 'wb').write(out)
PYEOF
        done
    fi
    rm -f vhdx-*.vhdx
    # bochs, cloop, dmg: qemu-img cannot write them; the cli tests'
    # generator does (tests/cli/fmt-foreign.bash).
    # shellcheck source=../cli/fmt-foreign.bash
    source "$here/../cli/fmt-foreign.bash"
    fmtgen
    python3 - <<'PYEOF' || true
from fmtgen import *
bochs('redolog.bochs', 1 << 20, extent=4096, fill=[(0, pat(1, 2048)), (300, pat(2, 512))])
cloop('small.cloop', 4096, pat(3, 20000))
dmg('plist.dmg', [('zlib', pat(4, 4096)), ('zero', 9), ('raw', pat(5, 1024)),
                  ('bzip2', pat(6, 2048))], blocks=2)
dmg('rsrc.dmg', [('raw', pat(7, 1024)), ('zlib', pat(8, 4096))], form='rsrc')
PYEOF
    rm -f fmtgen.py
    # vmdk: hosted sparse with data and a zeroed grain, streamOptimized
    # (compressed grains with markers).
    q create -f vmdk -o zeroed_grain=on vmdk-sparse.vmdk 4M
    qio -f vmdk -c 'write -P 0x7c 0 5k' -c 'write -z 1M 64k' vmdk-sparse.vmdk
    q convert -O vmdk -o subformat=streamOptimized vmdk-sparse.vmdk \
        vmdk-stream.vmdk
    # vmdk seSparse: an extent file alone (fuzz-vmdk.c opens it through a
    # descriptor of its own) with data, zeroed and unmapped grains over
    # two grain tables, written by the cli tests' generator.
    # shellcheck source=../cli/fmt-functions.bash
    source "$here/../cli/fmt-functions.bash"
    sesparsegen
    python3 - <<'PYEOF' || true
from sesparse import *
sesparse('se', 65536, data={0: grain_bytes(1), 4097: grain_bytes(2)},
         zero=[1], unmapped=[4098], layout='compact')
PYEOF
    rm -f sesparse.py se.vmdk
    rm -f data.raw
    # luks: LUKS1 with the default cipher (a truncated copy: the key
    # material and payload of one slot) and aes-128-cbc-essiv/sha1,
    # passphrase "fuzz", QEMU's minimum of 1000 iterations
    q create -f luks --object secret,id=s,data=fuzz \
        -o key-secret=s,iter-time=1,cipher-alg=aes-128,cipher-mode=cbc \
        -o ivgen-alg=essiv,hash-alg=sha1 luks-cbc.luks 64k
    q create -f luks --object secret,id=s,data=fuzz \
        -o key-secret=s,iter-time=1 luks-xts.img 64k
    if [ -f luks-xts.img ]; then
        head -c 262144 luks-xts.img > luks-xts.luks
    fi
    rm -f data.raw luks-xts.img
)
# Text seeds; the first byte is the target's mode byte (see each target).
mkdir -p "$seeds/qmp" "$seeds/json" "$seeds/object"
(
    cd "$seeds/qmp"
    printf '\002{"execute": "query-version"}\n{"execute": "query-commands", "id": 1}\n' > version
    printf '\002{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n0", "size": 1048576}}\n{"execute": "query-named-block-nodes"}\n{"execute": "block_resize", "arguments": {"node-name": "n0", "size": 2097152}}\n{"execute": "query-blockstats", "arguments": {"query-nodes": true}}\n{"execute": "blockdev-del", "arguments": {"node-name": "n0"}}\n' > nodes
    printf '\002{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "q", "file": {"driver": "null-co", "read-zeroes": true}}}\n{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r", "offset": 512, "size": 4096, "file": {"driver": "null-co", "read-zeroes": true}}}\n{"execute": "blockdev-snapshot-internal-sync", "arguments": {"device": "r", "name": "s"}}\n{"execute": "x-vdisk-snapshot-save", "arguments": {"name": "s", "devices": ["r"], "vmstate": "r"}}\n{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e", "node-name": "r"}}\n{"execute": "quit"}\n' > snapshot
    printf '\000{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}\n{"execute": "query-version"}\n{"exec-oob": "x", "id": [1,2]}\n[1]\n{"execute": "x", "control": {}} trailing\n' > envelope
    printf '\001blockdev-add\ndriver=null-co,node-name=a,size=1M,read-zeroes=on\ndriver=raw,node-name=b,file=a,offset=512\n{"driver": "raw", "node-name": "c", "file": {"driver": "null-co"}}\n' > keyval
)
(
    cd "$seeds/json"
    printf '\000{"driver": "qcow2", "file": {"driver": "null-co", "size": "1M", "read-zeroes": true}}' > qcow2
    printf '\000{"driver": "raw", "offset": 512, "size": 1024, "file": {"driver": "null-co", "read-zeroes": "on"}}' > raw
    printf '\001null-co,size=1G,read-zeroes=on,node-name=a' > implied
    printf '\000driver=raw,file.driver=null-co,file.size=64k,detect-zeroes=unmap,discard=unmap,cache=writeback' > dotted
    printf '\0001.5G' > size
    printf '\000{"driver": "blkdebug", "image": {"driver": "null-co"}, "inject-error.0.event": "read_aio"}' > blkdebug
    printf '\002{"driver": "file", "filename": "missing.img", "aio": "threads", "locking": "off"}' > file
)

(
    cd "$seeds/object"
    printf '\001secret,id=s0,data=aGVsbG8=,format=base64' > secret
    printf '\003secret,id=s1,format=base64,keyid=k,iv=AAAAAAAAAAAAAAAAAAAAAA==,data=AAAAAAAAAAAAAAAAAAAAAA==' > aes
    printf '\001throttle-group,id=t,limits.bps-total=1000,limits.bps-total-max=2000,limits.bps-total-max-length=3,x-iops-size=5,x-iops-read=9' > throttle
    printf '\001authz-list,id=l,policy=allow,rules.0.match=a*b?c,rules.0.policy=deny,rules.0.format=glob,rules.1.match=x,rules.1.policy=allow' > authz
    printf '\000{"qom-type": "authz-list", "id": "l", "rules": [{"match": "*?*", "policy": "allow", "format": "glob"}]}' > authz-json
    printf '\000{"qom-type": "throttle-group", "id": "t", "limits": {"iops-total": 10, "iops-total-max": 20}}' > throttle-json
    printf '\001help' > help
)

# RBD diff streams (fuzz-rbd-diff.c; the first byte is its mode byte):
# v1 and v2 with every record kind, written here byte by byte.
mkdir -p "$seeds/rbd-diff"
python3 - "$seeds/rbd-diff" <<'PYEOF' || true
import os, struct, sys
d = sys.argv[1]
def rec(v, tag, payload):
    return tag + (struct.pack('<Q', len(payload)) if v == 2 and tag != b'e' else b'') + payload
def name(s):
    return struct.pack('<I', len(s)) + s
for v in (1, 2):
    body = b'rbd diff v%d\n' % v
    body += rec(v, b'f', name(b'A')) + rec(v, b't', name(b'B'))
    if v == 2:
        body += rec(v, b'p', b'\0')
    body += rec(v, b's', struct.pack('<Q', 1 << 20))
    body += rec(v, b'w', struct.pack('<QQ', 4096, 16) + b'x' * 16)
    body += rec(v, b'z', struct.pack('<QQ', 65536, 8192)) + b'e'
    open(os.path.join(d, 'v%d' % v), 'wb').write(b'\1' + body)
    open(os.path.join(d, 'v%d-off' % v), 'wb').write(b'\x81' + body)
    full = b'rbd diff v%d\n' % v + rec(v, b'w', struct.pack('<QQ', 0, 8) + b'12345678') + b'e'
    open(os.path.join(d, 'v%d-full' % v), 'wb').write(b'\x28' + full)
# a v2 record of an unknown tag, and pacific's 8-byte 'p' length
open(os.path.join(d, 'v2-skip'), 'wb').write(b'\1rbd diff v2\nX' + struct.pack('<Q', 3) + b'abc' + b'p' + struct.pack('<Q', 8) + b'\0e')
PYEOF

# fuzz_one TARGET: runs it for $secs into its log; on failure prints the
# log's end and says where the artifact is.
fuzz_one()
{
    local t=$1 corpus="$build/corpus/$1" tseeds log="$build/$1.log"

    mkdir -p "$corpus"
    case $t in
    fuzz-qmp) tseeds=$seeds/qmp ;;
    fuzz-json-filename) tseeds=$seeds/json ;;
    fuzz-object) tseeds=$seeds/object ;;
    fuzz-rbd-diff) tseeds=$seeds/rbd-diff ;;
    *) tseeds=$seeds/img ;;
    esac
    if ! "$build/$t" "$corpus" "$tseeds" -max_total_time="$secs" \
            -max_len=262144 -timeout="${FUZZ_TIMEOUT:-20}" -rss_limit_mb=2048 \
            -close_fd_mask=3 -print_final_stats=1 \
            -artifact_prefix="$build/artifacts/$t-" > "$log" 2>&1; then
        tail -n 40 "$log"
        echo "run.sh: $t failed; see $build/artifacts/ and $log" >&2
        return 1
    fi
    echo "== $t: ${secs}s, passed ($(grep -c . "$log") log lines in $log)"
}

status=0
for t in "${targets[@]}"; do
    wait_slot || status=1
    fuzz_one "$t" &
done
wait_all || status=1
exit $status
