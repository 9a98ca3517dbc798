#!/usr/bin/env bash
# dmg (UDIF), read only, against qemu-img/qemu-io 7.2 at test time.
# Debian has no tool that writes UDIF images (libdmg-hfsplus is not
# packaged), so they are written by the generator of fmt-foreign.bash
# following the layout QEMU's block/dmg.c reads (koly trailer, mish
# tables in an XML property list or a resource fork, zero, ignore, raw,
# zlib, bzip2 and lzfse chunks); qemu-img is the referee for every read
# it can make: convert to raw, info (human and JSON) and map equal, its
# warnings about chunks it drops, writing and creating refused as
# qemu-img refuses. bzip2 chunks, which Debian's qemu-img cannot read (no
# dmg-bz2 module), and raw chunks ending inside a sector, where QEMU reads
# stale memory, are checked against the generator's own bytes. A
# corruption corpus fails where qemu-img fails, with an error naming the
# file, and reads what it reads, the file unchanged.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
source "$(dirname "$0")/fmt-functions.bash"
source "$(dirname "$0")/fmt-foreign.bash"
requires qemu-img qemu-io python3
tmpdir
# Debian's qemu-img names the modules it could not load at every dmg open.
QEMU_NOISE='^qemu: module '

fmtgen
python3 - <<'PYEOF'
from fmtgen import *
def save(name, disk):
    open(name + '.expect', 'wb').write(disk)
dmg('plist.dmg', [('zlib', pat(1, 70144)), ('zero', 100), ('raw', pat(9, 5120)),
                  ('ignore', 3), ('comment',), ('zlib', pat(0x40, 300032))],
    blocks=2)
dmg('rsrc.dmg', [('raw', pat(2, 4096)), ('zlib', pat(0x40, 30208)),
                 ('zero', 1000)], form='rsrc', blocks=3, tail=100)
dmg('many.dmg', [(('zlib', pat(i, 1024)) if i % 3 else ('zero', 5))
                 for i in range(120)], blocks=4)
dmg('bigzero.dmg', [('raw', pat(3, 512)), ('zero', 4000), ('raw', pat(4, 512))])
dmg('odd-tail.dmg', [('zlib', pat(5, 8192))], tail=300)
dmg('bad-tail.dmg', [('zlib', pat(5, 8192))], tail=450)  # koly not found
save('bzip2', dmg('bzip2.dmg', [('raw', pat(2, 4096)), ('bzip2', pat(0x40, 30000)),
                                ('zero', 10), ('bzip2', pat(0x70, 512))]))
save('partial-raw', dmg('partial-raw.dmg', [('zlib', pat(1, 8192)),
                                            ('raw', pat(9, 5000))]))
dmg('lzfse.dmg', [('zlib', pat(1, 4096)), ('lzfse', 8), ('zlib', pat(2, 4096))])
PYEOF

reads_like_qemu plist.dmg rsrc.dmg many.dmg bigzero.dmg odd-tail.dmg
"$VDISK" io -r -c 'read -P 9 121344 512' -c 'read -P 0 100000 512' \
    plist.dmg > out
grep -c "^read 512/512" out | grep -qx 2 || fail "io read: $(cat out)"

# bzip2: vdisk reads it (libbz2); so does qemu-img when it has dmg-bz2.
"$VDISK" convert -O raw bzip2.dmg v.raw
cmp v.raw bzip2.expect || fail "bzip2.dmg reads differently from its data"
if "$QEMU_IMG" convert -O raw bzip2.dmg q.raw 2> /dev/null; then
    cmp q.raw v.raw || fail "bzip2.dmg: qemu-img reads it otherwise"
fi
# A raw chunk ending inside a sector: zeros after its data (QEMU: stale).
"$VDISK" convert -O raw partial-raw.dmg v.raw
cmp v.raw partial-raw.expect || fail "partial-raw.dmg reads differently"
# lzfse: dropped with QEMU's warning, its sectors unreadable in both.
CORPUS_OWN_WORDS=1 corpus_like_qemu lzfse.dmg
same_filtered info lzfse.dmg
rm -f v.raw q.raw

# Several readers at once: chunks missing the one-chunk cache are
# inflated by each reader outside the driver's lock, then become the
# cache; many small chunks and 8 workers make the readers meet.
"$QEMU_IMG" convert -O raw many.dmg q.raw 2> /dev/null
for m in 1 8; do
    "$VDISK" convert -m "$m" -O raw many.dmg v.raw
    cmp q.raw v.raw || fail "many.dmg read by $m workers differs from qemu-img's"
done
rm -f v.raw q.raw

refused_like_qemu dmg plist.dmg

# ---- bad input ---------------------------------------------------------

python3 - <<'PYEOF'
from fmtgen import *
import os
# the trailer's fields (plist.dmg), the property list's text
src = open('plist.dmg', 'rb').read()
k = src.rindex(b'koly')
xo = struct.unpack_from('>Q', src, k + 0xd8)[0]
make = lambda name, fn: corrupt('plist.dmg', name, fn, ext='.dmg')
make('no-koly', lambda d: d.__setitem__(slice(k, k + 4), b'kolx'))
make('short', lambda d: d.__delitem__(slice(500, None)))
make('data-fork', put('>Q', k + 0x18, k + 1))
make('sectors-huge', put('>Q', k + 0x1ec, 1 << 60))
make('sectors-more', put('>Q', k + 0x1ec, 5000))
make('no-tables', put('>Q', k + 0xe0, 0))
make('xml-past', put('>Q', k + 0xe0, k))
make('xml-unclosed', lambda d: d.__setitem__(
    slice(d.rindex(b'</data>'), d.rindex(b'</data>') + 7), b'</dat>!'))
make('xml-nul', lambda d: d.__setitem__(xo + 10, 0))
make('b64-junk', lambda d: d.__setitem__(
    slice(d.index(b'<data>') + 20, d.index(b'<data>') + 60), b'*' * 40))
# the resource fork (rsrc.dmg, whose trailer is followed by 100 bytes)
src = open('rsrc.dmg', 'rb').read()
k = src.rindex(b'koly')
ro = struct.unpack_from('>Q', src, k + 0x28)[0]
make = lambda name, fn: corrupt('rsrc.dmg', 'rsrc-' + name, fn, ext='.dmg')
make('past', put('>Q', k + 0x30, k))
make('data-off', put('>I', ro, 1 << 20))
make('count0', put('>I', ro + 8, 0))
make('count-wrap', put('>I', ro + 8, 0xffffff00))
make('res-len0', put('>I', ro + 256, 0))
make('res-len-past', put('>I', ro + 256, 1 << 20))
make('not-mish', put('>I', ro + 260, 0x6d697369))
# chunk entries of plist.dmg's first table (in the XML: rewritten, the
# trailer's XML length updated)
src = open('plist.dmg', 'rb').read()
def with_chunk(name, off, fmt, value, index):
    d = bytearray(src)
    a = d.index(b'<data>') + 6
    b = d.index(b'</data>')
    m = bytearray(base64.b64decode(bytes(d[a:b])))
    struct.pack_into(fmt, m, 204 + 40 * index + off, value)
    new = base64.b64encode(bytes(m))
    d[a:b] = new
    k = len(d) - 512
    xl = struct.unpack_from('>Q', d, k + 0xe0)[0]
    struct.pack_into('>Q', d, k + 0xe0, xl + len(new) - (b - a))
    open('bad-chunk-' + name + '.dmg', 'wb').write(d)
for name, off, fmt, value, index in [
        ('type-adc', 0, '>I', 0x80000004, 0),
        ('type-junk', 0, '>I', 0x1234, 0),
        ('count-max', 0x10, '>Q', (64 << 20) // 512 + 1, 0),
        ('zero-count-huge', 0x10, '>Q', 1 << 40, 1),
        ('length-max', 0x20, '>Q', (64 << 20) + 1, 0),
        ('length-short', 0x20, '>Q', 100, 0),
        ('offset-eof', 0x18, '>Q', 1 << 30, 0),
        ('offset-huge', 0x18, '>Q', (1 << 63) + 5, 0),
        ('sector-back', 8, '>Q', 1000, 0)]:
    with_chunk(name, off, fmt, value, index)
PYEOF
CORPUS_OWN_WORDS=1 corpus_like_qemu bad-*.dmg
