#!/usr/bin/env bash
# Bad input to the basic tools: missing files, unknown formats and
# options, malformed sizes, requests out of range, writes to read-only
# images, a backing file for a format that cannot hold one. Each gives a
# one-line error naming the file and the fault, exit status 1 (as qemu-img
# and qemu-io, whose messages are the reference), and nothing is written.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
requires qemu-img qemu-io sha256sum
tmpdir

$QEMU_IMG create -q -f raw disk.img 1M
$QEMU_IO -f raw -c 'write -P 0x11 0 64k' disk.img >/dev/null
sum_before=$(sha256sum disk.img)

unchanged()
{
    [ "$(sha256sum disk.img)" = "$sum_before" ] ||
        fail "disk.img changed after: $*"
}

# One line on stderr, naming the file given, and exit status 1.
one_line_error()
{
    local file=$1 rc=0
    shift
    "$VDISK" "$@" > out.txt 2> err.txt || rc=$?
    [ "$rc" = 1 ] || fail "exit status $rc (want 1) for: $*"
    [ "$(wc -l < err.txt)" = 1 ] || { cat err.txt; fail "not one error line for: $*"; }
    grep -q "^vdisk: .*$file" err.txt || { cat err.txt; fail "error does not name '$file' for: $*"; }
}

# Missing files and unknown formats: same text as qemu-img.
same info nonexist.img
one_line_error nonexist.img info nonexist.img
same info -f foo disk.img
one_line_error disk.img info -f foo disk.img
same create -f foo new.img 1M
[ ! -e new.img ] || fail "create with an unknown format made a file"
same map nonexist.img
same compare disk.img nonexist.img
same convert -O raw nonexist.img out.img
[ ! -e out.img ] || fail "convert of a missing file made an output"

# Unknown options.
same create -f raw -o foo=1 new.img 1M
[ ! -e new.img ] || fail "create with an unknown option made a file"
same info 'json:{"driver":"raw","bogus":1,"file":{"driver":"file","filename":"disk.img"}}'
same info 'json:{"driver":"raw","file":{"driver":"file","filename":"disk.img","bogus":2}}'

# Malformed sizes: negative, unknown suffix, 2^63 and beyond, junk.
for size in -1 12Q 9223372036854775808 8E 16E 1.5 abc ''; do
    same create -f raw new.img -- "$size"
    [ ! -e new.img ] || fail "create with size '$size' made a file"
    same resize -f raw disk.img -- "$size"
    unchanged "resize to '$size'"
done

# A backing file for a format that cannot hold one, at create and open.
same create -f raw -b disk.img -F raw new.img 1M
[ ! -e new.img ] || fail "raw create with a backing file made a file"
same info 'json:{"driver":"raw","backing":"disk.img","file":{"driver":"file","filename":"disk.img"}}'
unchanged "raw with a backing file"

# Requests out of range and writes to a read-only image: qemu-io's
# messages and exit statuses.
cp disk.img q.img
cp disk.img v.img
for cmds in "read 1M 512" "write 2M 4k" "write -z 1020k 8k" "discard 1M 1" \
            "read -P 0x11 -1 1" "write 0 -5" "write 1E 1"; do
    qrc=0 vrc=0
    $QEMU_IO -f raw -c "$cmds" q.img > q.out 2>&1 || qrc=$?
    "$VDISK_QEMU_IO" -f raw -c "$cmds" v.img > v.out 2>&1 || vrc=$?
    diff -u q.out v.out || fail "vdisk io differs from qemu-io for: $cmds"
    [ "$qrc" = "$vrc" ] || fail "exit status qemu-io=$qrc vdisk=$vrc for: $cmds"
    cmp v.img disk.img || fail "out-of-range '$cmds' changed the image"
done
qrc=0 vrc=0
$QEMU_IO -r -f raw -c 'write 0 512' q.img > q.out 2>&1 || qrc=$?
"$VDISK_QEMU_IO" -r -f raw -c 'write 0 512' v.img > v.out 2>&1 || vrc=$?
diff -u q.out v.out || fail "write to a read-only image differs from qemu-io"
[ "$qrc" = "$vrc" ] || fail "read-only write: exit qemu-io=$qrc vdisk=$vrc"
cmp v.img disk.img || fail "a write to a read-only image changed it"
unchanged "the whole test"

# A FIFO is not an image: refused at once, not waited on (as an image and
# as a backing file).
mkfifo fifo
rc=0
timeout 10 "$VDISK" info -f raw fifo > out.txt 2>&1 || rc=$?
[ "$rc" = 1 ] || fail "a FIFO image gave exit status $rc (124 means it hung)"
grep -q "regular file" out.txt || fail "no clear error for a FIFO: $(cat out.txt)"
$QEMU_IMG create -q -f qcow2 -u -b fifo -F raw over.qcow2 1M
rc=0
timeout 10 "$VDISK" io -c 'read 0 512' over.qcow2 > out.txt 2>&1 || rc=$?
[ "$rc" = 1 ] || fail "a FIFO backing file gave exit status $rc"
