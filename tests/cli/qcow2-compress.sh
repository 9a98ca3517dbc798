#!/usr/bin/env bash
# Compressed qcow2 clusters, zlib and zstd: images compressed by qemu-img
# read back identically through vdisk (including a short last cluster and
# 512-byte and 2 MiB clusters), and images vdisk compresses are clean for
# qemu-img check and compare equal to the source.
source "$(dirname "$0")/../functions.sh"
requires qemu-img python3
tmpdir

# Source: random (incompressible, stored plainly), text, zeros, a pattern,
# and a tail that does not fill its cluster.
python3 - <<'EOF'
import os, random
random.seed(7)
with open("src.raw", "wb") as f:
    f.write(os.urandom(192 * 1024))
    f.write(b"The quick brown fox jumps over the lazy dog. " * 8000)
    f.write(bytes(300 * 1024))
    f.write(bytes(random.randrange(4) for _ in range(256 * 1024)))
    f.write(b"tail" * 3000)
EOF

for ctype in zlib zstd; do
    for cs in 512 65536 2M; do
        img=q-$ctype-$cs.qcow2
        $QEMU_IMG convert -c -f raw -O qcow2 \
            -o compression_type=$ctype,cluster_size=$cs src.raw "$img"

        # vdisk reads what qemu-img compressed.
        "$VDISK" convert -f qcow2 -O raw "$img" out.raw
        cmp <(head -c "$(size_of src.raw)" out.raw) src.raw ||
            fail "$img: content differs"

        # Same allocation picture and check statistics.
        $QEMU_IMG map --output=json "$img" > q.map
        "$VDISK" map --output=json "$img" > v.map
        diff q.map v.map || fail "$img: map differs"
        $QEMU_IMG check --output=json "$img" > q.json
        "$VDISK" check --output=json "$img" > v.json
        json_equal_filtered q.json v.json filename ||
            fail "$img: check differs"

        # qemu-img reads what vdisk compressed.
        out=v-$ctype-$cs.qcow2
        "$VDISK" convert -c -f raw -O qcow2 \
            -o compression_type=$ctype,cluster_size=$cs src.raw "$out"
        $QEMU_IMG check "$out" || fail "$out: qemu-img check failed"
        assert_same_content -f raw -F qcow2 src.raw "$out"
        $QEMU_IMG info --output=json "$out" > info.json
        grep -q "\"compression-type\": \"$ctype\"" info.json ||
            fail "$out: wrong compression type"
        # The same compressed-cluster count as qemu-img's conversion.
        $QEMU_IMG check --output=json "$out" > o.json
        json_equal_filtered q.json o.json filename image-end-offset \
            fragmented-clusters || fail "$out: different compression"
    done
done

# A damaged compressed stream is an I/O error, not a crash or garbage.
img=q-zlib-65536.qcow2
cp "$img" bad.qcow2
python3 - bad.qcow2 <<'EOF'
import struct, sys
name = sys.argv[1]
d = bytearray(open(name, "rb").read())
l1 = struct.unpack(">Q", d[40:48])[0]
l2 = struct.unpack(">Q", d[l1:l1 + 8])[0] & 0x00fffffffffffe00
for i in range(8192):
    e = struct.unpack(">Q", d[l2 + 8 * i:l2 + 8 * i + 8])[0]
    if e & (1 << 62):
        off = e & ((1 << 54) - 1)
        d[off:off + 64] = b"\xff" * 64
        print(i)
        break
open(name, "wb").write(d)
EOF
expect_status 1 "$VDISK" convert -f qcow2 -O raw bad.qcow2 bad.raw

# One compressed write of several clusters (compressed in parallel, then
# stored in order): a compressible cluster, an incompressible one (stored
# as a normal cluster, as QEMU stores it), and the short last cluster of
# an image whose size is not a multiple of the cluster size. The bytes
# read back, the image checks clean, and the clusters are what qemu-io
# makes of the same write.
size=$((5 * 65536 + 4096))
for tool in q v; do
    $QEMU_IMG create -q -f qcow2 $tool-multi.qcow2 $size
done
head -c 65536 /dev/urandom > noise.bin
python3 - "$size" <<'PY'
import sys
size = int(sys.argv[1])
noise = open("noise.bin", "rb").read()
data = bytearray(b"vdisk" * (size // 5 + 1))[:size]
data[2 * 65536:3 * 65536] = noise
open("multi.raw", "wb").write(data)
PY
$QEMU_IO -f qcow2 -c "write -c -s multi.raw 0 $size" q-multi.qcow2 > /dev/null
"$VDISK" io -f qcow2 -c "write -c -s multi.raw 0 $size" v-multi.qcow2 \
    > /dev/null || fail "vdisk io write -c of several clusters"
assert_same_content -f raw -F qcow2 multi.raw v-multi.qcow2
$QEMU_IMG check v-multi.qcow2 > /dev/null || fail "multi-cluster write -c"
for tool in q v; do
    $QEMU_IMG check --output=json $tool-multi.qcow2 > $tool-multi.json
done
json_equal_filtered q-multi.json v-multi.json filename image-end-offset \
    fragmented-clusters || fail "multi-cluster write -c: other clusters"
$QEMU_IMG map --output=json q-multi.qcow2 | sed 's/"offset": [0-9]*//' > q.map
$QEMU_IMG map --output=json v-multi.qcow2 | sed 's/"offset": [0-9]*//' > v.map
diff -u q.map v.map || fail "multi-cluster write -c: map differs"

# convert -c of a sparse source whose data runs start and end off the
# cluster grid, with holes shorter and longer than a cluster between them
# (vdisk sends the runs between holes of a cluster or more as one request;
# qemu-img goes cluster by cluster): zlib and zstd, 64 KiB and 4 KiB
# clusters, every L2 entry (host offset and compressed size of every
# cluster, in guest order) as qemu-img's conversion makes it.
python3 - <<'PY'
import os, random
rng = random.Random(11)
words = [w.encode() for w in
         "the of block cluster image guest host write read zero data run "
         "table entry refcount snapshot backing chain format qcow".split()]
fd = os.open("runs.raw", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.ftruncate(fd, 16 << 20)
k = 1024
for start, length in [(20 * k, 100 * k), (124 * k, 8 * k), (136 * k, 4 * k),
                      (300 * k, 640 * k), (1024 * k, 64 * k),
                      (1152 * k, 60 * k), (2052 * k, 2200 * k),
                      (16380 * k, 4 * k)]:
    text = b" ".join(rng.choice(words) for _ in range(length // 3))
    os.pwrite(fd, text[:length], start)
os.close(fd)
PY
for ctype in zlib zstd; do
    for cs in 65536 4096; do
        opts=compression_type=$ctype,cluster_size=$cs
        $QEMU_IMG convert -c -f raw -O qcow2 -o $opts runs.raw q-runs.qcow2
        "$VDISK" convert -c -f raw -O qcow2 -o $opts runs.raw v-runs.qcow2 ||
            fail "runs $opts: vdisk convert -c"
        $QEMU_IMG check v-runs.qcow2 > /dev/null || fail "runs $opts: check"
        assert_same_content -f raw -F qcow2 runs.raw v-runs.qcow2
        for tool in q v; do
            python3 - $tool-runs.qcow2 > $tool-runs.l2 <<'PY'
import struct, sys
f = open(sys.argv[1], "rb")
h = f.read(48)
cs = 1 << struct.unpack(">I", h[20:24])[0]
l1_size, l1_off = struct.unpack(">IQ", h[36:48])
f.seek(l1_off)
for i, e in enumerate(struct.unpack(">%dQ" % l1_size, f.read(8 * l1_size))):
    if e & 0x00fffffffffffe00:
        f.seek(e & 0x00fffffffffffe00)
        for j, x in enumerate(struct.unpack(">%dQ" % (cs // 8), f.read(cs))):
            if x:
                print((i * cs // 8 + j) * cs, hex(x))
PY
        done
        [ -s q-runs.l2 ] || fail "runs $opts: no clusters in qemu-img's image"
        diff -u q-runs.l2 v-runs.l2 || fail "runs $opts: other L2 entries"
        rm -f q-runs.qcow2 v-runs.qcow2
    done
done
