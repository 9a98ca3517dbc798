#!/usr/bin/env bash
# vdisk snapshot against qemu-img snapshot: the same output, messages and
# exit statuses for list/create/apply/delete and their errors; vdisk info
# shows the snapshot list as qemu-img info does (human and JSON text);
# the group mode snapshots several images at once with one VM state.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io
tmpdir

# compare NAME ARGS...: run "qemu-img snapshot ARGS" on q-NAME.qcow2 and
# "vdisk snapshot ARGS" on v-NAME.qcow2 (copies of one image).
compare()
{
    local qrc=0 vrc=0
    $QEMU_IMG snapshot "$@" q.qcow2 >q.out 2>q.err || qrc=$?
    "$VDISK" snapshot "$@" v.qcow2 >v.out 2>v.err || vrc=$?
    [ "$qrc" = "$vrc" ] || fail "snapshot $*: exit $vrc, qemu-img $qrc"
    diff <(sed -e 's/^qemu-img: //' -e 's/q\.qcow2/IMG/g' \
               -e "s/'qemu-img --help'/HELP/" q.err) \
         <(sed -e 's/^vdisk: //' -e 's/v\.qcow2/IMG/g' \
               -e "s/'vdisk --help'/HELP/" v.err) ||
        fail "snapshot $*: messages differ"
    # Dates differ by the second the command ran; drop the column.
    diff <(awk '{ $5 = ""; $6 = ""; print }' q.out) \
         <(awk '{ $5 = ""; $6 = ""; print }' v.out) ||
        fail "snapshot $*: output differs"
}

$QEMU_IMG create -f qcow2 q.qcow2 16M >/dev/null
$QEMU_IO -c 'write -P 1 0 1M' q.qcow2 >/dev/null
cp q.qcow2 v.qcow2

compare -l
compare -c one
compare -c two
compare -c one          # duplicate names are allowed
compare -l
compare -a two
compare -a 1
compare -a nosuch
compare -d nosuch
compare -d 1            # -d looks up names only
compare -d one
compare -l
compare -c three
compare -l
compare -l -a x
compare -c
compare -x
compare -U -c four
compare -U -l
compare                 # no action: nothing at all

# Errors before any image: no file name.
qrc=0; vrc=0
$QEMU_IMG snapshot -l 2>q.err || qrc=$?
"$VDISK" snapshot -l 2>v.err || vrc=$?
[ "$qrc" = "$vrc" ] || fail "no file: exit $vrc, qemu-img $qrc"

# A format without snapshots.
$QEMU_IMG create -f raw r.raw 1M >/dev/null
expect_status 1 "$VDISK" snapshot -f raw -c x r.raw 2>err
grep -q "Could not create snapshot 'x': -95 (Operation not supported)" err ||
    fail "raw create message"
expect_status 1 "$VDISK" snapshot -f raw -a x r.raw 2>err
grep -q "Could not apply snapshot 'x': Block driver does not support snapshots" \
    err || fail "raw apply message"
[ -z "$("$VDISK" snapshot -f raw -l r.raw)" ] || fail "raw list not empty"

# info: human and JSON text exactly as qemu-img's (dates are the image's).
for out in human json; do
    $QEMU_IMG info --output=$out v.qcow2 | grep -v -e '^disk size' \
        -e '"actual-size"' >q.info
    "$VDISK" info --output=$out v.qcow2 | grep -v -e '^disk size' \
        -e '"actual-size"' >v.info
    diff q.info v.info || fail "info --output=$out differs"
done

# Group mode: three disks, VM state on the second.
for d in d1 d2 d3; do
    $QEMU_IMG create -f qcow2 $d.qcow2 8M >/dev/null
    $QEMU_IO -c "write -P 0x11 0 1M" $d.qcow2 >/dev/null
done
head -c 300000 /dev/urandom >vm.bin
"$VDISK" snapshot --group -c both --vmstate d2.qcow2 --vmstate-data vm.bin \
    d1.qcow2 d2.qcow2 d3.qcow2
for d in d1 d2 d3; do
    $QEMU_IMG snapshot -l $d.qcow2 | grep -q ' both ' || fail "$d: no snapshot"
    $QEMU_IO -c "write -P 0x22 0 2M" $d.qcow2 >/dev/null
    $QEMU_IMG check $d.qcow2 >/dev/null || fail "$d not clean"
done
$QEMU_IMG snapshot -l d2.qcow2 | grep -q ' 293 KiB ' || fail "VM state size"
$QEMU_IMG snapshot -l d1.qcow2 | grep -q ' 0 B ' || fail "VM state on d1"
"$VDISK" snapshot --group -a both --vmstate d2.qcow2 --vmstate-data back.bin \
    d1.qcow2 d2.qcow2 d3.qcow2
cmp vm.bin back.bin || fail "VM state not restored"
for d in d1 d2 d3; do
    $QEMU_IO -c "read -P 0x11 0 1M" -c "read -P 0 1M 1M" $d.qcow2 |
        grep -c '^read' | grep -q 2 || fail "$d not reverted"
done
expect_status 1 "$VDISK" snapshot --group -a nosuch d1.qcow2 d2.qcow2 2>err
grep -q "nosuch" err || fail "group apply of a missing snapshot"
"$VDISK" snapshot --group -d both d1.qcow2 d2.qcow2 d3.qcow2
for d in d1 d2 d3; do
    [ -z "$($QEMU_IMG snapshot -l $d.qcow2)" ] || fail "$d: not deleted"
    $QEMU_IMG check $d.qcow2 >/dev/null || fail "$d not clean"
done
expect_status 1 "$VDISK" snapshot --group -c x 2>/dev/null
