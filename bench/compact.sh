#!/usr/bin/env bash
# vdisk compact of a 4 GiB qcow2 with 50% holes against qemu-img convert
# -O qcow2 of the same image (issue 18's target: compact at least as fast
# as convert). The image: 4 GiB written, then every other 1 MiB piece
# discarded (2 GiB of data left, holes all over the file). Each run
# times, on the same image:
#
#   - vdisk compact of a fresh copy (the copy itself not timed); it
#     flushes between its phases, so its result is on disk when it ends;
#   - qemu-img convert -O qcow2 to a new file, as qemu-img runs it: the
#     target's cache mode is then `unsafe` (convert's default,
#     ../shared/specs/qemu-img-examples.md), so nothing is flushed and
#     the 2 GiB may still be in the page cache when it ends;
#   - qemu-img convert -t writeback -O qcow2: the same, but the target is
#     flushed when convert closes it, the durability compact gives;
#   - qemu-img convert -O qcow2 of a fresh copy, then mv of the new file
#     over the copy: what gives the space back as compact does (the old
#     file's blocks are freed by the rename; on a file system mounted
#     with -o discard that waits for the discards, as compact's
#     truncation does);
#
# and, as a yardstick for compact's time, the two things its crash
# safety makes it do one after the other (docs/qcow2.md, "Compaction"),
# each alone:
#
#   - dd of as many bytes as compact moves (its dry run says how many
#     clusters) into a new file with conv=fdatasync: the moved data
#     written and on the disk, which must be done before anything points
#     at it;
#   - truncate of a fresh copy of the image to compact's new size,
#     without moving anything: giving the tail's blocks back, which must
#     wait until nothing points into the tail (on a file system mounted
#     with -o discard, one discard per freed extent).
#
# Between two timed commands the old targets are removed and everything
# is synced (not timed), so that no command pays for another's writeback.
# Prints the medians of BENCH_RUNS (3) runs, the ratios convert time /
# compact time (above 1: compact is faster) and the resulting sizes.
# Needs qemu-img, qemu-io and about 9 GiB free in BENCH_DIR (default
# /var/tmp).
#
#   bench/compact.sh        # BENCH_SIZE (4G), BENCH_RUNS (3), BENCH_KEEP=1
#                           # keeps the scratch directory
set -u -o pipefail

source "$(dirname "$0")/functions.bash"
runs=${BENCH_RUNS:-3}
size=${BENCH_SIZE:-4G}
work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/vdisk-compact-bench.XXXXXX") || exit 2
if [ "${BENCH_KEEP:-0}" = 1 ]; then
    echo "keeping $work" >&2
else
    trap 'rm -rf "$work"' EXIT
fi
cd "$work" || exit 2

bytes=$(numfmt --from=iec "$size")
mib=$((bytes >> 20))
echo "preparing a $size image, every other MiB discarded..." >&2
qemu-img create -q -f qcow2 img.qcow2 "$size" || exit 1
cmds=()
# Written in pieces of up to 256 MiB (fewer qemu-io commands), the last
# one cut to the image's end.
for ((i = 0; i < mib; i += 256)); do
    piece=$((mib - i < 256 ? mib - i : 256))
    cmds+=(-c "write -P $((i / 256 % 250 + 1)) ${i}M ${piece}M")
done
qemu-io "${cmds[@]}" img.qcow2 >/dev/null || exit 1
cmds=()
for ((i = 0; i < mib; i += 2)); do
    cmds+=(-c "discard ${i}M 1M")
done
qemu-io "${cmds[@]}" img.qcow2 >/dev/null || exit 1
qemu-img check -q img.qcow2 || exit 1
# What compact will move and the size it will leave, from its dry run.
plan=$("$VDISK" compact --dry-run --output=json img.qcow2) || exit 1
moved=$(sed -n 's/.*"moved-clusters": *\([0-9]*\).*/\1/p' <<<"$plan")
new_size=$(sed -n 's/.*"new-size": *\([0-9]*\).*/\1/p' <<<"$plan")
csize=$(qemu-img info --output=json img.qcow2 |
        sed -n 's/.*"cluster-size": *\([0-9]*\).*/\1/p')
moved_mib=$(((moved * csize + (1 << 20) - 1) >> 20))

now() { date +%s.%N; }
median() { sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
# Syncs (so that no earlier writeback is left to slow it down), then runs
# "$@" and prints its seconds; fails with it.
timed() {
    local t0 t1
    sync
    t0=$(now)
    "$@" || return 1
    t1=$(now)
    printf '%.3f\n' "$(echo "$t1 - $t0" | bc)"
}

# Converts r.qcow2 and puts the result in its place.
replace_by_convert() {
    qemu-img convert -O qcow2 r.qcow2 r.new && mv r.new r.qcow2
}

# The moved bytes written to a new file and flushed.
write_moved() {
    dd if=/dev/zero of=d.raw bs=1M count="$moved_mib" conv=fdatasync \
        status=none
}

tc=() tq=() tw=() tr=() td=() tt=()
for ((r = 0; r < runs; r++)); do
    echo "run $((r + 1)) of $runs..." >&2
    rm -f c.qcow2 q.qcow2 w.qcow2 r.qcow2
    t=$(timed write_moved) || exit 1
    td+=("$t")
    rm -f d.raw
    cp --sparse=always img.qcow2 t.qcow2 || exit 1
    t=$(timed truncate -s "$new_size" t.qcow2) || exit 1
    tt+=("$t")
    rm -f t.qcow2
    cp --sparse=always img.qcow2 c.qcow2 || exit 1
    cp --sparse=always img.qcow2 r.qcow2 || exit 1
    t=$(timed "$VDISK" compact -q c.qcow2) || exit 1
    tc+=("$t")
    t=$(timed qemu-img convert -O qcow2 img.qcow2 q.qcow2) || exit 1
    tq+=("$t")
    t=$(timed qemu-img convert -t writeback -O qcow2 img.qcow2 w.qcow2) ||
        exit 1
    tw+=("$t")
    t=$(timed replace_by_convert) || exit 1
    tr+=("$t")
done
qemu-img check -q c.qcow2 || { echo "compacted image fails check" >&2; exit 1; }
qemu-img compare -q img.qcow2 c.qcow2 || { echo "compacted image differs" >&2; exit 1; }
mc=$(printf '%s\n' "${tc[@]}" | median)
mq=$(printf '%s\n' "${tq[@]}" | median)
mw=$(printf '%s\n' "${tw[@]}" | median)
mr=$(printf '%s\n' "${tr[@]}" | median)
md=$(printf '%s\n' "${td[@]}" | median)
mt=$(printf '%s\n' "${tt[@]}" | median)
printf 'image: %s virtual, %s bytes before; medians of %d runs\n' \
    "$size" "$(stat -c %s img.qcow2)" "$runs"
printf '%-40s %8.2f s  -> %s bytes  (runs: %s)\n' "vdisk compact" "$mc" \
    "$(stat -c %s c.qcow2)" "${tc[*]}"
printf '%-40s %8.2f s  -> %s bytes  (runs: %s)\n' \
    "qemu-img convert -O qcow2 (no flush)" "$mq" "$(stat -c %s q.qcow2)" \
    "${tq[*]}"
printf '%-40s %8.2f s  -> %s bytes  (runs: %s)\n' \
    "qemu-img convert -t writeback -O qcow2" "$mw" "$(stat -c %s w.qcow2)" \
    "${tw[*]}"
printf '%-40s %8.2f s  -> %s bytes  (runs: %s)\n' \
    "qemu-img convert -O qcow2, mv over image" "$mr" "$(stat -c %s r.qcow2)" \
    "${tr[*]}"
printf '%-40s %8.2f s  (runs: %s)\n' \
    "dd of the $moved_mib MiB moved, fdatasync" "$md" "${td[*]}"
printf '%-40s %8.2f s  (runs: %s)\n' "truncate of a copy to $new_size" "$mt" \
    "${tt[*]}"
printf 'dd + truncate (the two steps compact must order): %.2f s; compact / that: %.2f\n' \
    "$(echo "$md + $mt" | bc -l)" "$(echo "$mc / ($md + $mt)" | bc -l)"
printf 'ratio convert/compact (>1: compact faster): %.2f (default), %.2f (-t writeback), %.2f (convert and replace)\n' \
    "$(echo "$mq / $mc" | bc -l)" "$(echo "$mw / $mc" | bc -l)" \
    "$(echo "$mr / $mc" | bc -l)"
