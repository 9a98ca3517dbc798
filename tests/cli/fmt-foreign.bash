# Image writers for the formats qemu-img reads but cannot create (bochs,
# cloop, dmg), sourced by tests/cli/fmt-{bochs,cloop,dmg}.sh and by
# tests/fuzz/run.sh for seeds. Each follows the layout QEMU 7.2's reader
# (block/bochs.c, cloop.c, dmg.c) expects; the tests then make qemu-img
# the referee of every read of them.
#
#   fmtgen     writes fmtgen.py into the current directory, a python
#              module: pat(B, N) (N bytes, each 512-byte sector's bytes
#              B, B+1, ...), bochs(PATH, DISK_BYTES, extent=, version=,
#              fill=[(SECTOR, BYTES)...], catalog=, bitmap=, header=);
#              for corruption corpora, corrupt(SRC, NAME, FN) (a copy of
#              SRC as bad-NAME.img with FN applied to its bytearray) and
#              put(FMT, OFF, V) (a FN packing V at OFF)
#   reads_like_qemu IMG...   each IMG read by both tools to raw (equal
#                            bytes), info (human, JSON) and map output
#                            as qemu-img's
#   corpus_like_qemu IMG...  each IMG (a corrupt one): info as qemu-img
#                            and read_like_qemu, the file unchanged

fmtgen()
{
    cat > fmtgen.py <<'PYEOF'
import struct, zlib, bz2, base64

def pat(b, n):
    return bytes((b + i // 512) & 0xff for i in range(n))

def bochs(path, disk, extent=32768, version=2, fill=(), catalog=None,
          bitmap=None, header=512):
    spe = extent // 512
    n = catalog if catalog is not None else -(-disk // extent)
    bitmap = bitmap if bitmap is not None else max(1, spe // 8)
    bblocks = 1 + (bitmap - 1) // 512
    h = bytearray(header)
    h[0:22] = b'Bochs Virtual HD Image'
    h[32:39] = b'Redolog'
    h[48:55] = b'Growing'
    struct.pack_into('<IIIII', h, 64, 0x20000 if version == 2 else 0x10000,
                     header, n, bitmap, extent)
    struct.pack_into('<Q', h, 88 if version == 2 else 84, disk)
    cat = [0xffffffff] * n
    exts = []
    for sector, data in fill:
        for k in range(len(data) // 512):
            s = sector + k
            e = s // spe
            if cat[e] == 0xffffffff:
                cat[e] = len(exts)
                exts.append((bytearray(bblocks * 512), bytearray(extent)))
            bm, d = exts[cat[e]]
            i = s % spe
            bm[i // 8] |= 1 << (i % 8)
            d[i * 512:(i + 1) * 512] = data[k * 512:(k + 1) * 512]
    out = h + struct.pack('<%dI' % n, *cat)
    for bm, d in exts:
        out += bm + d
    open(path, 'wb').write(out)



def corrupt(src, name, fn):
    d = bytearray(open(src, 'rb').read())
    fn(d)
    open('bad-' + name + '.img', 'wb').write(d)

def put(fmt, off, v):
    return lambda d: struct.pack_into(fmt, d, off, v)
PYEOF
}

reads_like_qemu()
{
    local img
    for img in "$@"; do
        "$QEMU_IMG" convert -O raw "$img" q.raw
        "$VDISK" convert -O raw "$img" v.raw
        cmp -s q.raw v.raw || fail "$img reads differently"
        rm -f q.raw v.raw
        same info "$img"
        same info --output=json "$img"
        same map --output=json "$img"
    done
}

corpus_like_qemu()
{
    local img
    for img in "$@"; do
        cp "$img" corpus.orig
        same info "$img"
        read_like_qemu "$img"
        cmp -s "$img" corpus.orig || fail "$img was modified"
    done
}
