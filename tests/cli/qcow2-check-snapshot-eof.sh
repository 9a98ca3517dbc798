#!/usr/bin/env bash
# check -r all left errors on an image whose snapshot table offset pointed past the end of the file, which qemu-img repairs.
# QEMU's check reads the table as zeros there, reports each entry as
# incomplete and rewrites the table (qcow2_check_fix_snapshot_table); vdisk
# must report and repair the same, and both copies then check clean and
# list the same snapshots.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/qcow2-damage-functions.bash"
requires qemu-img qemu-io python3
tmpdir

damage_bases
damage_make . sn-eof=main.qcow2:sn-eof
cp sn-eof.qcow2 q.qcow2
cp sn-eof.qcow2 v.qcow2

# The diagnosis first, then the repair: same status, same JSON.
qrc=0; $QEMU_IMG check --output=json q.qcow2 > q0.json 2>/dev/null || qrc=$?
vrc=0; "$VDISK" check --output=json v.qcow2 > v0.json 2>/dev/null || vrc=$?
[ "$qrc" = "$vrc" ] || fail "check: exit $vrc, qemu-img $qrc"
json_equal_filtered q0.json v0.json filename
qrc=0; $QEMU_IMG check -r all --output=json q.qcow2 > q.json 2>q.err || qrc=$?
vrc=0; "$VDISK" check -r all --output=json v.qcow2 > v.json 2>v.err || vrc=$?
[ "$qrc" = 0 ] || fail "qemu-img check -r all exit $qrc: the reference changed"
[ "$vrc" = 0 ] || fail "check -r all exit $vrc: $(cat v.err)"
json_equal_filtered q.json v.json filename
grep -q "Repairing snapshot table entry 0 is incomplete" v.err ||
    fail "the repair was not reported: $(cat v.err)"

$QEMU_IMG check v.qcow2 >/dev/null || fail "v.qcow2 not clean after repair"
diff <($QEMU_IMG snapshot -l q.qcow2 | sed 1d) \
     <($QEMU_IMG snapshot -l v.qcow2 | sed 1d) ||
    fail "the repaired snapshot tables differ"
