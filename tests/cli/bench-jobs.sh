#!/usr/bin/env bash
# bench/jobs.sh in its smoke mode (64 MiB image, one run per daemon and
# workload): the script still drives qemu-storage-daemon and `vdisk serve`
# through mirror, backup and active commit with and without fio's writes,
# its own check finds the target (or base) equal to the source after the
# jobs without load, and the table has a row of figures for each of the
# six workloads. Timings are printed, never judged.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-storage-daemon python3 fio
fio --enghelp=nbd >/dev/null 2>&1 || { echo "fio has no nbd engine"; exit 77; }
tmpdir

bench=$(cd "$(dirname "$0")/../.." && pwd)/bench/jobs.sh
st=0
BENCH_SMOKE=1 BENCH_DIR=$PWD VDISK=$VDISK timeout 300 "$bench" >out 2>&1 || st=$?
cat out
[ "$st" = 0 ] || fail "bench/jobs.sh exited with status $st"
for w in mirror backup commit "mirror \+ fio" "backup \+ fio" "commit \+ fio"; do
    # name, two times, their ratio, and the RSS columns: a row of figures.
    grep -qE "^$w +[0-9.]+ +[0-9.]+ +[0-9.]+ .* [0-9]+M +[0-9]+M +[0-9.]+" out ||
        fail "no figures for '$w'"
done
if grep -q FAILED out; then
    fail "a workload failed"
fi
