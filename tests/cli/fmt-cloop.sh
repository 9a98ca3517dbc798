#!/usr/bin/env bash
# cloop, read only, against qemu-img/qemu-io 7.2 at test time. The images
# are written by a generator following the layout QEMU's block/cloop.c
# reads (tests/cli/fmt-foreign.bash: Debian's cloop-utils writes the V4
# layout, which QEMU does not read); qemu-img is the referee for every
# read: convert to raw, info (human and JSON) and map equal, writing,
# creating and checking refused as qemu-img refuses, and a corruption
# corpus (block size, block count, offsets past the end, decreasing or
# oversized, undecodable blocks) that fails where qemu-img fails, with an
# error naming the file, and reads what it reads, the file unchanged.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
source "$(dirname "$0")/fmt-functions.bash"
source "$(dirname "$0")/fmt-foreign.bash"
requires qemu-img qemu-io python3
tmpdir

fmtgen
python3 - <<'PYEOF'
from fmtgen import *
data = pat(1, 300 * 1024) + bytes(200 * 1024) + pat(0x80, 100 * 1024)
cloop('plain.img', 65536, data)
cloop('small.img', 512, pat(3, 8 * 1024))
cloop('odd.img', 4096 * 3, pat(5, 100000))
cloop('stored.img', 16384, pat(7, 64 * 1024), level=0)
cloop('empty.img', 65536, b'')
# The V3.0 script: the same layout; QEMU reads it with -f cloop only.
cloop('v3.img', 65536, data,
      magic=b'#!/bin/sh\n#V3.0 Format\nmodprobe cloop file=$0\n')
PYEOF

reads_like_qemu plain.img small.img odd.img stored.img empty.img
same info -f cloop v3.img
"$QEMU_IMG" convert -f cloop -O raw v3.img q.raw
"$VDISK" convert -f cloop -O raw v3.img v.raw
cmp q.raw v.raw || fail "v3.img reads differently"
"$VDISK" io -r -c 'read -P 1 0 512' -c 'read -P 0 400k 64k' plain.img > out
grep -c "^read" out | grep -qx 2 || fail "io read: $(cat out)"

# ---- refusals, in qemu-img's words ------------------------------------

refused_like_qemu cloop plain.img

# ---- bad input ---------------------------------------------------------

python3 - <<'PYEOF'
from fmtgen import *
make = lambda name, fn: corrupt('plain.img', name, fn)
make('bs-zero', put('>I', 128, 0))
make('bs-odd', put('>I', 128, 1000))
make('bs-big', put('>I', 128, (64 << 20) + 512))
make('bs-max', put('>I', 128, 64 << 20))
make('bs-wrong', put('>I', 128, 32768))
make('n-huge', put('>I', 132, 0xffffffff))
make('n-limit', put('>I', 132, (0xfffffffe // 8) + 1))
make('n-many', put('>I', 132, 64 << 20))
make('n-eof', put('>I', 132, 1 << 20))
make('n-zero', put('>I', 132, 0))
make('decreasing', put('>Q', 136 + 8 * 3, 5))
make('block-huge', put('>Q', 136 + 8 * 10, 1 << 40))
make('block-big', lambda d: [put('>Q', 136 + 8 * i, (200 << 20) + i)(d)
                             for i in range(5, 11)])
make('past-eof', lambda d: [put('>Q', 136 + 8 * i, (1 << 30) + i)(d)
                            for i in range(2, 11)])
make('junk', lambda d: d.__setitem__(slice(300, 400), bytes(100)))
make('short', lambda d: d.__delitem__(slice(160, None)))
make('header-only', lambda d: d.__delitem__(slice(134, None)))
PYEOF
corpus_like_qemu bad-*.img
