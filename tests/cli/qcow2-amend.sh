#!/usr/bin/env bash
# vdisk amend against qemu-img amend: compat downgrade (zero clusters
# expanded, with and without a backing file) and upgrade, lazy_refcounts,
# data_file/data_file_raw and size give byte-identical files; refcount_bits
# changes keep the content and leave `qemu-img check` clean; refused
# changes give qemu-img's messages and exit statuses.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io cmp
tmpdir

# Amends copies of $1 with both tools; the files must be identical.
same_file()
{
    local img=$1
    shift
    cp "$img" q.qcow2
    cp "$img" v.qcow2
    $QEMU_IMG amend "$@" q.qcow2 || fail "qemu-img amend $* failed"
    "$VDISK" amend "$@" v.qcow2 || fail "vdisk amend $* failed"
    cmp q.qcow2 v.qcow2 || fail "amend $* on $img: files differ"
    $QEMU_IMG check -q v.qcow2 || fail "amend $* on $img: check failed"
}

# Runs both tools on copies of $1; stderr and the exit status must match.
same_error()
{
    local img=$1 qs=0 vs=0
    shift
    cp "$img" q.qcow2
    cp "$img" v.qcow2
    $QEMU_IMG amend "$@" q.qcow2 2>q.err || qs=$?
    "$VDISK" amend "$@" v.qcow2 2>v.err || vs=$?
    sed -i "s/^qemu-img: /PROG: /; s/'qemu-img /'PROG /" q.err
    sed -i "s/^vdisk: /PROG: /; s/'vdisk /'PROG /" v.err
    [ "$qs" = "$vs" ] || fail "amend $*: status $vs, qemu-img $qs"
    diff -u q.err v.err || fail "amend $*: stderr differs"
    cmp q.qcow2 v.qcow2 || fail "amend $* (refused) on $img: files differ"
}

$QEMU_IMG create -q -f qcow2 plain.qcow2 64M
$QEMU_IO -c "write -P 0x11 0 3M" -c "write -z 8M 2M" -c "write -P 3 20M 70k" \
    -c "write -P 4 30M 64k" -c "write -z 30M 64k" plain.qcow2 >/dev/null
$QEMU_IMG create -q -f qcow2 base.qcow2 64M
$QEMU_IO -c "write -P 0x55 0 64M" base.qcow2 >/dev/null
$QEMU_IMG create -q -f qcow2 -b base.qcow2 -F qcow2 over.qcow2
$QEMU_IO -c "write -P 0x22 1M 1M" -c "write -z 4M 3M" -c "write -z 10M 64k" \
    over.qcow2 >/dev/null
$QEMU_IMG create -q -f qcow2 -o compat=0.10 v2.qcow2 32M
$QEMU_IO -c "write -P 9 5M 1M" v2.qcow2 >/dev/null
$QEMU_IMG create -q -f qcow2 -o lazy_refcounts=on lazy.qcow2 16M
$QEMU_IO -c "write -P 1 0 1M" lazy.qcow2 >/dev/null
$QEMU_IMG create -q -f qcow2 -o cluster_size=4k small.qcow2 16M
$QEMU_IO -c "write -P 5 1M 1M" -c "write -z 3M 12k" small.qcow2 >/dev/null
$QEMU_IMG create -q -f qcow2 -o data_file=df.raw,data_file_raw=on df.qcow2 16M
$QEMU_IO -c "write -P 6 0 1M" df.qcow2 >/dev/null

# Byte-identical results.
same_file plain.qcow2 -o compat=0.10
same_file over.qcow2 -o compat=0.10
same_file small.qcow2 -o compat=0.10
same_file v2.qcow2 -o compat=1.1
same_file v2.qcow2 -o compat=v3,lazy_refcounts=on
same_file plain.qcow2 -o lazy_refcounts=on
same_file lazy.qcow2 -o lazy_refcounts=off
same_file lazy.qcow2 -o compat=0.10
same_file plain.qcow2 -o size=128M
same_file plain.qcow2 -o size=32M
same_file plain.qcow2 -o compat=1.1
same_error plain.qcow2 -o backing_file=,lazy_refcounts=off
same_file over.qcow2 -o backing_file=base.qcow2,backing_fmt=qcow2
same_file df.qcow2 -o data_file_raw=off
cp df.raw other.raw
same_file df.qcow2 -o data_file=other.raw
same_file plain.qcow2 -f qcow2 -p -o compat=0.10 >/dev/null

# Downgrade keeps the content (zero clusters become data or unallocated).
for img in plain.qcow2 over.qcow2 small.qcow2; do
    cp $img d.qcow2
    "$VDISK" amend -o compat=0.10 d.qcow2
    assert_same_content $img d.qcow2
    $QEMU_IMG info d.qcow2 | grep -q "compat: 0.10" || fail "$img not v2"
done

# Refcount width: the layout is vdisk's own; content and check must hold.
for bits in 1 2 8 32 64 16; do
    for img in plain.qcow2 over.qcow2 small.qcow2 lazy.qcow2; do
        cp $img r.qcow2
        "$VDISK" amend -o refcount_bits=$bits r.qcow2 ||
            fail "refcount_bits=$bits on $img failed"
        $QEMU_IMG check -q r.qcow2 || fail "refcount_bits=$bits on $img: check"
        assert_same_content $img r.qcow2
        $QEMU_IMG info --output=json r.qcow2 | grep -q "\"refcount-bits\": $bits" ||
            fail "refcount_bits=$bits on $img not recorded"
        # Still writable after the switch, with fresh allocations.
        "$VDISK" io -c "write -P 0x77 12M 1M" r.qcow2 >/dev/null
        $QEMU_IO -c "read -P 0x77 12M 1M" r.qcow2 >/dev/null ||
            fail "refcount_bits=$bits on $img: write after amend"
        $QEMU_IMG check -q r.qcow2 || fail "refcount_bits=$bits on $img: check 2"
    done
done
cp plain.qcow2 r.qcow2
"$VDISK" amend -o refcount_bits=1 r.qcow2
"$VDISK" amend -o refcount_bits=64,compat=1.1 r.qcow2
$QEMU_IMG check -q r.qcow2
assert_same_content plain.qcow2 r.qcow2

# Refused changes.
cp plain.qcow2 snap.qcow2
$QEMU_IMG snapshot -c s1 snap.qcow2
same_error snap.qcow2 -o refcount_bits=1
$QEMU_IMG create -q -f qcow2 -o extended_l2=on ext.qcow2 16M
same_error ext.qcow2 -o compat=0.10
$QEMU_IMG create -q -f qcow2 -o refcount_bits=8 r8.qcow2 16M
same_error r8.qcow2 -o compat=0.10
same_error df.qcow2 -o compat=0.10
$QEMU_IMG create -q -f qcow2 -o compression_type=zstd zstd.qcow2 16M
$QEMU_IO -c "write -c -P 1 0 64k" zstd.qcow2 >/dev/null
same_error zstd.qcow2 -o compat=0.10
for o in compat=x refcount_bits=3 refcount_bits=x data_file=foo \
         data_file_raw=on cluster_size=4k foo=bar encrypt.format=luks \
         encrypt.state=active backing_file=x compat=0.10,refcount_bits=8 \
         extended_l2=on lazy_refcounts=xx size=abc; do
    same_error plain.qcow2 -o $o
done
same_error v2.qcow2 -o lazy_refcounts=on
same_error plain.qcow2
$QEMU_IMG create -q -f raw r.raw 1M
same_error r.raw -f raw -o size=2M

# Zstd image without compressed clusters may go back to v2.
$QEMU_IMG create -q -f qcow2 -o compression_type=zstd zstd2.qcow2 16M
$QEMU_IO -c "write -P 1 0 64k" zstd2.qcow2 >/dev/null
same_file zstd2.qcow2 -o compat=0.10

# Help.
$QEMU_IMG amend -f qcow2 -o help >q.out
"$VDISK" amend -f qcow2 -o help >v.out
diff -u q.out v.out || fail "amend -o help differs"

# Shrinking (amend size= or resize --shrink) gives a free tail of the file
# back as QEMU does: the results are byte-identical.
$QEMU_IMG create -q -f qcow2 tail.qcow2 64M
$QEMU_IO -c "write -P 1 0 1M" -c "write -P 2 60M 4M" tail.qcow2 >/dev/null
same_file tail.qcow2 -o size=32M
cp tail.qcow2 q.qcow2
cp tail.qcow2 v.qcow2
$QEMU_IMG resize -q --shrink q.qcow2 16M
"$VDISK" resize -q --shrink v.qcow2 16M
cmp q.qcow2 v.qcow2 || fail "resize --shrink: files differ"
