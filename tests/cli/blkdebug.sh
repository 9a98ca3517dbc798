#!/usr/bin/env bash
# blkdebug's QEMU interface against qemu-io: errors injected by event on
# the qcow2 paths (every event qcow2 and the request path raise, once
# and for good, on fresh and allocated images) give the same command
# output, the same image content and the same qemu-img check; config
# files, options (json:, --image-opts), set-state, sector, iotype and
# the limits behave and fail with the same words.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io
tmpdir

# Drops what varies between runs (timings) from qemu-io's output.
norm()
{
    sed -e 's/, [0-9.]* [a-zA-Z]*\/sec.*//' -e '/ops; [0-9]/d' \
        -e 's/^qemu-io: //' -e 's/^vdisk: //'
}

ncase=0
# compare PREP CACHE IMAGE-NAME-PATTERN COMMAND...: the same commands on
# twin images through qemu-io and vdisk io; IMAGE-NAME-PATTERN has @ for
# the image's name. PREP: fresh, filled (256k of data), backed (an empty
# overlay of a filled image) or compressed (a compressed cluster at 0).
compare()
{
    local prep=$1 cache=$2 pat=$3
    shift 3
    local -a qargs=() vargs=()
    local c
    for c in "$@"; do
        qargs+=(-c "$c")
        vargs+=(-c "$c")
    done
    rm -f q.qcow2 v.qcow2 base.qcow2
    case $prep in
    fresh) $QEMU_IMG create -q -f qcow2 q.qcow2 4G ;;
    filled)
        $QEMU_IMG create -q -f qcow2 q.qcow2 4G
        $QEMU_IO -c 'write -P 7 0 256k' q.qcow2 > /dev/null ;;
    backed)
        $QEMU_IMG create -q -f qcow2 base.qcow2 4G
        $QEMU_IO -c 'write -P 7 0 256k' base.qcow2 > /dev/null
        $QEMU_IMG create -q -f qcow2 -b base.qcow2 -F qcow2 q.qcow2 ;;
    compressed)
        $QEMU_IMG create -q -f qcow2 q.qcow2 4G
        $QEMU_IO -c 'write -c -P 7 0 64k' q.qcow2 > /dev/null ;;
    esac
    cp q.qcow2 v.qcow2
    local qo=0 vo=0 io=()
    [[ $pat != driver=* ]] || io=(--image-opts)
    $QEMU_IO "${io[@]}" -t "$cache" "${qargs[@]}" "${pat//@/q.qcow2}" \
        > q.out 2> q.err || qo=$?
    "$VDISK" io "${io[@]}" -t "$cache" "${vargs[@]}" "${pat//@/v.qcow2}" \
        > v.out 2> v.err || vo=$?
    [ "$vo" != 86 ] || { cat v.err; fail "sanitizer report"; }
    norm < q.out > q.n
    norm < v.out > v.n
    if ! diff -u q.n v.n; then
        cat q.err v.err
        fail "$pat $*: output differs"
    fi
    # vdisk io fails (exit 1) when the flush of closing the image fails,
    # where qemu-io ignores it (or prints "Failed to flush ...") and
    # exits 0: the commands themselves all succeeded then.
    if [ "$qo" = 0 ] && [ "$vo" = 1 ] && ! grep -q 'failed' v.out; then
        qo=1
    fi
    [ "$qo" = "$vo" ] || fail "$pat $*: exit $vo, qemu-io $qo"
    $QEMU_IMG check q.qcow2 2>&1 | sed 's/q\.qcow2/IMG/g' > q.chk || true
    $QEMU_IMG check v.qcow2 2>&1 | sed 's/v\.qcow2/IMG/g' > v.chk || true
    diff -u q.chk v.chk || fail "$pat $*: qemu-img check differs"
    if [ "$prep" = backed ]; then
        $QEMU_IMG compare -q q.qcow2 v.qcow2 ||
            fail "$pat $*: content differs"
    else
        $QEMU_IMG compare -q -f qcow2 -F qcow2 q.qcow2 v.qcow2 ||
            fail "$pat $*: content differs"
    fi
    ncase=$((ncase + 1))
}

# ---- errors injected by event ----------------------------------------

events="l1_update l1_grow_alloc_table l1_grow_write_table
l1_grow_activate_table l2_load l2_update l2_alloc_cow_read l2_alloc_write
read_aio write_aio cow_read cow_write reftable_load refblock_load
refblock_update_part refblock_alloc refblock_alloc_hookup
refblock_alloc_write refblock_alloc_write_blocks refblock_alloc_write_table
refblock_alloc_switch_table cluster_alloc cluster_alloc_bytes cluster_free
flush_to_os flush_to_disk cluster_alloc_space pwritev pwritev_done none"
i=0
for ev in $events; do
    once=$([ $((i % 2)) = 0 ] && echo off || echo on)
    errno=$([ $((i % 3)) = 0 ] && echo 28 || echo 5)
    i=$((i + 1))
    printf '[inject-error]\nevent = "%s"\nerrno = "%s"\nonce = "%s"\n' \
        "$ev" "$errno" "$once" > ev.cfg
    # A first write to a fresh image allocates everything; a partial
    # write to allocated data copies; a write at 1 GiB grows L1.
    compare fresh writeback "blkdebug:ev.cfg:@" 'write 0 64k' 'write 0 64k'
    compare filled writeback "blkdebug:ev.cfg:@" 'write 32k 64k' 'read 0 64k'
    compare fresh writeback "blkdebug:ev.cfg:@" 'write 1G 64k' 'write 512 512'
done
# Flush events with qemu-io's own default, writethrough.
for ev in flush_to_os flush_to_disk; do
    printf '[inject-error]\nevent = "%s"\n' "$ev" > ev.cfg
    compare fresh writethrough "blkdebug:ev.cfg:@" 'write 0 64k' 'flush'
done
# Reads: from the backing file, a compressed cluster, a data cluster.
for ev in read_backing_aio read_compressed read_aio l2_load; do
    printf '[inject-error]\nevent = "%s"\n' "$ev" > ev.cfg
    compare backed writeback "blkdebug:ev.cfg:@" 'read 0 64k' 'write 0 4k'
    compare compressed writeback "blkdebug:ev.cfg:@" 'read 0 64k' 'read 0 4k'
done
# A compressed write. (Not read back: QEMU points the L2 entry at the
# compressed data before writing it, so after a failed write its image
# reads the cluster that was never written; vdisk's stays unallocated.)
for ev in write_compressed l2_update_compressed cluster_alloc_bytes; do
    printf '[inject-error]\nevent = "%s"\n' "$ev" > ev.cfg
    compare fresh writeback "blkdebug:ev.cfg:@" 'write -c 0 64k' \
        'write -c 64k 64k'
done

# ---- states, sectors, io types, options -------------------------------

# State 1 -> 2 on the first L2 update; the error only in state 2, on
# reads of one sector.
cat > st.cfg <<'EOF'
[set-state]
state = "1"
event = "l2_update"
new_state = "2"

[inject-error]
state = "2"
event = "read_aio"
sector = "0"
iotype = "read"
EOF
compare fresh writeback "blkdebug:st.cfg:@" 'read 0 512' 'write 0 64k' \
    'flush' 'read 0 512' 'read 64k 512' 'write 0 512'
# The same rules as options, in both forms QEMU takes.
opts="driver=qcow2,file.driver=blkdebug,file.image.filename=@"
compare fresh writeback \
    "$opts,file.set-state.0.event=l2_update,file.set-state.0.new_state=2,file.inject-error.0.event=read_aio,file.inject-error.0.state=2" \
    'read 0 512' 'write 0 64k' 'flush' 'read 0 512'
compare filled writeback \
    "$opts,file.inject-error.event=write_aio,file.inject-error.errno=28,file.inject-error.once=on" \
    'write 0 4k' 'write 0 4k'
compare filled writeback \
    "json:{\"driver\": \"qcow2\", \"file\": {\"driver\": \"blkdebug\", \"image\": {\"driver\": \"file\", \"filename\": \"@\"}, \"inject-error\": [{\"event\": \"write_aio\", \"errno\": 1, \"iotype\": \"write\"}, {\"event\": \"l2_load\"}]}}" \
    'write 0 4k' 'read 0 4k'
# Limits: requests of align bytes, split at max-transfer.
compare filled writeback "$opts,file.align=4096,file.max-transfer=65536" \
    'write -P 3 512 1k' 'read -P 3 512 1k' 'write 0 256k'

# ---- refusals ---------------------------------------------------------

: > empty.cfg
printf '[inject-error]\nevent = "l2_update"\nfoo bar\n' > bad1.cfg
printf '[bogus]\nevent = "x"\n' > bad2.cfg
printf 'event = "x"\n' > bad3.cfg
printf '[inject-error]\nbad = "x"\n' > bad4.cfg
printf '[inject-error]\nevent = "nope"\n' > bad5.cfg
printf '[inject-error]\nstate = "1"\n' > bad6.cfg
printf '[inject-error]\nevent = "l2_load"\nerrno = "x"\n' > bad7.cfg
printf '[inject-error]\nevent = "l2_load"\niotype = "x"\n' > bad8.cfg
$QEMU_IMG create -q -f qcow2 r.qcow2 1M
for spec in blkdebug:bad1.cfg:r.qcow2 blkdebug:bad2.cfg:r.qcow2 \
            blkdebug:bad3.cfg:r.qcow2 blkdebug:bad4.cfg:r.qcow2 \
            blkdebug:bad5.cfg:r.qcow2 blkdebug:bad6.cfg:r.qcow2 \
            blkdebug:bad7.cfg:r.qcow2 blkdebug:bad8.cfg:r.qcow2 \
            blkdebug:nofile.cfg:r.qcow2 blkdebug:r.qcow2 \
            "$opts,file.inject-error.0.event=x" \
            "$opts,file.inject-error.0.foo=1,file.inject-error.0.event=l2_load" \
            "$opts,file.inject-error.event=l2_load,file.inject-error.0.event=l2_load" \
            "$opts,file.inject-error.0=1" \
            "$opts,file.inject-error.1.event=l2_load" \
            "$opts,file.set-state.0.event=l2_load,file.set-state.0.new_state=x" \
            "$opts,file.align=3" "$opts,file.align=4096,file.max-transfer=1000" \
            "$opts,file.align=512,file.opt-write-zero=100" \
            "$opts,file.opt-discard=4096,file.max-discard=6144" \
            "$opts,file.take-child-perms.0=bogus" \
            "driver=blkdebug,image.filename=r.qcow2,file.filename=x"; do
    spec=${spec//@/r.qcow2}
    io=()
    [[ $spec != driver=* ]] || io=(--image-opts)
    expect_status 1 $QEMU_IO "${io[@]}" -c 'read 0 512' "$spec" > q.out 2>&1
    expect_status 1 "$VDISK" io "${io[@]}" -c 'read 0 512' "$spec" > v.out 2>&1
    norm < q.out > q.n
    norm < v.out > v.n
    diff -u q.n v.n || fail "$spec: refusal differs"
done

# The crash simulator's options stay beside QEMU's.
$QEMU_IMG create -q -f qcow2 c.qcow2 1M
expect_status 1 "$VDISK" io --image-opts -c 'write 0 64k' \
    "driver=qcow2,file.driver=blkdebug,file.filename=c.qcow2,file.fail-write=1" \
    > c.out 2>&1
grep -q 'write failed: Input/output error' c.out || fail "fail-write: $(cat c.out)"
echo "$ncase cases"
exit 0
