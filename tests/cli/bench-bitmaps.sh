#!/usr/bin/env bash
# bench/bitmaps.sh in its smoke mode (2 s of fio per configuration, 50
# extents, one run): the script still drives qemu-storage-daemon and
# `vdisk serve` with 0, 1 and 8 recording bitmaps under fio's writes
# (each bitmap must have recorded them), merges a 1 TiB bitmap and reads
# its map over NBD (the map must show every extent written), and prints a
# row of figures for each. Timings are printed, never judged.
source "$(dirname "$0")/../functions.sh"
requires qemu-io qemu-storage-daemon python3 fio nbdinfo
fio --enghelp=nbd >/dev/null 2>&1 || { echo "fio has no nbd engine"; exit 77; }
tmpdir

bench=$(cd "$(dirname "$0")/../.." && pwd)/bench/bitmaps.sh
st=0
BENCH_SMOKE=1 VDISK=$VDISK timeout 300 "$bench" >out 2>&1 || st=$?
cat out
[ "$st" = 0 ] || fail "bench/bitmaps.sh exited with status $st"
for n in 0 1 8; do
    grep -qE "^$n +[0-9]+ \(.*\) +[0-9]+ \(.*\) +[0-9.]+$" out ||
        fail "no figures for $n bitmaps"
done
for w in "block-dirty-bitmap-merge" "nbdinfo --map of the bitmap"; do
    grep -qE "^$w +qemu +[0-9.]+ +vdisk +[0-9.]+ +v/q +[0-9.]+" out ||
        fail "no figures for '$w'"
done
