#!/usr/bin/env bash
# Damaged qcow2 snapshot tables (table past the end of the file, a name
# running past it, a huge or misplaced snapshot L1 table, too many
# snapshots, oversized extra data): every snapshot command fails with a
# message naming the file, nothing crashes and the image is not written.
source "$(dirname "$0")/../functions.sh"
requires qemu-img python3 sha256sum
tmpdir

patch()   # FILE OFFSET FORMAT VALUE (big endian)
{
    python3 -c '
import struct, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(int(sys.argv[2], 0))
    f.write(struct.pack(">" + sys.argv[3], int(sys.argv[4], 0)))
' "$@"
}

$QEMU_IMG create -f qcow2 good.qcow2 4M >/dev/null
$QEMU_IMG snapshot -c one good.qcow2
$QEMU_IMG snapshot -c two good.qcow2
table=$(python3 -c '
import struct
with open("good.qcow2", "rb") as f:
    f.seek(64); print(struct.unpack(">Q", f.read(8))[0])')

make()    # NAME OFFSET FORMAT VALUE
{
    cp good.qcow2 "$1.qcow2"
    patch "$1.qcow2" "$2" "$3" "$4"
}
make past-eof      64                 Q 0x40000000
make name-too-long $((table + 14))    H 0xffff
make huge-l1       $((table + 8))     I 0x10000000
make l1-unaligned  $((table + 0))     Q 0x10200
make l1-past-eof   $((table + 0))     Q 0x7fff0000
make too-many      60                 I 65537
make big-extra     $((table + 36))    I 0x100000

for img in past-eof name-too-long huge-l1 l1-unaligned l1-past-eof \
           too-many big-extra; do
    sum=$(sha256sum "$img.qcow2")
    for cmd in "snapshot -l" "snapshot -c new" "snapshot -a one" \
               "snapshot -d one" "info" "convert -O raw -l one"; do
        rc=0
        # shellcheck disable=SC2086
        "$VDISK" $cmd "$img.qcow2" $([ "${cmd%% *}" = convert ] && echo out.raw) \
            >out 2>err || rc=$?
        [ "$rc" = 1 ] || { cat err; fail "$img: $cmd exited $rc"; }
        grep -q "$img.qcow2" err || { cat err; fail "$img: $cmd: no file name"; }
    done
    [ "$(sha256sum "$img.qcow2")" = "$sum" ] || fail "$img was written"
done

# A check run still opens such images and reports instead of crashing.
rc=0
"$VDISK" check huge-l1.qcow2 >out 2>&1 || rc=$?
[ "$rc" -lt 64 ] || fail "check on huge-l1 exited $rc"

# qemu_lines_then_file QERR ERR FILE: vdisk's stderr starts with
# qemu-img's lines (program name aside) and goes on with vdisk's own
# line naming FILE and the fault, which qemu-img does not print.
qemu_lines_then_file()
{
    local n
    n=$(wc -l < "$1")
    diff <(sed 's/^qemu-img: //' "$1") <(head -n "$n" "$2" | sed 's/^vdisk: //') ||
        fail "the first lines differ from qemu-img's"
    tail -n +"$((n + 1))" "$2" | grep -q "$3" ||
        fail "no line naming $3 after qemu-img's: $(cat "$2")"
}

# refcount_bits=1: a second reference is impossible; refused cleanly,
# with qemu-img's message and the reason.
$QEMU_IMG create -f qcow2 -o refcount_bits=1 r1.qcow2 4M >/dev/null
$QEMU_IO -c 'write 0 64k' r1.qcow2 >/dev/null
sum=$(sha256sum r1.qcow2)
cp r1.qcow2 r1-q.qcow2
expect_status 1 $QEMU_IMG snapshot -c s r1-q.qcow2 2>qerr
expect_status 1 "$VDISK" snapshot -c s r1.qcow2 2>err
qemu_lines_then_file qerr err r1.qcow2
grep -q "overflow" err || fail "no reason given for the refusal"
[ "$(sha256sum r1.qcow2)" = "$sum" ] || fail "r1.qcow2 was written"

# An L2 offset that is not cluster-aligned opens but makes a new
# snapshot fail: qcow2's corruption note, then qemu-img's errno line,
# then vdisk's line naming the file.
$QEMU_IMG create -f qcow2 l2.qcow2 4M >/dev/null
$QEMU_IO -c 'write -P 1 0 64k' l2.qcow2 >/dev/null
l1=$(python3 -c '
import struct
with open("l2.qcow2", "rb") as f:
    f.seek(40); print(struct.unpack(">Q", f.read(8))[0])')
patch l2.qcow2 "$l1" Q 0x8000000000030200
cp l2.qcow2 l2-q.qcow2
expect_status 1 $QEMU_IMG snapshot -c new l2-q.qcow2 2>qerr
expect_status 1 "$VDISK" snapshot -c new l2.qcow2 2>err
qemu_lines_then_file qerr err l2.qcow2
$QEMU_IMG check r1.qcow2 >/dev/null || fail "r1.qcow2 not clean"
