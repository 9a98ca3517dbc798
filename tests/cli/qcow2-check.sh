#!/usr/bin/env bash
# vdisk check on qcow2 images with leaks, refcount errors, wrong COPIED
# flags and broken refcount structures: the same findings (stderr lines),
# JSON and exit status as qemu-img check, and `-r leaks` / `-r all` leave
# an image that qemu-img check calls clean, with the content qemu-img's
# own repair gives.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io python3
tmpdir

patch()   # FILE OFFSET FORMAT VALUE (big endian)
{
    python3 -c '
import struct, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(int(sys.argv[2], 0))
    f.write(struct.pack(">" + sys.argv[3], int(sys.argv[4], 0)))
' "$@"
}

# Drops the program name qemu-img puts before some messages, and QEMU's
# note that it marked the image corrupt (a vdisk check never marks it).
filter()
{
    sed -e 's/^qemu-img: //' -e 's/^vdisk: //' \
        -e '/^qcow2: Marking image as corrupt/d' "$1"
}

# compare_check IMAGE [CHECK-ARGS...]: run both checkers on copies.
compare_check()
{
    local img=$1 qrc=0 vrc=0
    shift
    cp "$img" q.qcow2
    cp "$img" v.qcow2
    $QEMU_IMG check "$@" --output=json q.qcow2 >q.json 2>q.err || qrc=$?
    "$VDISK" check "$@" --output=json v.qcow2 >v.json 2>v.err || vrc=$?
    [ "$vrc" = "$qrc" ] || fail "$img $*: exit $vrc, qemu-img $qrc"
    diff <(filter q.err) <(filter v.err) ||
        fail "$img $*: messages differ"
    if [ "$qrc" = 1 ]; then
        # The check could not run (e.g. -r leaks when a rebuild is
        # needed): no JSON from either, and nothing more to compare.
        [ ! -s v.json ] || fail "$img $*: JSON after a failed check"
        return 0
    fi
    json_equal_filtered q.json v.json filename ||
        fail "$img $*: JSON differs"
    if [ $# -gt 0 ]; then
        # After a repair qemu-img must find the image as clean as its own
        # repair left it (-r leaks leaves errors), with the same content.
        qrc=0; $QEMU_IMG check q.qcow2 >/dev/null 2>&1 || qrc=$?
        vrc=0; $QEMU_IMG check v.qcow2 >/dev/null 2>&1 || vrc=$?
        [ "$vrc" = "$qrc" ] ||
            fail "$img $*: qemu-img check says $vrc after vdisk's repair," \
                 "$qrc after its own"
        assert_same_content q.qcow2 v.qcow2
    fi
}

check_all()   # IMAGE: plain check, -r leaks, -r all
{
    compare_check "$1"
    compare_check "$1" -r leaks
    compare_check "$1" -r all
}

# Clean images of several kinds.
$QEMU_IMG create -q -f qcow2 base.qcow2 4M
$QEMU_IO -c 'write -q -P 0x11 0 128k' -c 'write -q -P 0x22 1M 64k' \
    -c 'write -q -z 2M 64k' base.qcow2
check_all base.qcow2

$QEMU_IMG create -q -f qcow2 -o cluster_size=4k,refcount_bits=1 rc1.qcow2 1M
$QEMU_IO -c 'write -q -P 0x33 0 12k' -c 'write -q -P 0x44 512k 4k' rc1.qcow2
check_all rc1.qcow2

$QEMU_IMG create -q -f qcow2 -o compat=0.10,cluster_size=512 v2.qcow2 1M
$QEMU_IO -c 'write -q -P 0x55 0 8k' -c 'write -q -P 0x66 100k 1k' v2.qcow2
check_all v2.qcow2

$QEMU_IMG create -q -f qcow2 -o extended_l2=on,cluster_size=64k l2x.qcow2 4M
$QEMU_IO -c 'write -q -P 0x77 0 8k' -c 'write -q -z 64k 4k' l2x.qcow2
check_all l2x.qcow2

# Persistent bitmaps: the directory, tables and bitmap clusters count.
cp base.qcow2 bitmap.qcow2
$QEMU_IMG bitmap --add bitmap.qcow2 b0
$QEMU_IMG bitmap --add -g 512 bitmap.qcow2 b1
$QEMU_IO -c 'write -q -P 0x12 0 1M' bitmap.qcow2
check_all bitmap.qcow2

# External data file: data clusters are not refcounted.
$QEMU_IMG create -q -f qcow2 -o data_file=ext.data ext.qcow2 4M
$QEMU_IO -c 'write -q -P 0x21 64k 128k' ext.qcow2
compare_check ext.qcow2

cp base.qcow2 snap.qcow2
$QEMU_IMG snapshot -c s1 snap.qcow2
$QEMU_IO -c 'write -q -P 0x88 0 64k' snap.qcow2
check_all snap.qcow2

# Leak: a cluster past the data with refcount 1 and no reference.
cp base.qcow2 leak.qcow2
truncate -s +64k leak.qcow2
n=$(( $(stat -c %s base.qcow2) / 65536 ))
patch leak.qcow2 $((0x20000 + 2 * n)) H 1
check_all leak.qcow2

# Refcount too high on a data cluster: a leak and a wrong COPIED flag.
cp base.qcow2 high.qcow2
patch high.qcow2 $((0x20000 + 2 * 5)) H 2
check_all high.qcow2

# Refcount 0 on a referenced cluster: needs a rebuild.
cp base.qcow2 zero.qcow2
patch zero.qcow2 $((0x20000 + 2 * 6)) H 0
check_all zero.qcow2

# Rebuild across many refcount blocks and a multi-cluster refcount table:
# 512-byte clusters with 64-bit refcounts (64 entries per block).
$QEMU_IMG create -q -f qcow2 -o cluster_size=512,refcount_bits=64 small.qcow2 8M
$QEMU_IO -c 'write -q -P 0x31 0 2M' -c 'write -q -P 0x32 5M 300k' small.qcow2
check_all small.qcow2
cp small.qcow2 small-broken.qcow2
rt=$(python3 -c '
import struct, sys
d = open("small.qcow2", "rb").read(64)
print(struct.unpack(">Q", d[48:56])[0])')
# Drop the third refcount block from the table: its clusters count 0.
patch small-broken.qcow2 $((rt + 16)) Q 0
check_all small-broken.qcow2

# Refcount too low but not 0 (shared by a snapshot): fixed in place.
cp snap.qcow2 low.qcow2
patch low.qcow2 $((0x20000 + 2 * 6)) H 1
check_all low.qcow2

# COPIED flag missing in an L2 entry and in the L1 entry.
cp base.qcow2 copied.qcow2
patch copied.qcow2 $((0x40000)) Q 0x50000
patch copied.qcow2 $((0x30000)) Q 0x40000
check_all copied.qcow2

# Refcount block shared with data: must be rebuilt.
cp base.qcow2 rbshare.qcow2
patch rbshare.qcow2 $((0x10000)) Q 0x50000
check_all rbshare.qcow2

# Misaligned preallocated zero cluster (fixed by making it plain zero)
# and misaligned data cluster (reported only).
cp base.qcow2 misal.qcow2
patch misal.qcow2 $((0x40000 + 8)) Q 0x8000000000060201
patch misal.qcow2 $((0x40000 + 16)) Q 0x8000000000070200
compare_check misal.qcow2

# Refcount table entry with reserved bits.
cp base.qcow2 rtres.qcow2
patch rtres.qcow2 $((0x10000)) Q 0x20001
check_all rtres.qcow2

# A lazy-refcounts image left dirty by a crash (qemu-io sigraise).
$QEMU_IMG create -q -f qcow2 -o lazy_refcounts=on lazy.qcow2 16M
# (The subshell keeps bash's "Killed" notice out of the log.)
( $QEMU_IO -c 'write -q -P 0x99 0 256k' -c 'sigraise 9' lazy.qcow2 || true ) \
    2>/dev/null
check_all lazy.qcow2

# Compressed clusters count as allocated, compressed and fragmented.
python3 -c 'import sys; sys.stdout.buffer.write(b"compress me " * 40000)' \
    > text.raw
$QEMU_IMG convert -q -c -f raw -O qcow2 text.raw comp.qcow2
check_all comp.qcow2
