#!/usr/bin/env python3
# Writes the compressible, deterministic sources of bench/run.sh's
# convert -c cases (usage below).
"""Compressible, deterministic source images for the convert -c cases.

    text-image.py text SIZE OUT
        OUT: SIZE bytes of text-like data (a raw image, fully allocated).
    text-image.py sparse TEXT OUT SIZE DATA
        OUT: a sparse raw image of SIZE bytes holding DATA bytes taken in
        turn from the file TEXT, in runs: every 8 MiB slot holds
        DATA * 8 MiB / SIZE bytes of it in 1 to 4 runs of random lengths
        at random places (4 KiB aligned), holes elsewhere.

The text is words drawn with a fixed seed from the vocabulary of the
copyright and README files under /usr/share/doc, each word as often as
it is there (Zipf-like, as in prose), in sentences of 12 words: deflate
with QEMU's 4 KiB window stores it at about 45% of its size, which is
what text, logs and binaries give rather than the 1% of a repeated
pattern or the 100% of random bytes. The same machine gives the same
bytes; another machine's /usr/share/doc gives other words and much the
same ratio.
"""
import collections
import itertools
import os
import random
import re
import sys


def vocabulary():
    count = collections.Counter()
    for root, dirs, files in os.walk('/usr/share/doc'):
        dirs.sort()
        for name in sorted(files):
            if not name.startswith(('copyright', 'README')):
                continue
            try:
                with open(os.path.join(root, name), errors='ignore') as f:
                    count.update(re.findall(r'[A-Za-z]{1,16}', f.read()))
            except OSError:
                pass
    if len(count) < 100:
        # A machine without docs: a made-up vocabulary, same shape.
        rng = random.Random(3)
        for i in range(5000):
            word = ''.join(rng.choice('etaoinshrdlucmfwypvbgkqjxz')
                           for _ in range(rng.randint(2, 10)))
            count[word] = 5000 // (i + 1) + 1
    words = sorted(count, key=lambda w: (-count[w], w))
    return words, list(itertools.accumulate(count[w] for w in words))


def text(size, out):
    words, cum = vocabulary()
    rng = random.Random(17)
    left = size
    with open(out, 'wb') as f:
        while left > 0:
            batch = rng.choices(words, cum_weights=cum, k=200000)
            for i in range(0, len(batch), 12):
                batch[i] += '.\n' if rng.random() < 0.3 else ','
            b = (' '.join(batch) + '\n').encode()[:left]
            f.write(b)
            left -= len(b)


def sparse(text_path, out, size, data):
    slot, blk = 8 << 20, 4096
    per = data * slot // size // blk      # data blocks per slot
    free = slot // blk - per
    rng = random.Random(8)
    src = open(text_path, 'rb')
    src_len = os.fstat(src.fileno()).st_size
    src_pos = 0
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.ftruncate(fd, size)
    for start in range(0, size, slot):
        n = rng.randint(1, 4)
        cuts = sorted(rng.sample(range(1, per), n - 1))
        lens = [b - a for a, b in zip([0] + cuts, cuts + [per])]
        gaps = sorted(rng.randint(0, free) for _ in range(n))
        pos, prev = start, 0
        for length, gap in zip(lens, gaps):
            pos += (gap - prev) * blk
            prev = gap
            length *= blk
            if src_pos + length > src_len:
                src_pos = 0
            os.pwrite(fd, os.pread(src.fileno(), length, src_pos), pos)
            src_pos += length
            pos += length
    os.close(fd)


if __name__ == '__main__':
    if len(sys.argv) == 4 and sys.argv[1] == 'text':
        text(int(sys.argv[2]), sys.argv[3])
    elif len(sys.argv) == 6 and sys.argv[1] == 'sparse':
        sparse(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        sys.exit(__doc__)
