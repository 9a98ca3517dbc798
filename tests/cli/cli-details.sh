#!/usr/bin/env bash
# Small CLI details checked against qemu-img/qemu-io: failing json: opens
# name what qemu names, sizes near 2^63 are refused with qemu's messages
# on create and resize, and `open -C` (copy-on-read) fills the overlay.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io
tmpdir

# same_output NAME CMD-ARGS...: QEMU's qemu-img CMD and vdisk's (under
# that name) must exit alike and print the same.
same_output()
{
    local name=$1 qrc=0 vrc=0
    shift
    $QEMU_IMG "$@" >q.out 2>&1 || qrc=$?
    "$VDISK_QEMU_IMG" "$@" >v.out 2>&1 || vrc=$?
    [ "$vrc" = "$qrc" ] || fail "$name: exit $vrc, qemu-img $qrc: $(cat v.out)"
    diff q.out v.out || fail "$name: messages differ"
}

# 1. json: filenames that fail to open (and null-co opened from options).
$QEMU_IMG create -q -f qcow2 img.qcow2 1M
for j in '{"driver":"qcow2","file":{"driver":"file","filename":"/nonexistent"}}' \
         '{"driver":"qcow2","file":"/nonexistent"}' \
         '{"driver":"raw","file":""}' \
         '{"driver":"qcow2","file":{"driver":"null-co","size":"1M"}}' \
         '{"driver":"raw","file":{"driver":"null-co"}}' \
         '{"driver":"null-co"}' \
         '{"driver":"qcow2"}' \
         '{"file":{}}' \
         '{}' \
         '{"filename":"img.qcow2"}'; do
    same_output "info json:$j" info "json:$j"
done
$QEMU_IMG info --output=json 'json:{"driver":"null-co"}' >q.json
"$VDISK" info --output=json 'json:{"driver":"null-co"}' >v.json
# (vdisk adds "dirty-flag": false for null-co, a known difference.)
json_equal_filtered q.json v.json actual-size dirty-flag

# 3. Sizes near 2^63: qemu rounds to sectors in an int64, then applies
# its maximum length (2^63 - 2^30). File systems differ in the largest
# file they take, so the raw cases only need to agree with qemu-img.
for size in 9223372036854775807 9223372036854775296 9223372036854775295 \
            9223372036854771712 9223372035781033985 9223372035781033984 \
            9223372036854775808; do
    for fmt in raw qcow2; do
        same_output "create $fmt $size" create -q -f "$fmt" x.img "$size"
        rm -f x.img
        # (-o size= of 2^63 and more is a known difference.)
        if [ "$size" != 9223372036854775808 ]; then
            same_output "create $fmt -o size=$size" \
                create -q -f "$fmt" -o "size=$size" x.img
            rm -f x.img
        fi
        # (Growing to the maximum itself fails in the file system or in
        # qcow2's L1 table, with messages not compared here.)
        if [ "$size" != 9223372035781033984 ]; then
            $QEMU_IMG create -q -f "$fmt" x.img 1M
            same_output "resize $fmt $size" resize -q -f "$fmt" x.img "$size"
            rm -f x.img
        fi
    done
done 2>/dev/null

# 4. Copy-on-read: reads through `open -C` (or -C) copy the backing
# data into the overlay.
$QEMU_IMG create -q -f qcow2 base.qcow2 1M
$QEMU_IO -c 'write -P 7 0 256k' base.qcow2 >/dev/null
for t in q v; do
    $QEMU_IMG create -q -f qcow2 -b base.qcow2 -F qcow2 "top-$t.qcow2"
done
$QEMU_IO -c 'open -C top-q.qcow2' -c 'read -P 7 0 64k' >/dev/null
"$VDISK" io -c 'open -C top-v.qcow2' -c 'read -P 7 0 64k' >/dev/null
$QEMU_IO -C -c 'read -P 7 128k 4k' top-q.qcow2 >/dev/null
"$VDISK" io -C -c 'read -P 7 128k 4k' top-v.qcow2 >/dev/null
$QEMU_IMG map --output=json top-q.qcow2 >q.map
$QEMU_IMG map --output=json top-v.qcow2 >v.map
diff q.map v.map || fail "copy-on-read left different allocations"
grep -q '"depth": 0, "present": true' v.map ||
    fail "copy-on-read allocated nothing in the overlay"
assert_same_content top-q.qcow2 top-v.qcow2
# Copy-on-read needs a writable image, with qemu-io's message.
qrc=0; vrc=0
$QEMU_IO -c 'open -r -C top-q.qcow2' >q.out 2>&1 || qrc=$?
"$VDISK_QEMU_IO" -c 'open -r -C top-v.qcow2' >v.out 2>&1 || vrc=$?
[ "$vrc" = "$qrc" ] || fail "open -r -C: exit $vrc, qemu-io $qrc"
diff <(sed -e 's/top-q/top-v/' q.out) v.out ||
    fail "open -r -C: messages differ"
exit 0
