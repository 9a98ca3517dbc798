#!/usr/bin/env bash
# vdisk bench prints what qemu-img bench prints for the same options (with
# the timing number masked), for reads and writes on raw and, when vdisk
# opens it, qcow2; it fails a request past the end as qemu-img does, and
# its writes leave the pattern qemu-img reads back. A test of the tool,
# not of speed.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io
requires_run "$VDISK" bench --help
tmpdir

# Masks the only varying number: "Run completed in 0.123 seconds."
mask()
{
    sed -E 's/^Run completed in [0-9]+\.[0-9]{3} seconds\.$/Run completed in X seconds./'
}

# bench_same FMT ARGS...: both tools on their own copy of base.FMT must
# print the same masked stdout and exit with the same status.
bench_same()
{
    local fmt=$1 qs=0 vs=0
    shift
    cp "base.$fmt" "q.$fmt"
    cp "base.$fmt" "v.$fmt"
    $QEMU_IMG bench -f "$fmt" "$@" "q.$fmt" >q.out 2>q.err || qs=$?
    $VDISK bench -f "$fmt" "$@" "v.$fmt" >v.out 2>v.err || vs=$?
    mask <q.out >q.masked
    mask <v.out >v.masked
    if ! diff -u q.masked v.masked; then
        fail "vdisk bench $* on $fmt: output differs from qemu-img bench"
    fi
    [ "$qs" = "$vs" ] ||
        fail "vdisk bench $* on $fmt: exit status $vs, qemu-img $qs"
    if [ "$qs" = 0 ]; then
        grep -qE '^Run completed in [0-9]+\.[0-9]{3} seconds\.$' v.out ||
            fail "vdisk bench $*: no timing line"
        # Same offsets, same pattern: the images must end up equal.
        $QEMU_IMG compare -q -f "$fmt" -F "$fmt" "q.$fmt" "v.$fmt" ||
            fail "vdisk bench $* on $fmt: wrote other data than qemu-img"
    fi
}

formats=(raw)
$QEMU_IMG create -q -f raw base.raw 8M
$QEMU_IMG create -q -f qcow2 base.qcow2 8M
if $VDISK bench -f qcow2 -c 1 -d 1 base.qcow2 >/dev/null 2>&1; then
    formats+=(qcow2)
else
    echo "qcow2 not supported by vdisk bench yet: testing raw only"
fi

for fmt in "${formats[@]}"; do
    bench_same "$fmt" -c 1000 -d 4
    bench_same "$fmt" -c 1000 -d 4 -w
    bench_same "$fmt" -c 1000 -d 4 -w --pattern=0x5a -s 64k -S 128k -o 1M
    bench_same "$fmt" -c 1000 -d 4 -w --flush-interval=100
    bench_same "$fmt" -c 1000 -d 4 -w --flush-interval=100 --no-drain
    bench_same "$fmt" -c 1000 -d 4 -t none -s 4k
    bench_same "$fmt" -c 100 -d 1 -t writethrough -w
    bench_same "$fmt" -c 0 -d 4
    # Wrapping modulo the image size: 100 steps of 1M over an 8M image,
    # and unaligned sizes, offsets and steps that wrap off the grid.
    bench_same "$fmt" -c 100 -d 4 -S 1M -w --pattern=7
    bench_same "$fmt" -c 300 -d 4 -o 3000 -S 70000 -s 5000 -w --pattern=9
    bench_same "$fmt" -c 50 -d 3 -S 999999 -s 512 -w --pattern=0xff
    # Past the end: both fail the first request.
    bench_same "$fmt" -c 10 -d 4 -o 8M

    # What vdisk wrote, qemu-io reads back: 64k pattern 0x5a at 1M + k*128k
    # (k < 56 before the wrap at 8M - 64k).
    cp "base.$fmt" "p.$fmt"
    $VDISK bench -f "$fmt" -c 8 -d 2 -w --pattern=0x5a -s 64k -S 128k \
        -o 1M "p.$fmt" >/dev/null
    for k in 0 3 7; do
        $QEMU_IO -f "$fmt" -c "read -P 0x5a $((1048576 + k * 131072)) 64k" \
            "p.$fmt" | grep -q '^read 65536/65536' ||
            fail "$fmt: pattern not found at request $k"
    done
    $QEMU_IO -f "$fmt" -c "read -P 0 $((1048576 + 65536)) 64k" "p.$fmt" |
        grep -q '^read' || fail "$fmt: gap between requests was written"
    if [ "$fmt" = qcow2 ]; then
        $QEMU_IMG check -q "p.$fmt" || fail "qcow2 check after vdisk bench -w"
    fi
done

# Option errors: same exit status as qemu-img, nothing on stdout.
for args in "-c x" "-d -1" "--pattern=256" "-t foo" "-i foo" "-s 3G" \
            "--flush-interval=10" "-w --flush-interval=2 -d 4" "-z" ""; do
    qs=0 vs=0
    # shellcheck disable=SC2086
    $QEMU_IMG bench $args base.raw >q.out 2>/dev/null || qs=$?
    # shellcheck disable=SC2086
    $VDISK bench $args base.raw >v.out 2>/dev/null || vs=$?
    [ "$qs" = "$vs" ] || fail "bench $args: exit status $vs, qemu-img $qs"
    [ -s v.out ] && [ "$qs" != 0 ] && fail "bench $args: printed on stdout"
done
$VDISK bench -f raw -c 1 nonexistent.img 2>v.err && fail "opened a missing file"
grep -q "Could not open 'nonexistent.img'" v.err || fail "bad open error"

# --random (vdisk only): its own header line, and it completes.
$VDISK bench -f raw -c 2000 -d 8 --random -w base.raw >v.out
grep -qE '^Sending 2000 random write requests, 4096 bytes each, 8 in parallel' v.out ||
    fail "--random header"
grep -qE '^Run completed in [0-9]+\.[0-9]{3} seconds\.$' v.out ||
    fail "--random timing"
