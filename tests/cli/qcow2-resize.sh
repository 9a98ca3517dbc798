#!/usr/bin/env bash
# qcow2 resize and create: grown ranges read as zeros (no stale tail of a
# shrunk image, no longer backing file showing through), shrinking keeps
# the data below the new end, metadata preallocation never exposes freed
# clusters' old data; created images match qemu-img's byte for byte for
# the common option sets, and `info` agrees with qemu-img's.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io cmp
tmpdir

for compat in 1.1 0.10; do
    rm -f r.qcow2 rb.qcow2
    "$VDISK" create -q -f qcow2 -o compat=$compat r.qcow2 64M
    "$VDISK" io -c "write -P 0x44 0 2M" -c "write -P 0x45 60M 4M" r.qcow2 >/dev/null
    "$VDISK" resize --shrink r.qcow2 $((1024 * 1024 + 512)) >/dev/null
    "$VDISK" resize r.qcow2 4M >/dev/null
    $QEMU_IO -c "read -P 0x44 0 1049088" -c "read -P 0 1049088 3144704" \
        r.qcow2 >/dev/null || fail "compat=$compat: grown range not zero"
    "$VDISK" resize --preallocation=metadata r.qcow2 +8M >/dev/null
    $QEMU_IO -c "read -P 0 4M 8M" r.qcow2 >/dev/null ||
        fail "compat=$compat: preallocated clusters expose old data"
    $QEMU_IMG check -q r.qcow2 || fail "compat=$compat: check failed"

    "$VDISK" create -q -f qcow2 -o compat=$compat -b r.qcow2 -F qcow2 rb.qcow2 1M
    "$VDISK" resize rb.qcow2 4M >/dev/null
    $QEMU_IO -c "read -P 0x44 0 1M" -c "read -P 0 1M 3M" rb.qcow2 >/dev/null ||
        fail "compat=$compat: backing data visible past the old end"
    $QEMU_IMG check -q rb.qcow2 || fail "compat=$compat: overlay check failed"
done

! "$VDISK" resize r.qcow2 $((13 * 1024 * 1024 + 1)) 2>err >/dev/null
grep -q "The new size must be a multiple of 512" err || fail "odd size accepted"

for o in "" cluster_size=512 cluster_size=4k cluster_size=2M compat=0.10 \
         extended_l2=on refcount_bits=1 refcount_bits=64 \
         compression_type=zstd lazy_refcounts=on preallocation=metadata; do
    rm -f q.qcow2 v.qcow2
    $QEMU_IMG create -q -f qcow2 ${o:+-o $o} q.qcow2 1G
    "$VDISK" create -q -f qcow2 ${o:+-o $o} v.qcow2 1G
    cmp q.qcow2 v.qcow2 || fail "create -o '$o' differs from qemu-img"
    $QEMU_IMG info --output=json q.qcow2 | grep -v -e actual-size -e filename > q.json
    "$VDISK" info --output=json v.qcow2 | grep -v -e actual-size -e filename > v.json
    diff q.json v.json || fail "info differs for '$o'"
done

# Data file: header like qemu-img's (up to the file name), data in place.
rm -f v.qcow2 q.qcow2 dv.raw dq.raw
"$VDISK" create -q -f qcow2 -o data_file=dv.raw v.qcow2 64M
$QEMU_IMG create -q -f qcow2 -o data_file=dq.raw q.qcow2 64M
cmp <(sed 's/dv\.raw/dX.raw/' v.qcow2) <(sed 's/dq\.raw/dX.raw/' q.qcow2) ||
    fail "data-file image differs from qemu-img's"
"$VDISK" io -c "write -P 0x21 1M 100k" v.qcow2 >/dev/null
$QEMU_IO -f raw -c "read -P 0x21 1M 100k" dv.raw >/dev/null ||
    fail "data not at its guest offset in the data file"
$QEMU_IMG check -q v.qcow2 || fail "data-file image check failed"
