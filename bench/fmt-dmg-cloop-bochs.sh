#!/usr/bin/env bash
# bochs, cloop, dmg (read only in QEMU and vdisk): convert a 2 GiB image
# of each (256 MiB of data in 32 chunks spread over the disk, the rest
# unallocated or zero chunks) to raw, vdisk against qemu-img 7.2 side by
# side. qemu-img cannot create these formats, so the images are written
# first by a streaming generator (the layouts of tests/cli/fmt-foreign.bash:
# a bochs redolog with 32 KiB extents, a cloop image of 64 KiB zlib
# blocks, a dmg with 1 MiB zlib chunks and zero chunks between them).
#
#   bench/fmt-dmg-cloop-bochs.sh [RUNS]      (default 3 runs per case)
#
# BENCH_DIR is the scratch directory (default /var/tmp), VDISK the binary
# (default build*/tools/vdisk). The table shows the medians of the wall
# clock, the ratio qemu time / vdisk time (above 1: vdisk is faster) and
# each tool's largest peak RSS (GNU time's %M). Both tools' raw outputs
# must be identical.
set -e -o pipefail

runs=${1:-3}
dir=${BENCH_DIR:-/var/tmp}
# The release build, not the first build* that ls finds (build-asan).
source "$(dirname "$0")/functions.bash"
here=$srcdir
command -v qemu-img >/dev/null || { echo "needs qemu-img" >&2; exit 1; }
command -v python3 >/dev/null || { echo "needs python3" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "needs GNU time (/usr/bin/time)" >&2; exit 1; }

work=$(mktemp -d "$dir/vdisk-rofmtbench.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"

echo "writing 2 GiB bochs, cloop and dmg images (256 MiB of data)..." >&2
python3 - <<'PYEOF'
import base64, os, struct, zlib
DISK = 2 << 30
REGIONS = [(i << 26, 8 << 20) for i in range(32)]   # (offset, length)
rnd = os.urandom(1 << 16)
def data(off, n):
    # 64 KiB of random bytes, half of each 4 KiB replaced by a pattern:
    # compressible, but not trivially
    out = bytearray()
    for o in range(off, off + n, 1 << 16):
        b = bytearray(rnd)
        for k in range(0, 1 << 16, 4096):
            b[k:k + 2048] = bytes([(o >> 16) & 0xff]) * 2048
        out += b
    return bytes(out[:n])
def has_data(off, n):
    return any(o < off + n and off < o + ln for o, ln in REGIONS)

# bochs: 32 KiB extents, a 512-byte bitmap per extent (all set)
ext = 32768
n = DISK // ext
cat = [0xffffffff] * n
order = []
for o, ln in REGIONS:
    for e in range(o // ext, (o + ln) // ext):
        cat[e] = len(order)
        order.append(e)
h = bytearray(512)
h[0:22] = b'Bochs Virtual HD Image'
h[32:39] = b'Redolog'
h[48:55] = b'Growing'
struct.pack_into('<IIIIIIQ', h, 64, 0x20000, 512, n, 512, ext, 0, DISK)
with open('img.bochs', 'wb') as f:
    f.write(h + struct.pack('<%dI' % n, *cat))
    bitmap = b'\xff' * 8 + bytes(504)
    for e in order:
        f.write(bitmap + data(e * ext, ext))

# cloop: 64 KiB blocks
bs = 1 << 16
n = DISK // bs
zero = zlib.compress(bytes(bs), 6)
blobs = []
off = 128 + 8 + 8 * (n + 1)
offs = [off]
magic = (b'#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && '
         b'mount -r -t iso9660 /dev/cloop $1\n')
with open('img.cloop', 'wb') as f:
    f.write(magic.ljust(128, b'\0') + struct.pack('>II', bs, n))
    f.seek(off)
    for b in range(n):
        c = zlib.compress(data(b * bs, bs), 6) if has_data(b * bs, bs) else zero
        f.write(c)
        off += len(c)
        offs.append(off)
    f.seek(136)
    f.write(struct.pack('>%dQ' % (n + 1), *offs))

# dmg: 1 MiB zlib chunks for the data, one zero chunk per hole
entries, pos, sec = [], 0, 0
with open('img.dmg', 'wb') as f:
    for o, ln in REGIONS:
        if o // 512 > sec:
            entries.append((0, sec, o // 512 - sec, pos, 0))
            sec = o // 512
        for c in range(o, o + ln, 1 << 20):
            z = zlib.compress(data(c, 1 << 20), 6)
            f.write(z)
            entries.append((0x80000005, sec, 2048, pos, len(z)))
            pos += len(z)
            sec += 2048
    if DISK // 512 > sec:
        entries.append((0, sec, DISK // 512 - sec, pos, 0))
    entries.append((0xffffffff, DISK // 512, 0, pos, 0))
    m = struct.pack('>4sIQQQII', b'mish', 1, 0, DISK // 512, 0, 0, 0)
    m = m.ljust(200, b'\0') + struct.pack('>I', len(entries))
    for t, s, cnt, o, ln in entries:
        m += struct.pack('>IIQQQQ', t, 0, s, cnt, o, ln)
    xml = (b'<plist><dict><key>resource-fork</key><dict><key>blkx</key>'
           b'<array><dict><key>Data</key><data>' + base64.b64encode(m) +
           b'</data></dict></array></dict></dict></plist>\n')
    f.write(xml)
    koly = bytearray(512)
    struct.pack_into('>4sIII', koly, 0, b'koly', 4, 512, 1)
    struct.pack_into('>QQ', koly, 0x18, 0, pos)
    struct.pack_into('>QQ', koly, 0xd8, pos, len(xml))
    struct.pack_into('>Q', koly, 0x1ec, DISK // 512)
    f.write(koly)
PYEOF

declare -A times rss
# run TOOL CASE ARGS...: one timed run of qemu-img or vdisk.
run() {
    local tool=$1 case=$2 prog m t0 t1
    shift 2
    [ "$tool" = qemu ] && prog=qemu-img || prog=$VDISK
    t0=$(date +%s.%N)
    /usr/bin/time -f %M -o rss.txt "$prog" "$@" 2>/dev/null
    t1=$(date +%s.%N)
    times[$tool.$case]+="$(echo "$t1 - $t0" | bc) "
    m=$(cat rss.txt)
    [ "${rss[$tool.$case]:-0}" -ge "$m" ] || rss[$tool.$case]=$m
}

cases="bochs cloop dmg"
for r in $(seq "$runs"); do
    for c in $cases; do
        for tool in qemu vdisk; do
            rm -f $tool.raw
            run $tool $c convert -f $c -O raw img.$c $tool.raw
        done
        cmp qemu.raw vdisk.raw >/dev/null ||
            { echo "$c: the two tools' raw images differ" >&2; exit 1; }
    done
done

median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
printf '%-14s %10s %10s %7s %12s %12s\n' case qemu-s vdisk-s ratio \
    qemu-rss-KiB vdisk-rss-KiB
for c in $cases; do
    q=$(echo "${times[qemu.$c]}" | median)
    v=$(echo "${times[vdisk.$c]}" | median)
    printf '%-14s %10.3f %10.3f %7.2f %12s %12s\n' "$c-to-raw" "$q" "$v" \
        "$(echo "$q / $v" | bc -l)" "${rss[qemu.$c]}" "${rss[vdisk.$c]}"
done
