#!/usr/bin/env bash
# qcow2 grows its file ahead of its allocation (32 MiB fallocate
# ZERO_RANGE steps, docs/qcow2.md) on a disk file system, not on tmpfs,
# where each step was a 6 ms stall under the metadata lock that gains
# nothing (bl.memory_backed). A 64 MiB convert into a qcow2 on /dev/shm
# makes no such call; the same into the test directory does, unless that
# is in memory too. The copies compare equal to the source either way.
source "$(dirname "$0")/../functions.sh"
requires qemu-img strace stat
tmpdir

[ -d /dev/shm ] && [ -w /dev/shm ] &&
    [ "$(stat -f -c %T /dev/shm)" = tmpfs ] || { echo "no tmpfs /dev/shm"; exit 77; }
shm=$(mktemp -d /dev/shm/vdisk-test.XXXXXX) || fail "mktemp in /dev/shm"
cleanup_fn rm -rf "$shm"

head -c 64M /dev/urandom > src.raw
# grows DIR: how many zero writes of a MiB or more the convert into DIR
# made (grow-ahead steps; nothing else of a convert zeroes that much).
grows()
{
    rm -f "$1/out.qcow2"
    # (LeakSanitizer cannot run under ptrace; the rest of ASan can.)
    ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0" \
        strace -f -e trace=fallocate -o st.log \
        "$VDISK" convert -f raw -O qcow2 src.raw "$1/out.qcow2" ||
        fail "convert into $1"
    $QEMU_IMG compare -q src.raw "$1/out.qcow2" || fail "the copy in $1 differs"
    awk '/FALLOC_FL_ZERO_RANGE/ { gsub(/[^0-9]/, " ", $0); n = split($0, a, " ");
         if (a[n - 1] >= 1048576) c++ } END { print c + 0 }' st.log
}

n=$(grows "$shm")
[ "$n" = 0 ] || fail "$n grow-ahead zero writes into a file on tmpfs"
if [ "$(stat -f -c %T .)" != tmpfs ]; then
    n=$(grows "$PWD")
    [ "$n" -ge 1 ] || fail "no grow-ahead into $(stat -f -c %T .) (the check above proves nothing)"
fi
exit 0
