#!/usr/bin/env bash
# qemu-io's break, remove_break, resume and wait_break on blkdebug,
# against qemu-io in the same scenarios: a request stopped at a data or
# metadata event of qcow2 or raw and resumed (resume, remove_break), two
# requests stopped at once, the messages of failures (no such event,
# tag or blkdebug node), usage and help. Output (timings dropped), exit
# status and the image's content must match. Every scenario waits for
# its stops (wait_break) and resumes each before aio_flush: a request
# left stopped makes qemu-io (and vdisk io) wait forever.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io timeout
tmpdir

# Drops what varies between runs (timings) from qemu-io's output.
norm()
{
    sed -e 's/, [0-9.]* [a-zA-Z]*\/sec.*//' -e '/ops; [0-9]/d' \
        -e 's/^qemu-io: //' -e 's/^vdisk: //'
}

# compare [-s] FMT IMAGE-PATTERN COMMAND...: the commands through
# qemu-io and vdisk io on twin fresh images of FMT (1G, 64k of 0x22 at
# 128k); IMAGE-PATTERN has @ for the image's name. -s: the lines are
# compared as sets, for scenarios where two requests complete in an
# order neither tool fixes.
compare()
{
    local sorted=cat
    if [ "$1" = -s ]; then
        sorted=sort
        shift
    fi
    local fmt=$1 pat=$2 c qo=0 vo=0 args=()
    shift 2
    for c in "$@"; do
        args+=(-c "$c")
    done
    rm -f q.img v.img
    $QEMU_IMG create -q -f "$fmt" q.img 1G
    $QEMU_IO -f "$fmt" -c 'write -P 0x22 128k 64k' q.img > /dev/null
    cp q.img v.img
    # qemu-io's default cache mode, writethrough, named: vdisk io's
    # default is writeback (docs/filters.md).
    timeout 20 $QEMU_IO -t writethrough "${args[@]}" "${pat//@/q.img}" \
        > q.out 2>&1 || qo=$?
    timeout 20 "$VDISK" io -t writethrough "${args[@]}" "${pat//@/v.img}" \
        > v.out 2>&1 || vo=$?
    [ "$vo" != 86 ] || { cat v.out; fail "sanitizer report"; }
    [ "$vo" != 124 ] || { cat v.out; fail "$pat $*: vdisk io hangs"; }
    norm < q.out | $sorted > q.n
    norm < v.out | $sorted > v.n
    diff -u q.n v.n || fail "$pat $*: output differs"
    [ "$qo" = "$vo" ] || fail "$pat $*: exit $vo, qemu-io $qo"
    $QEMU_IMG compare -q -f "$fmt" -F "$fmt" q.img v.img ||
        fail "$pat $*: the images differ"
}

# A data write and a data read of qcow2 stopped and resumed.
compare qcow2 blkdebug::@ 'break write_aio A' 'aio_write -P 0x11 0 4k' \
    'wait_break A' 'resume A' 'aio_flush' 'read -P 0x11 0 4k'
compare qcow2 blkdebug::@ 'break read_aio A' 'aio_read -P 0x22 128k 4k' \
    'wait_break A' 'resume A' 'aio_flush'
# Metadata events: the L2 update of an allocating write, the
# allocation of an L2 table.
compare qcow2 blkdebug::@ 'break l2_update L' 'aio_write -P 0x33 256k 64k' \
    'wait_break L' 'resume L' 'aio_flush' 'read -P 0x33 256k 64k'
compare qcow2 blkdebug::@ 'break l2_alloc_write L' \
    'aio_write -P 0x33 600M 4k' 'wait_break L' 'resume L' 'aio_flush'
# remove_break resumes what stopped there, and later writes go through.
compare qcow2 blkdebug::@ 'break write_aio A' 'aio_write -P 0x44 0 4k' \
    'wait_break A' 'remove_break A' 'aio_flush' 'write -P 0x45 4k 4k' \
    'read -P 0x44 0 4k'
# A breakpoint is used up by its hit.
compare qcow2 blkdebug::@ 'break write_aio A' 'aio_write 0 4k' \
    'wait_break A' 'resume A' 'aio_flush' 'write 8k 4k' 'resume A'
# Two requests stopped at once, resumed in the other order.
compare -s qcow2 blkdebug::@ 'break write_aio A' 'aio_write -P 1 0 4k' \
    'wait_break A' 'break write_aio B' 'aio_write -P 2 64k 4k' \
    'wait_break B' 'resume B' 'resume A' 'aio_flush' \
    'read -P 1 0 4k' 'read -P 2 64k 4k'
# The raw format over blkdebug, through a json: filename.
compare raw 'json:{"driver":"raw","file":{"driver":"blkdebug","image":{"driver":"file","filename":"@"}}}' \
    'break write_aio W' 'aio_write -P 0x55 0 64k' 'wait_break W' \
    'resume W' 'aio_flush' 'read -P 0x55 0 64k'
# Failures: unknown event, tag and no blkdebug node at all; usage.
compare qcow2 blkdebug::@ 'break nosuch A' 'remove_break A' 'resume A'
compare qcow2 @ 'break write_aio A' 'remove_break A' 'resume A'
compare qcow2 blkdebug::@ 'break write_aio' 'resume' 'remove_break' \
    'wait_break' 'break a b c'
compare qcow2 blkdebug::@ 'help break' 'help remove_break' 'help resume' \
    'help wait_break'
# Without an image.
for c in 'break write_aio A' 'resume A' 'remove_break A' 'wait_break A'; do
    qo=0 vo=0
    $QEMU_IO -c "$c" > q.out 2>&1 || qo=$?
    "$VDISK" io -c "$c" > v.out 2>&1 || vo=$?
    norm < q.out > q.n
    norm < v.out > v.n
    diff -u q.n v.n || fail "$c without an image: output differs"
    [ "$qo" = "$vo" ] || fail "$c without an image: exit $vo, qemu-io $qo"
done
exit 0
