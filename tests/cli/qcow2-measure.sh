#!/usr/bin/env bash
# vdisk measure against qemu-img measure on the same inputs: raw and qcow2
# sources (sparse, full, compressed, zero clusters, backing chains, v2),
# --size alone, every target option that changes the result (cluster
# sizes, refcount_bits, extended_l2, preallocation, backing_file, compat),
# human and JSON output including the "bitmaps" key, and the error paths
# with their messages and exit statuses.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io
tmpdir

# Runs both tools with the same arguments; stdout, stderr (program name
# filtered) and the exit status must match.
same()
{
    local qs=0 vs=0
    $QEMU_IMG measure "$@" >q.out 2>q.err || qs=$?
    "$VDISK" measure "$@" >v.out 2>v.err || vs=$?
    sed -i 's/^qemu-img: /PROG: /' q.err
    sed -i 's/^vdisk: /PROG: /' v.err
    [ "$qs" = "$vs" ] || fail "measure $*: status $vs, qemu-img $qs"
    diff -u q.out v.out || fail "measure $*: stdout differs"
    diff -u q.err v.err || fail "measure $*: stderr differs"
}

# Sources.
$QEMU_IMG create -q -f raw sparse.raw 64M
$QEMU_IO -f raw -c "write -P 0x5a 1M 512k" -c "write -P 1 10000k 4k" \
    -c "write -P 2 63M 1M" sparse.raw >/dev/null
$QEMU_IMG create -q -f raw full.raw 8M
$QEMU_IO -f raw -c "write -P 7 0 8M" full.raw >/dev/null
$QEMU_IMG create -q -f raw odd.raw 1000000
$QEMU_IO -f raw -c "write -P 3 4096 4096" odd.raw >/dev/null
$QEMU_IMG create -q -f qcow2 base.qcow2 64M
$QEMU_IO -c "write -P 0x11 0 3M" -c "write -z 8M 2M" -c "write -P 3 20M 70k" \
    base.qcow2 >/dev/null
$QEMU_IMG create -q -f qcow2 -b base.qcow2 -F qcow2 over.qcow2
$QEMU_IO -c "write -P 0x22 1M 1M" -c "write -P 0x23 40M 64k" over.qcow2 >/dev/null
$QEMU_IMG create -q -f qcow2 -o compat=0.10 v2.qcow2 32M
$QEMU_IO -c "write -P 9 5M 1M" v2.qcow2 >/dev/null
$QEMU_IMG convert -c -O qcow2 full.raw comp.qcow2
$QEMU_IMG create -q -f qcow2 -o cluster_size=4k,extended_l2=off small.qcow2 16M
$QEMU_IO -c "write -P 4 1000k 3k" -c "write -P 5 7M 513" small.qcow2 >/dev/null
$QEMU_IMG create -q -f qcow2 -o extended_l2=on,cluster_size=128k ext.qcow2 16M
$QEMU_IO -c "write -P 6 4k 4k" -c "write -P 6 1M 300k" ext.qcow2 >/dev/null
$QEMU_IMG create -q -f qcow2 bm.qcow2 100M
$QEMU_IMG bitmap --add bm.qcow2 b0
$QEMU_IMG bitmap --add -g 512 bm.qcow2 a-longer-bitmap-name
$QEMU_IO -c "write -P 8 0 1M" bm.qcow2 >/dev/null

for src in sparse.raw full.raw odd.raw base.qcow2 over.qcow2 v2.qcow2 \
           comp.qcow2 small.qcow2 ext.qcow2 bm.qcow2; do
    for o in "" cluster_size=512 cluster_size=4k cluster_size=2M \
             refcount_bits=1 refcount_bits=64 extended_l2=on \
             preallocation=metadata preallocation=falloc preallocation=full \
             compat=0.10 backing_file=x "cluster_size=16k,extended_l2=on"; do
        same --output=json -O qcow2 ${o:+-o $o} "$src"
    done
    same -O qcow2 "$src"
    same -O raw "$src"
    same "$src"
done
same -O qcow2 -f raw base.qcow2
same --output=json -O qcow2 -f qcow2 bm.qcow2

for sz in 0 1 512 1000 64M 1G 100G 1T 2T 8T; do
    same --output=json -O qcow2 --size $sz
    same -O raw --size $sz
    same -O qcow2 -o cluster_size=512,refcount_bits=64 --size $sz
done
same -O qcow2 -o cluster_size=4k -o cluster_size=8k --size 1G
same -O qcow2 -o data_file=x,data_file_raw=on,compression_type=zstd --size 1G

# Internal snapshot as the source.
cp base.qcow2 snap.qcow2
$QEMU_IMG snapshot -c s1 snap.qcow2
$QEMU_IO -c "write -P 0x33 30M 5M" snap.qcow2 >/dev/null
same -O qcow2 -l s1 snap.qcow2
same -O qcow2 -l snapshot.name=s1 snap.qcow2
same -O qcow2 snap.qcow2

# Errors.
same -O qcow2 -o cluster_size=abc --size 1G
same -O qcow2 -o foo=1 --size 1G
same -O qcow2 -o lazy_refcounts=xx --size 1G
same -O qcow2 -o refcount_bits=3 --size 1G
same -O qcow2 -o refcount_bits=x --size 1G
same -O qcow2 -o compat=0.10,refcount_bits=8 --size 1G
same -O qcow2 -o compat=x --size 1G
same -O qcow2 -o preallocation=x --size 1G
same -O qcow2 -o cluster_size=1k,extended_l2=on --size 1G
same -O qcow2 -o cluster_size=512 --size 100T
same -O foo --size 1G
same -O qcow2
same -O qcow2 --size 1G base.qcow2
same -O qcow2 -f raw
same -O qcow2 -l foo --size 1G
same -O qcow2 a b
same --size -1
same --output=x --size 1
same -O qcow2 -o size=1G
same -O qcow2 -l nosuch snap.qcow2
