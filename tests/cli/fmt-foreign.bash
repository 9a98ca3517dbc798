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
#              cloop(PATH, BLOCK_SIZE, DATA, magic=, level=) (DATA, padded
#              to whole blocks, each block a zlib stream);
#              for corruption corpora, corrupt(SRC, NAME, FN) (a copy of
#              SRC as bad-NAME.img with FN applied to its bytearray) and
#              put(FMT, OFF, V) (a FN packing V at OFF)
#   reads_like_qemu IMG...   each IMG read by both tools to raw (equal
#                            bytes), info (human, JSON) and map output
#                            as qemu-img's
#   refused_like_qemu FMT IMG  a read-only format's refusals as
#                            qemu-img's (check, create, convert -O,
#                            resize, amend, a qemu-io write), IMG unchanged
#   corpus_like_qemu IMG...  each IMG (a corrupt one): info as qemu-img
#                            and read as fmt-functions.bash's
#                            read_like_qemu (convert's errors in any
#                            order), the file unchanged

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



CLOOP_V2 = (b'#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && '
            b'mount -r -t iso9660 /dev/cloop $1\n')

def cloop(path, block, data, magic=CLOOP_V2, level=9):
    data = data + bytes(-len(data) % block)
    n = len(data) // block
    blobs = [zlib.compress(data[i * block:(i + 1) * block], level)
             for i in range(n)]
    offs = [128 + 8 + 8 * (n + 1)]
    for b in blobs:
        offs.append(offs[-1] + len(b))
    out = magic.ljust(128, b'\0') + struct.pack('>II', block, n)
    out += struct.pack('>%dQ' % (n + 1), *offs) + b''.join(blobs)
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

refused_like_qemu()
{
    local fmt=$1 img=$2
    cp "$img" refused.orig
    same check "$img"
    # (qemu-img prints its "Formatting" line first; vdisk only the error)
    expect_status 1 "$VDISK" create -f "$fmt" new.img 1M 2> err
    grep -qx "vdisk: new.img: Format driver '$fmt' does not support image creation" err ||
        fail "create: $(cat err)"
    [ ! -e new.img ] || fail "create made new.img"
    same convert -O "$fmt" "$img" new.img
    same resize "$img" 16M
    same amend -o size=16M "$img"
    expect_status 1 "$VDISK" io -c 'write 0 512' "$img" > /dev/null 2> err
    grep -qF "$img" err && grep -q "read-only" err || fail "io: $(cat err)"
    cmp "$img" refused.orig || fail "$img was modified"
}

corpus_like_qemu()
{
    local img qrc vrc
    for img in "$@"; do
        cp "$img" corpus.orig
        same info "$img"
        # read_like_qemu, but convert's read errors (in qemu-img's words,
        # without a file name) may come in another order: vdisk's
        # convert reads in several threads
        qrc=0 vrc=0
        "$QEMU_IMG" convert -O raw "$img" q.raw 2> q.err || qrc=$?
        "$VDISK" convert -O raw "$img" v.raw 2> v.err || vrc=$?
        if [ "$qrc" = 0 ]; then
            [ "$vrc" = 0 ] || fail "$img: qemu-img reads it, vdisk: $(cat v.err)"
            cmp q.raw v.raw || fail "$img: read differs from qemu-img's"
        else
            [ "$vrc" = 1 ] || fail "$img: vdisk exit $vrc: $(cat v.err)"
            grep -qF "$img" v.err ||
                [ "$(sed 's/^qemu-img:/vdisk:/' q.err | sort)" = \
                  "$(sort v.err)" ] ||
                fail "$img: the error names no file: $(cat v.err)"
        fi
        rm -f q.raw v.raw
        cmp -s "$img" corpus.orig || fail "$img was modified"
    done
}
