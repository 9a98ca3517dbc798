#!/usr/bin/env bash
# bochs (growing redolog), read only, against qemu-img/qemu-io 7.2 at
# test time. Debian's bximage comes only with the whole bochs emulator,
# so the images are written here by a small generator following the
# layout QEMU's block/bochs.c reads (header, catalog, per-extent bitmap
# and sectors); qemu-img is the referee for every read: convert to raw,
# info (human and JSON) and map equal, writing/creating/checking refused
# as qemu-img refuses, and a corruption corpus that fails where qemu-img
# fails (with an error naming the file) and reads what it reads, the
# file unchanged.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
source "$(dirname "$0")/fmt-functions.bash"
source "$(dirname "$0")/fmt-foreign.bash"
requires qemu-img qemu-io python3 sha256sum
tmpdir

fmtgen
python3 - <<'PYEOF'
from fmtgen import *
bochs('plain.img', 8 << 20, fill=[(0, pat(1, 4096)), (100, pat(9, 1024)),
                                  (9000, pat(0x30, 65536)), (16383, pat(7, 512))])
bochs('v1.img', 4 << 20, version=1, extent=4096, fill=[(3, pat(0x44, 512)),
                                                      (8191, pat(5, 512))])
bochs('small-extent.img', 1 << 20, extent=512, fill=[(1, pat(2, 2048))])
bochs('big-extent.img', 24 << 20, extent=8 << 20, fill=[(20000, pat(3, 8192))])
bochs('odd-size.img', 1000001, fill=[(1950, pat(8, 1024))])
bochs('empty.img', 0, catalog=0)
bochs('header-1k.img', 2 << 20, header=1024, fill=[(50, pat(6, 4096))])
PYEOF

reads_like_qemu plain.img v1.img small-extent.img big-extent.img odd-size.img \
    empty.img header-1k.img
"$VDISK" io -r -c 'read -P 0x30 4608000 512' -c 'read -P 2 512 512' \
    plain.img > out
grep -q "^read 512/512" out || fail "io read: $(cat out)"

# ---- refusals, in qemu-img's words ------------------------------------

refused_like_qemu bochs plain.img

# ---- bad input ---------------------------------------------------------

python3 - <<'PYEOF'
from fmtgen import *
make = lambda name, fn: corrupt('plain.img', name, fn)
make('magic', lambda d: d.__setitem__(3, 0x41))
make('subtype', lambda d: d.__setitem__(slice(48, 56), b'Undoable'))
make('version', put('<I', 64, 0x30000))
make('catalog-huge', put('<I', 72, 0x100001))
make('catalog-small', put('<I', 72, 255))
make('catalog-max', put('<I', 72, 0x100000))
make('extent-small', put('<I', 80, 256))
make('extent-odd', put('<I', 80, 3000))
make('extent-big', put('<I', 80, 16 << 20))
make('bitmap-zero', put('<I', 76, 0))
make('bitmap-huge', put('<I', 76, 0xffffffff))
make('disk-huge', put('<Q', 88, (1 << 64) - 1))
make('header-eof', put('<I', 68, 0xfffffff0))
make('entry-eof', put('<I', 512, 0x100000))
make('entry-max', put('<I', 512, 0xfffffffe))
make('short', lambda d: d.__delitem__(slice(300, None)))
make('no-extents', lambda d: d.__delitem__(slice(512 + 256 * 4, None)))
PYEOF
corpus_like_qemu bad-*.img
