#!/usr/bin/env bash
# vdisk info listed no bitmaps where qemu-img info lists them, and check of an image with bitmaps must count them as QEMU does.
# Images get persistent bitmaps from QEMU's own tools: qemu-img bitmap
# (--add with -g and --disable, --merge from another image, --clear),
# qemu-io writes that the enabled bitmaps record, a qemu-storage-daemon
# that adds bitmaps over QMP (persistent, disabled, granularity), and
# writers killed with kill -9 after loading them (bitmaps left in use).
# For every image, vdisk info (human and --output=json) prints what
# qemu-img info prints, and vdisk check what qemu-img check prints with
# the same exit status. check -r all of an image whose bitmaps are all in
# use gives qemu-img's output and, on a twin copy, qemu-img's file.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-storage-daemon
tmpdir

q() { $QEMU_IMG "$@" >/dev/null; }
# Outputs compared with qemu-img's: the program's name left out of
# messages, and the line QEMU leaves unended ("... to fix." then the next
# output) ended, as vdisk ends it (docs/compat.md).
same_output()
{
    local f
    for f in "$1" "$2"; do
        { cat "$f"; echo; } | sed -e 's/^qemu-img: //' -e 's/^vdisk: //' \
            -e 's/on the image file to fix\.\(..*\)$/on the image file to fix.\n\1/' \
            -e '/^$/d' > "$f.n"
    done
    diff "$1.n" "$2.n"
}

# 1. qemu-img bitmap: add (default, -g, --disable), writes, merge, clear.
q create -f qcow2 a.qcow2 8M
q bitmap --add a.qcow2 b1
q bitmap --add -g 128k a.qcow2 b2
q bitmap --add --disable a.qcow2 'b 3 "quoted"'
$QEMU_IO -f qcow2 -c 'write 0 64k' -c 'write -z 3M 4k' -c 'discard 5M 64k' \
    a.qcow2 >/dev/null
q create -f qcow2 src.qcow2 8M
q bitmap --add src.qcow2 s
$QEMU_IO -f qcow2 -c 'write 7M 4k' src.qcow2 >/dev/null
q bitmap --merge s -b src.qcow2 -F qcow2 a.qcow2 b1
q bitmap --clear a.qcow2 b2
q bitmap --add -g 512 a.qcow2 fine

# 2. Small clusters: bitmaps over several clusters.
q create -f qcow2 -o cluster_size=512 small.qcow2 4M
q bitmap --add -g 512 small.qcow2 s1
$QEMU_IO -f qcow2 -c 'write 0 1k' -c 'write 2M 512' small.qcow2 >/dev/null

# 3. qemu-storage-daemon over QMP.
q create -f qcow2 qsd.qcow2 16M
printf '%s\n' '{"execute":"qmp_capabilities"}' \
    '{"execute":"block-dirty-bitmap-add","arguments":{"node":"q","name":"p1","persistent":true}}' \
    '{"execute":"block-dirty-bitmap-add","arguments":{"node":"q","name":"p2","persistent":true,"disabled":true,"granularity":1048576}}' \
    '{"execute":"block-dirty-bitmap-add","arguments":{"node":"q","name":"volatile"}}' \
    '{"execute":"quit"}' |
    timeout 30 qemu-storage-daemon --chardev stdio,id=m --monitor m \
        --blockdev driver=file,filename=qsd.qcow2,node-name=f \
        --blockdev driver=qcow2,file=f,node-name=q >/dev/null

# 4. Writers killed after loading the bitmaps: all in use, or some.
cp a.qcow2 inuse.qcow2
$QEMU_IO -f qcow2 -c 'write 1M 4k' -c 'sigraise 9' inuse.qcow2 \
    >/dev/null 2>&1 || true
cp inuse.qcow2 mixed.qcow2
q bitmap --add mixed.qcow2 fresh

images="a.qcow2 small.qcow2 qsd.qcow2 inuse.qcow2 mixed.qcow2"
$QEMU_IMG info inuse.qcow2 | grep -q in-use || fail "no bitmap in use"
$QEMU_IMG info qsd.qcow2 | grep -q p2 || fail "the daemon stored no bitmap"

for img in $images; do
    "$VDISK" info "$img" > v.txt 2>&1 || fail "vdisk info $img failed"
    $QEMU_IMG info "$img" > q.txt 2>&1
    diff q.txt v.txt || fail "$img: info differs from qemu-img's"
    "$VDISK" info --output=json "$img" > v.json
    $QEMU_IMG info --output=json "$img" > q.json
    json_equal_filtered q.json v.json || fail "$img: JSON info differs"
    diff q.json v.json || fail "$img: JSON info text differs"

    qrc=0 vrc=0
    $QEMU_IMG check "$img" > q.txt 2>&1 || qrc=$?
    "$VDISK" check "$img" > v.txt 2>&1 || vrc=$?
    [ "$qrc" = "$vrc" ] || fail "$img: check exit $vrc, qemu-img $qrc"
    diff q.txt v.txt || fail "$img: check output differs"
done

# The same command on twin copies (rq/aq.qcow2 by qemu-img, rv/av.qcow2
# by vdisk): the same exit status, output and resulting file.
twin()
{
    local what=$1 q=$2 v=$3
    shift 3
    qrc=0 vrc=0
    $QEMU_IMG "$@" "$q" > q.txt 2>&1 || qrc=$?
    "$VDISK" "$@" "$v" > v.txt 2>&1 || vrc=$?
    [ "$qrc" = "$vrc" ] || fail "$what: exit $vrc, qemu-img $qrc"
    sed -i "s/$q/$v/g" q.txt
    same_output q.txt v.txt || fail "$what: output differs"
    cmp "$q" "$v" || fail "$what: the file differs from qemu-img's"
}

# check -r all where every bitmap is in use: QEMU stores nothing; the
# output and the resulting file are qemu-img's.
cp inuse.qcow2 rq.qcow2
cp inuse.qcow2 rv.qcow2
twin "check -r all" rq.qcow2 rv.qcow2 check -r all

# vdisk amend -o compat=0.10 of an image with bitmaps printed "Failed to
# store persistent dirty bitmaps" and leaked the old directory, where
# qemu-img stores them (a v2 file keeps them, inconsistent) silently.
# Downgrade and upgrade again, twinned: output, exit status, file bytes.
for img in a.qcow2 small.qcow2 qsd.qcow2 inuse.qcow2 mixed.qcow2; do
    cp "$img" aq.qcow2
    cp "$img" av.qcow2
    for compat in 0.10 1.1; do
        twin "$img: amend compat=$compat" aq.qcow2 av.qcow2 \
            amend -o compat=$compat
    done
done

# check -r all with some bitmaps in use and some not: qemu-img's output
# and file.
cp mixed.qcow2 rq.qcow2
cp mixed.qcow2 rv.qcow2
twin "check -r all (mixed)" rq.qcow2 rv.qcow2 check -r all
