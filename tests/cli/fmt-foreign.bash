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
#              dmg(PATH, PARTS, form='plist'|'rsrc', blocks=, tail=)
#              (PARTS: ('zero'|'ignore'|'lzfse', SECTORS), ('raw'|'zlib'|
#              'bzip2', BYTES), ('comment',); BLOCKS mish tables; TAIL
#              bytes after the trailer) returning the disk's bytes;
#              for corruption corpora, corrupt(SRC, NAME, FN) (a copy of
#              SRC as bad-NAME.img, or ext=, with FN applied to its
#              bytearray) and
#              put(FMT, OFF, V) (a FN packing V at OFF)
#   same_filtered ARGS...    cli-functions.bash's same, without the
#                            lines of qemu-img's output that match
#                            $QEMU_NOISE (a grep pattern) when set
#   reads_like_qemu IMG...   each IMG read by both tools to raw (equal
#                            bytes), info (human, JSON) and map output
#                            as qemu-img's
#   refused_like_qemu FMT IMG  a read-only format's refusals as
#                            qemu-img's (check, create, convert -O,
#                            resize, amend, a qemu-io write), IMG unchanged
#   info_like_qemu IMG       info as qemu-img's when it opens IMG, else
#                            vdisk fails too (exit 1), naming IMG
#   corpus_like_qemu IMG...  each IMG (a corrupt one): info as qemu-img
#                            (as info_like_qemu when CORPUS_OWN_WORDS is
#                            set: the driver's errors say more than QEMU's)
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

DMG_TYPES = {'zero': 0, 'raw': 1, 'ignore': 2, 'zlib': 0x80000005,
             'bzip2': 0x80000006, 'lzfse': 0x80000007, 'comment': 0x7ffffffe}

def mish(first, data_off, entries):
    sectors = sum(e[3] for e in entries)
    rows = entries + [(0xffffffff, 0, first + sectors, 0, data_off, 0)]
    h = struct.pack('>4sIQQQII', b'mish', 1, first, sectors, data_off, 0, 0)
    h = h.ljust(200, b'\0') + struct.pack('>I', len(rows))
    for t, _, sec, cnt, off, ln in rows:
        h += struct.pack('>IIQQQQ', t, 0, sec - first, cnt, off - data_off, ln)
    return h

def dmg(path, parts, form='plist', blocks=1, tail=0):
    data, disk, entries, sector = b'', b'', [], 0
    for p in parts:
        kind = p[0]
        if kind in ('zero', 'ignore', 'lzfse', 'comment'):
            n = p[1] if len(p) > 1 else 0
            stored = b'\x55' * 100 if kind == 'lzfse' else b''
            plain = bytes(512 * n)
        else:
            plain = p[1] + bytes(-len(p[1]) % 512)
            n = len(plain) // 512
            stored = {'raw': p[1], 'zlib': zlib.compress(plain),
                      'bzip2': bz2.compress(plain)}[kind]
        entries.append((DMG_TYPES[kind], 0, sector, n, len(data), len(stored)))
        disk += plain
        data += stored
        sector += n
    per = -(-len(entries) // blocks)
    tables = []
    for i in range(0, len(entries), per):
        part = entries[i:i + per]
        tables.append(mish(part[0][2], part[0][4], part))
    out = data
    koly = bytearray(512)
    struct.pack_into('>4sIII', koly, 0, b'koly', 4, 512, 1)
    struct.pack_into('>QQ', koly, 0x18, 0, len(data))
    if form == 'plist':
        xml = b'<?xml version="1.0"?>\n<plist version="1.0">\n<dict>\n'
        xml += b'<key>resource-fork</key>\n<dict><key>blkx</key><array>\n'
        for t in tables:
            b64 = base64.b64encode(t)
            lines = b'\n\t'.join(b64[i:i + 52] for i in range(0, len(b64), 52))
            xml += b'<dict><key>Data</key>\n<data>\n\t' + lines + b'\n</data>\n'
            xml += b'<key>Name</key><string>part</string></dict>\n'
        xml += b'</array></dict>\n</dict>\n</plist>\n'
        struct.pack_into('>QQ', koly, 0xd8, len(out), len(xml))
        out += xml
    else:
        res = b''.join(struct.pack('>I', len(t)) + t for t in tables)
        fork = struct.pack('>IIII', 256, 256 + len(res), len(res), 0)
        fork = fork.ljust(256, b'\0') + res
        struct.pack_into('>QQ', koly, 0x28, len(out), len(fork))
        out += fork
    struct.pack_into('>Q', koly, 0x1ec, sector)
    open(path, 'wb').write(out + bytes(koly) + b'\x77' * tail)
    return disk

def corrupt(src, name, fn, ext='.img'):
    d = bytearray(open(src, 'rb').read())
    fn(d)
    open('bad-' + name + ext, 'wb').write(d)

def put(fmt, off, v):
    return lambda d: struct.pack_into(fmt, d, off, v)
PYEOF
}

same_filtered()
{
    local qrc=0 vrc=0
    "$QEMU_IMG" "$@" > q.out 2>&1 || qrc=$?
    if [ -n "${QEMU_NOISE:-}" ]; then
        grep -v -- "$QEMU_NOISE" q.out > q.tmp || true
        mv q.tmp q.out
    fi
    "$VDISK_QEMU_IMG" "$@" > v.out 2>&1 || vrc=$?
    _compare_runs "$qrc" "$vrc" "$@"
}

reads_like_qemu()
{
    local img
    for img in "$@"; do
        "$QEMU_IMG" convert -O raw "$img" q.raw
        "$VDISK" convert -O raw "$img" v.raw
        cmp -s q.raw v.raw || fail "$img reads differently"
        rm -f q.raw v.raw
        same_filtered info "$img"
        same_filtered info --output=json "$img"
        same_filtered map --output=json "$img"
    done
}

refused_like_qemu()
{
    local fmt=$1 img=$2
    cp "$img" refused.orig
    same_filtered check "$img"
    # (qemu-img prints its "Formatting" line first; vdisk only the error)
    expect_status 1 "$VDISK" create -f "$fmt" new.img 1M 2> err
    grep -qx "vdisk: new.img: Format driver '$fmt' does not support image creation" err ||
        fail "create: $(cat err)"
    [ ! -e new.img ] || fail "create made new.img"
    same_filtered convert -O "$fmt" "$img" new.img
    same_filtered resize "$img" 16M
    same_filtered amend -o size=16M "$img"
    expect_status 1 "$VDISK" io -c 'write 0 512' "$img" > /dev/null 2> err
    grep -qF "$img" err && grep -q "read-only" err || fail "io: $(cat err)"
    cmp "$img" refused.orig || fail "$img was modified"
}

info_like_qemu()
{
    local img=$1 st=0
    if "$QEMU_IMG" info "$img" > /dev/null 2>&1; then
        same_filtered info "$img"
        return
    fi
    "$VDISK" info "$img" > v.out 2>&1 || st=$?
    [ "$st" = 1 ] || fail "$img: info exit $st: $(cat v.out)"
    grep -qF "$img" v.out || fail "$img: the error names no file: $(cat v.out)"
}

corpus_like_qemu()
{
    local img qrc vrc
    for img in "$@"; do
        cp "$img" corpus.orig
        if [ -n "${CORPUS_OWN_WORDS:-}" ]; then
            info_like_qemu "$img"
        else
            same_filtered info "$img"
        fi
        # read_like_qemu, but convert's read errors (in qemu-img's words,
        # without a file name) may come in another order and number:
        # vdisk's convert reads in several threads, and qemu-img stops
        # at the first
        qrc=0 vrc=0
        "$QEMU_IMG" convert -O raw "$img" q.raw 2> q.err || qrc=$?
        if [ -n "${QEMU_NOISE:-}" ]; then
            grep -v -- "$QEMU_NOISE" q.err > q.tmp || true
            mv q.tmp q.err
        fi
        "$VDISK" convert -O raw "$img" v.raw 2> v.err || vrc=$?
        if [ "$qrc" = 0 ]; then
            [ "$vrc" = 0 ] || fail "$img: qemu-img reads it, vdisk: $(cat v.err)"
            cmp q.raw v.raw || fail "$img: read differs from qemu-img's"
        else
            [ "$vrc" = 1 ] || fail "$img: vdisk exit $vrc: $(cat v.err)"
            # (qemu-img crashing, as 7.2's dmg driver does on a table
            # without chunks, has no words to compare)
            [ "$qrc" -ge 128 ] || grep -qF "$img" v.err ||
                [ "$(sed 's/^qemu-img:/vdisk:/; s/byte [0-9]*/byte N/' q.err |
                     sort -u)" = "$(sed 's/byte [0-9]*/byte N/' v.err |
                                    sort -u)" ] ||
                fail "$img: the error names no file: $(cat v.err)"
        fi
        rm -f q.raw v.raw
        cmp -s "$img" corpus.orig || fail "$img was modified"
    done
}
