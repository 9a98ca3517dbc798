#!/usr/bin/env bash
# The file driver's aio modes (docs/filters.md, "file: aio modes"):
# reads, writes (aligned, and unaligned ones that go through the core's
# read-modify-write), zero writes and flushes with aio=threads, io_uring
# and native, with cache=none (O_DIRECT, where the file system has it)
# and writeback, on raw and qcow2. Each session's output and exit status
# must be qemu-io's (same -i and -t) and the images must end up the same
# (qemu-img compare, qemu-img check). With strace: aio=io_uring really
# submits through io_uring, and when io_uring_setup fails (as under a
# seccomp filter) vdisk falls back to preadv/pwritev - tried once per
# process - and writes the same bytes.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/io-functions.bash"
requires qemu-img qemu-io
tmpdir

# O_DIRECT needs a file system that has it (not tmpfs).
caches=writeback
if dd if=/dev/zero of=probe bs=4096 count=1 oflag=direct status=none \
    2>/dev/null; then
    caches="none writeback"
fi
rm -f probe

# The session: aligned 4 KiB and 64 KiB writes, an unaligned one inside
# a block and one across a qcow2 cluster boundary, a zero write, a flush,
# then reads that check every pattern.
session=(-c 'write -P 0x11 0 4k' -c 'write -P 0x22 64k 64k'
         -c 'write -P 0x33 1000 700' -c 'write -P 0x44 130560 1k'
         -c 'write -z 8k 8k' -c 'flush'
         -c 'read -P 0x11 0 1000' -c 'read -P 0x33 1000 700'
         -c 'read -P 0x11 1700 2396' -c 'read -P 0 8k 8k'
         -c 'read -P 0x22 64k 63k' -c 'read -P 0x44 130560 1k'
         -c 'read -P 0 131584 62k')

for fmt in raw qcow2; do
    for cache in $caches; do
        for aio in threads io_uring native; do
            if [ $aio = native ] && [ $cache != none ]; then
                continue   # refused by both without O_DIRECT
            fi
            rm -rf q v
            io_create "$fmt" disk.img 1M
            io_compare -f "$fmt" -t "$cache" -i "$aio" "${session[@]}" \
                disk.img
            "$QEMU_IMG" compare -q -f "$fmt" -F "$fmt" q/disk.img \
                v/disk.img || fail "$fmt $cache aio=$aio: images differ"
            if [ "$fmt" = qcow2 ]; then
                "$QEMU_IMG" check -q v/disk.img ||
                    fail "$fmt $cache aio=$aio: check failed"
            fi
        done
    done
done
# Several threads, each with its own ring (and each ring freed as its
# thread exits: the sanitizers' leak check sees to that).
cache=${caches%% *}
"$QEMU_IMG" create -q -f qcow2 t.qcow2 1M
"$VDISK" bench -f qcow2 -t "$cache" -i io_uring -w --pattern=92 -c 256 -d 4 \
    -s 4k t.qcow2 > b.out 2>&1 || fail "bench with 4 rings: $(cat b.out)"
"$QEMU_IO" -c 'read -q -P 0x5c 0 1M' t.qcow2 > b.out 2>&1 ||
    fail "bench with 4 rings: $(cat b.out)"
"$QEMU_IMG" check -q t.qcow2 || fail "bench with 4 rings: check failed"

# aio=native without O_DIRECT: both refuse alike.
io_create raw n.img 64k
io_compare -f raw -t writeback -i native -c 'read 0 4k' n.img

if ! command -v strace >/dev/null 2>&1; then
    exit 0
fi
# Under strace LeakSanitizer cannot run.
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0"
rm -rf q v
io_create qcow2 disk.img 1M
(cd q && "$QEMU_IO" -t "$cache" "${session[@]}" disk.img > /dev/null)

# aio=io_uring submits every read and write of the data through a ring.
(cd v && strace -f -qq -e trace=io_uring_enter,pwritev,preadv -o ../v.trace \
    "$VDISK_QEMU_IO" -t "$cache" -i io_uring "${session[@]}" disk.img \
    > /dev/null) || fail "vdisk with aio=io_uring failed"
n=$(grep -c '^[0-9]* *io_uring_enter(' v.trace || true)
[ "$n" -ge 13 ] || fail "aio=io_uring: $n io_uring_enter calls"
! grep -Eq '(pwritev|preadv)\(' v.trace ||
    fail "aio=io_uring: preadv/pwritev used: $(grep -E 'pwritev|preadv' v.trace)"
"$QEMU_IMG" compare -q q/disk.img v/disk.img || fail "io_uring: images differ"

# io_uring_setup refused: the same session passes through the system
# calls, and the refusal is remembered (one attempt for 4 threads).
rm -f v/disk.img
"$QEMU_IMG" create -q -f qcow2 v/disk.img 1M
(cd v && strace -f -qq -e inject=io_uring_setup:error=EPERM \
    -e trace=io_uring_setup,io_uring_enter,pwritev -o ../f.trace \
    "$VDISK_QEMU_IO" -t "$cache" -i io_uring "${session[@]}" disk.img \
    > f.out 2>&1) || fail "fallback failed: $(cat v/f.out)"
grep -q 'io_uring_setup(.*= -1 EPERM' f.trace ||
    fail "io_uring_setup was not tried (or not refused)"
! grep -q 'io_uring_enter(' f.trace || fail "a ring was used after a refusal"
grep -q 'pwritev(' f.trace || fail "no pwritev in the fallback"
"$QEMU_IMG" compare -q q/disk.img v/disk.img || fail "fallback: images differ"
"$QEMU_IMG" check -q v/disk.img || fail "fallback: check failed"
strace -f -qq -e inject=io_uring_setup:error=ENOSYS \
    -e trace=io_uring_setup -o b.trace \
    "$VDISK" bench -f qcow2 -t "$cache" -i io_uring -w -c 64 -d 4 -s 4k \
    v/disk.img > b.out 2>&1 || fail "bench fallback failed: $(cat b.out)"
n=$(grep -c 'io_uring_setup(' b.trace || true)
[ "$n" = 1 ] || fail "io_uring_setup tried $n times after a refusal"
"$QEMU_IMG" check -q v/disk.img || fail "bench fallback: check failed"
exit 0
