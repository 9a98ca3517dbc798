#!/usr/bin/env bash
# Malformed qcow2 creation and amend options answered in other words than qemu-img 7.2's: compat=0.42 was an 'Invalid parameter' reported after a bad backing format, enums listed their choices, the v2 limits said 'use compat=1.1', sizes of 2^63 and more were 'below 2^64'.
# Each case runs through qemu-img and vdisk: same message (program name
# aside), exit 1; a failed create or convert leaves no target behind and
# a failed amend leaves the image byte-identical.
source "$(dirname "$0")/../functions.sh"
requires qemu-img cmp
tmpdir

$QEMU_IMG create -q -f qcow2 a.qcow2 1M

# check_refusal CMD...: both fail alike; t.qcow2 / x.data not created.
check_refusal()
{
    local qs=0 vs=0
    rm -f t.qcow2 x.data
    $QEMU_IMG "$@" >q.out 2>&1 || qs=$?
    rm -f t.qcow2 x.data
    "$VDISK" "$@" >v.out 2>&1 || vs=$?
    [ "$qs" = 1 ] || { cat q.out; fail "qemu-img accepted: $*"; }
    [ "$vs" = 1 ] || { cat v.out; fail "status $vs: $*"; }
    diff -u <(sed 's/^qemu-img: //' q.out) <(sed 's/^vdisk: //' v.out) ||
        fail "message differs: $*"
    [ ! -e t.qcow2 ] && [ ! -e x.data ] || fail "something was created: $*"
}

for o in compat=0.42 compat=0.42,preallocation=foo preallocation=foo \
         compression_type=foo cluster_size=1000,compat=0.42 \
         compat=0.10,lazy_refcounts=on compat=0.10,compression_type=zstd \
         compat=0.10,extended_l2=on compat=0.10,data_file=x.data \
         cluster_size=4k,extended_l2=on data_file_raw=on \
         extended_l2=foo,compat=0.42 size=1x,compat=0.42 \
         refcount_bits=3 cluster_size=1000 \
         preallocation=metadata,backing_file=a.qcow2,backing_fmt=qcow2; do
    check_refusal create -q -f qcow2 -o "$o" t.qcow2 1M
    check_refusal convert -O qcow2 -o "$o" a.qcow2 t.qcow2
done
# qemu-img reports the version before the backing format, when it does
# not open the backing file first (convert).
check_refusal convert -O qcow2 \
    -o compat=0.42,backing_file=a.qcow2,backing_fmt=bar a.qcow2 t.qcow2
check_refusal convert -O qcow2 -o backing_file=a.qcow2,backing_fmt=bar \
    a.qcow2 t.qcow2

# Sizes: junk, 2^63 and more, 2^64 and more.
for sz in 1x -1 9223372036854775808 18446744073709551615 \
          18446744073709551616 8E 16E 4E; do
    cp a.qcow2 b.qcow2
    check_refusal amend -o size=$sz b.qcow2
    cmp a.qcow2 b.qcow2 || fail "amend -o size=$sz changed the image"
    for f in qcow2 raw; do
        for src in "--size 1M" "a.qcow2"; do
            qs=0; vs=0
            $QEMU_IMG measure -O $f $src -o size=$sz >q.out 2>&1 || qs=$?
            "$VDISK" measure -O $f $src -o size=$sz >v.out 2>&1 || vs=$?
            [ "$qs" = "$vs" ] || fail "measure -O $f $src -o size=$sz: status"
            diff -u <(sed 's/^qemu-img: //' q.out) \
                    <(sed 's/^vdisk: //' v.out) ||
                fail "measure -O $f $src -o size=$sz"
        done
    done
done
check_refusal resize b.qcow2 4E
