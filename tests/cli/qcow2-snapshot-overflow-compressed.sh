#!/usr/bin/env bash
# A snapshot over compressed clusters that share a host cluster checked only that one more reference fit each refcount, so with narrow refcounts it overflowed half-way and left leaks and an L2 table COPIED with refcount 2 (as QEMU 7.2 does); it is now refused before anything is written.
# Then, with 16-bit refcounts (where the sharing entries were counted
# only for widths below 16), the same half-way overflow left a leak and
# a changed file once the shared host cluster's refcount was near 65535.
# Found by qcow2-random-ops.sh (2-bit refcounts, 2 KiB clusters). Two
# compressed clusters of a pattern share one host cluster (refcount 2);
# a snapshot adds a reference per compressed cluster: 4 does not fit 2
# bits, fits 4 bits. For 16 bits the host cluster's refcount is raised
# to 65534 in both files (a leak, which qemu-img check reports and
# repairs: the image is not corrupt), so that 65536 does not fit.
# qemu-img fails where vdisk must refuse, and succeeds where vdisk must
# too, with the same content.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io cmp python3
tmpdir

# raise_refcount FILE VALUE: the refcount (16 bits) of the host cluster
# of guest cluster 0's compressed data.
raise_refcount()
{
    python3 - "$1" "$2" <<'PY' || fail "cannot raise the refcount in $1"
import struct, sys
path, value = sys.argv[1], int(sys.argv[2])
with open(path, 'r+b') as f:
    h = f.read(104)
    cb = struct.unpack('>I', h[20:24])[0]
    l1 = struct.unpack('>Q', h[40:48])[0]
    rt = struct.unpack('>Q', h[48:56])[0]
    assert struct.unpack('>I', h[96:100])[0] == 4, 'not 16-bit refcounts'
    f.seek(l1)
    l2 = struct.unpack('>Q', f.read(8))[0] & 0x00fffffffffffe00
    f.seek(l2)
    e = struct.unpack('>Q', f.read(8))[0]
    assert e & (1 << 62), 'guest cluster 0 is not compressed'
    host = (e & ((1 << (62 - (cb - 8))) - 1)) >> cb
    per = (1 << cb) // 2
    f.seek(rt + 8 * (host // per))
    rb = struct.unpack('>Q', f.read(8))[0]
    f.seek(rb + 2 * (host % per))
    f.write(struct.pack('>H', value))
PY
}

for bits in 2 4 16; do
    for d in q v; do
        rm -f $d.qcow2
        $QEMU_IMG create -q -f qcow2 -o cluster_size=2048,refcount_bits=$bits \
            $d.qcow2 1M
        $QEMU_IO -c 'write -q -c -P 7 0 4096' -c 'write -q -P 9 64k 8k' $d.qcow2
        if [ $bits = 16 ]; then
            raise_refcount $d.qcow2 65534
        fi
    done
    cp v.qcow2 before.qcow2
    qst=0
    $QEMU_IMG snapshot -c s1 q.qcow2 2>/dev/null || qst=$?
    vst=0
    "$VDISK" snapshot -c s1 v.qcow2 2>err || vst=$?
    [ $vst = $qst ] || fail "bits=$bits: vdisk exit $vst, qemu-img's $qst"
    if [ $qst != 0 ]; then
        grep -q "would overflow" err || fail "bits=$bits: no overflow message"
        cmp before.qcow2 v.qcow2 || fail "bits=$bits: the refused snapshot changed the image"
    else
        $QEMU_IMG compare -U q.qcow2 v.qcow2 >/dev/null || fail "bits=$bits: content"
        $QEMU_IMG snapshot -l v.qcow2 | grep -q s1 || fail "bits=$bits: no snapshot"
        # Applying it adds the same references again.
        $QEMU_IMG snapshot -a s1 q.qcow2
        "$VDISK" snapshot -a s1 v.qcow2
        $QEMU_IMG compare -U q.qcow2 v.qcow2 >/dev/null || fail "bits=$bits: after apply"
    fi
    if [ $bits = 16 ]; then
        # The leak made above must be all that check reports.
        [ $qst != 0 ] || fail "bits=16: qemu-img's snapshot did not overflow"
        cst=0
        $QEMU_IMG check v.qcow2 >check.out 2>&1 || cst=$?
        [ $cst = 3 ] || { cat check.out; fail "bits=16: check exit $cst, not 3 (leaks)"; }
        grep -q 'Leaked cluster.*refcount=65534 reference=2' check.out ||
            fail "bits=16: check"
        [ "$(grep -c '^Leaked cluster' check.out)" = 1 ] ||
            fail "bits=16: more than the one leak made"
    else
        $QEMU_IMG check -q v.qcow2 || fail "bits=$bits: check"
    fi
done
echo ok
