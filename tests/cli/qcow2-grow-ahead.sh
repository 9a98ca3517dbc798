#!/usr/bin/env bash
# Regression: qcow2 grew its file ahead with a zero write from the file's
# end, which wiped the data of clusters allocated just before (past the
# end then) whose writes were still in flight: an active commit, and
# convert -W with several threads, lost whole 1 MiB pieces that read
# back as zeros. Concurrent allocating writers past the end of the file,
# many times over, must leave exactly the source's bytes (qemu-img
# compare, qemu-img check).
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io
tmpdir

# 48 MiB of data in 1 MiB pieces, each its own pattern, 1 MiB apart: 768
# clusters to allocate, well past the 64 after which the file is grown.
$QEMU_IMG create -q -f raw src.raw 96M
cmds=()
for i in $(seq 0 47); do
    cmds+=(-c "write -P $((i + 1)) $((i * 2))M 1M")
done
$QEMU_IO -f raw "${cmds[@]}" src.raw >/dev/null

for run in $(seq 1 10); do
    rm -f out.qcow2
    # -W: the 8 threads write as they finish, so allocations overlap.
    $VDISK convert -W -m 8 -f raw -O qcow2 src.raw out.qcow2
    $QEMU_IMG compare -q src.raw out.qcow2 ||
        fail "run $run: the copy differs from the source"
    $QEMU_IMG check -q out.qcow2 || fail "run $run: check"
done
