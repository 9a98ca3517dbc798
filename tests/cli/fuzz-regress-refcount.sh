#!/usr/bin/env bash
# Regressions found by tests/fuzz/fuzz-qcow2-snapshot.c in the qcow2
# refcount code; the images are qemu-img images patched at run time.
#
# 1. A refcount table entry above 2^63 (refblock_offset() returned it as a
#    negative "error", truncated to a positive int): every allocation
#    retried forever. Now: a clean error naming the file.
# 2. A snapshot L2 entry pointing far past the end of the file (2^55):
#    applying the snapshot scanned and allocated a refcount table as large
#    as the offset (15 s, 256 MB per call). Now: refused at once, before
#    any write (validate.c), as qemu-img refuses it.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io python3 sha256sum timeout
tmpdir

# poke FILE OFFSET VALUE: a big-endian u64 at OFFSET.
poke()
{
    python3 - "$@" <<'EOF'
import struct, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(int(sys.argv[2], 0))
    f.write(struct.pack(">Q", int(sys.argv[3], 0)))
EOF
}

# be64 FILE OFFSET: print the big-endian u64 at OFFSET.
be64()
{
    python3 - "$@" <<'EOF'
import struct, sys
with open(sys.argv[1], "rb") as f:
    f.seek(int(sys.argv[2], 0))
    print(struct.unpack(">Q", f.read(8))[0])
EOF
}

# expect_clean_failure IMAGE CMD...: CMD fails with status 1 within the
# time limit and a message naming IMAGE.
expect_clean_failure()
{
    local img=$1 st=0
    shift
    timeout 20 "$@" > out 2>&1 || st=$?
    [ "$st" = 1 ] || fail "status $st (1 expected) from: $* ($(cat out))"
    grep -q "$img" out || fail "no file name in the message of $*: $(cat out)"
}

# 1: the refcount table's first entry becomes 0xcb74252d07141c00.
$QEMU_IMG create -q -f qcow2 -o cluster_size=512 rt.qcow2 1M
rt=$(be64 rt.qcow2 48)
poke rt.qcow2 "$rt" 0xcb74252d07141c7d
sha256sum rt.qcow2 > rt.sum
expect_clean_failure rt.qcow2 "$VDISK" snapshot -c s1 rt.qcow2
grep -q "refblock offset 0xcb74252d07141c00 is invalid" out ||
    fail "unexpected message: $(cat out)"
expect_clean_failure rt.qcow2 "$VDISK" io -c 'write 0 512' rt.qcow2
# Read-only use never touches the refcounts; check reports and exits.
"$VDISK" io -r -c 'read 0 512' rt.qcow2 > /dev/null ||
    fail "read-only io failed on rt.qcow2"
st=0
timeout 20 "$VDISK" check rt.qcow2 > /dev/null 2>&1 || st=$?
[ "$st" -le 3 ] || fail "check of rt.qcow2: status $st"
sha256sum -c --quiet rt.sum || fail "rt.qcow2 changed by read-only use"

# 2: the seed image of the fuzzer's snap.qcow2, then the snapshot's first
# L2 entry moved to host offset 2^55.
$QEMU_IMG create -q -f qcow2 -o cluster_size=512 sn.qcow2 1M
$QEMU_IO -c 'write -q -P 0x55 0 2k' sn.qcow2
$QEMU_IMG snapshot -c snap1 sn.qcow2
$QEMU_IO -c 'write -q -P 0x66 1k 2k' sn.qcow2
snap_table=$(be64 sn.qcow2 64)
snap_l1=$(be64 sn.qcow2 "$snap_table")
l2=$(( $(be64 sn.qcow2 "$snap_l1") & 0x00fffffffffffe00 ))
[ "$l2" -gt 0 ] || fail "sn.qcow2: the snapshot has no L2 table"
poke sn.qcow2 "$l2" 0x0080000000000000
expect_clean_failure sn.qcow2 "$VDISK" snapshot -a snap1 sn.qcow2
grep -q "exceed 8 MB\|too large\|lies outside the file" out ||
    fail "unexpected message: $(cat out)"
exit 0
