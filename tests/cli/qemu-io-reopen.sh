#!/usr/bin/env bash
# qemu-io's reopen, run by QEMU's qemu-io and by vdisk under qemu-io's
# name on copies of the same images: -r/-w, -c CACHE and -o OPTIONS print
# what qemu-io prints and leave the same data (qemu-img compare and map
# are the referees); reopening read-write an image another process has
# open fails with QEMU's lock message and writes nothing.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/io-functions.bash"
requires qemu-img qemu-io
tmpdir

map_same()
{
    "$QEMU_IMG" map --output=json -f "$1" "q/$2" > q.map
    "$QEMU_IMG" map --output=json -f "$1" "v/$2" > v.map
    diff -u q.map v.map || fail "qemu-img map differs after: $3"
}

for fmt in $(io_formats); do
    rm -rf q v
    io_create "$fmt" disk.img 4M

    # The mode, back and forth, with writes in between.
    io_compare -f "$fmt" \
        -c 'write -P 0x11 0 64k' -c 'reopen -r' -c 'write -P 0x12 0 4k' \
        -c 'read -P 0x11 0 64k' -c 'reopen -w' -c 'write -P 0x13 64k 64k' \
        -c 'reopen -r -w' -c 'reopen -w -w' -c 'read -P 0x13 64k 64k' \
        disk.img
    io_compare -f "$fmt" -r -c 'write 0 512' -c 'reopen -w' \
        -c 'write -P 0x14 1M 4k' -c 'reopen -r' -c 'write 0 512' disk.img
    io_compare -f "$fmt" -c 'reopen -r -o read-only=off' \
        -c 'reopen -o read-only=on,discard=bogus' -c 'write -P 0x15 2M 4k' \
        disk.img
    # Cache modes, and the driver's options.
    io_compare -f "$fmt" -c 'reopen -c none' -c 'write -P 0x16 3M 64k' \
        -c 'reopen -c writethrough' -c 'write -z 3M 4k' \
        -c 'reopen -c unsafe' -c 'flush' -c 'reopen -c directsync' \
        -c 'reopen -c bogus' -c 'reopen -c none -o cache.direct=on' \
        -c 'reopen -o cache.direct=off,cache.no-flush=on' \
        -c 'read -P 0 3M 4k' -c 'read -P 0x16 3140k 60k' disk.img
    io_compare -f "$fmt" -c 'reopen -o nosuch=1' -c 'reopen -o driver=vmdk' \
        -c "reopen -o driver=$fmt" -c 'reopen -o file.locking=off' \
        -c 'reopen -o discard=ignore' -c 'discard 0 64k' \
        -c 'reopen -o discard=unmap,detect-zeroes=unmap' \
        -c 'write -P 0 64k 64k' -c 'reopen -o detect-zeroes=off' \
        -c 'reopen extra' -c 'reopen -x' disk.img
    map_same "$fmt" disk.img "discard and zero detection after reopen"
    assert_same_content -f "$fmt" -F "$fmt" q/disk.img v/disk.img
done

# qcow2's own options: the driver opens again with them, and the image
# stays consistent (qemu-img check on both).
rm -rf q v
io_create qcow2 disk.qcow2 4M
io_compare -c 'reopen -o lazy-refcounts=on' -c 'write -P 0x21 0 128k' \
    -c 'reopen -o lazy-refcounts=off,l2-cache-size=1M' \
    -c 'write -P 0x22 1M 64k' -c 'reopen -o lazy-refcounts=bogus' \
    -c 'reopen -o l2-cache-size=2M' -c 'read -P 0x21 0 128k' disk.qcow2
"$QEMU_IMG" check q/disk.qcow2 > q.check 2>&1 || true
"$QEMU_IMG" check v/disk.qcow2 > v.check 2>&1 ||
    fail "vdisk left an inconsistent image: $(cat v.check)"
map_same qcow2 disk.qcow2 "qcow2 option reopen"
assert_same_content q/disk.qcow2 v/disk.qcow2

# raw's: a window on the file.
rm -rf q v
io_create raw disk.raw 1M
io_compare -f raw -c 'reopen -o size=4096' -c 'length' \
    -c 'write -P 0x31 0 4k' -c 'write 4k 512' -c 'reopen -o offset=512' \
    -c 'length' -c 'read -v 0 16' disk.raw
cmp q/disk.raw v/disk.raw || fail "raw window reopen: the files differ"

# Another process has the image open (read-only, QEMU's or vdisk's
# qemu-io): reopening read-write must fail with QEMU's lock message and
# hint, the node stays read-only, and nothing is written.
rm -rf q v
io_create qcow2 disk.qcow2 4M
# The holders still running (a failing check exits in the middle).
holders=
kill_holders()
{
    [ -z "$holders" ] || kill $holders 2> /dev/null
}
cleanup_fn kill_holders
for holder in "$QEMU_IO" "$VDISK_QEMU_IO"; do
    for d in q v; do
        (cd $d && exec "$holder" -r -c 'sleep 30000' disk.qcow2) \
            > /dev/null 2>&1 &
        eval "pid_$d=$!"
    done
    holders="$pid_q $pid_v"
    # Both holders must hold their locks before the tools run. Watched in
    # /proc/locks, not by opening the image read-write: such a probe holds
    # the write lock for a moment, and a holder starting in that moment
    # fails its own open and exits, leaving no lock at all.
    for d in q v; do
        inode=$(stat -c %i "$d/disk.qcow2")
        for i in $(seq 300); do
            grep -q ":$inode " /proc/locks && break
            eval "kill -0 \$pid_$d" 2> /dev/null ||
                fail "the holder of $d/disk.qcow2 exited"
            [ "$i" = 300 ] && fail "the holder of $d/disk.qcow2 took no lock"
            sleep 0.1
        done
    done
    io_compare -r -c 'reopen -w' -c 'write -P 0x41 0 4k' -c 'reopen -r' \
        -c 'read -P 0 0 4k' disk.qcow2
    grep -q 'Failed to get "write" lock' v.err ||
        fail "no lock error from vdisk: $(cat v.err)"
    grep -q 'Is another process using the image \[disk.qcow2\]?' v.err ||
        fail "no lock hint from vdisk: $(cat v.err)"
    kill_holders
    wait "$pid_q" "$pid_v" 2> /dev/null || true
    holders=
done
"$QEMU_IO" -c 'read -P 0 0 4k' v/disk.qcow2 | grep -q 'verification failed' &&
    fail "a refused reopen let a write through"
assert_same_content q/disk.qcow2 v/disk.qcow2
exit 0
