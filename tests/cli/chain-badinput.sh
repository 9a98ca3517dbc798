#!/usr/bin/env bash
# Broken backing chains: a loop, a missing backing file, a backing file
# that is a directory, a backing format that does not match the file,
# an unknown backing format and names longer than qcow2's 1023 bytes.
# Every tool fails with qemu-img's message (or at least a clear one) and
# no image is modified (sha256 unchanged).
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
requires qemu-img qemu-io sha256sum
tmpdir

$QEMU_IMG create -q -f qcow2 good.qcow2 1M
$QEMU_IO -c 'write -P 1 0 64k' good.qcow2 >/dev/null
$QEMU_IMG create -q -f raw r.img 1M
$QEMU_IMG create -q -f qcow2 -u -b b.qcow2 -F qcow2 a.qcow2 1M
$QEMU_IMG create -q -f qcow2 -u -b a.qcow2 -F qcow2 b.qcow2 1M
$QEMU_IMG create -q -f qcow2 -u -b missing.qcow2 -F qcow2 miss.qcow2 1M
mkdir dir.qcow2
$QEMU_IMG create -q -f qcow2 -u -b dir.qcow2 -F qcow2 dir-ov.qcow2 1M
$QEMU_IMG create -q -f qcow2 -u -b r.img -F qcow2 fmt1.qcow2 1M
$QEMU_IMG create -q -f qcow2 -u -b good.qcow2 -F vmdk fmt2.qcow2 1M
$QEMU_IMG create -q -f qcow2 -b good.qcow2 -F qcow2 ov.qcow2
$QEMU_IO -c 'write -P 2 0 4k' ov.qcow2 >/dev/null

sha256sum a.qcow2 b.qcow2 miss.qcow2 dir-ov.qcow2 fmt1.qcow2 fmt2.qcow2 \
    good.qcow2 ov.qcow2 r.img > before.sum

# qemu-img 7.2 hangs on a loop in map, check, compare, convert and
# create -b (info reports it, commit trips over its own lock): vdisk
# must fail everywhere with a clear message.
same info --backing-chain a.qcow2
for cmd in "commit" "map" "check" "compare good.qcow2" "convert -O qcow2 - out.qcow2" \
           "create -f qcow2 -F qcow2 -b"; do
    # shellcheck disable=SC2086
    set -- $cmd
    args=()
    for w in "$@"; do [ "$w" = - ] && args+=(a.qcow2) || args+=("$w"); done
    case $cmd in
    map|check|commit) args+=(a.qcow2) ;;
    compare*) args=(compare a.qcow2 good.qcow2) ;;
    create*) args+=(a.qcow2 new.qcow2) ;;
    esac
    st=0
    timeout 20 $VDISK "${args[@]}" > /dev/null 2> err || st=$?
    [ "$st" = 1 ] || [ "$st" = 2 ] || fail "status $st from vdisk ${args[*]}"
    grep -q "infinite loop\|loops back" err || fail "no loop message: $(cat err)"
done
rm -f out.qcow2 new.qcow2

for img in miss.qcow2 dir-ov.qcow2 fmt1.qcow2; do
    same info --backing-chain "$img"
    same map "$img"
    same check "$img"
    same commit "$img"
    same rebase -b good.qcow2 -F qcow2 "$img"
    same compare "$img" good.qcow2
    same convert -O qcow2 "$img" out.qcow2
    same create -f qcow2 -b "$img" -F qcow2 new.qcow2
    rm -f out.qcow2 new.qcow2
done
# The loop is reported from vdisk io too, and the read fails cleanly.
expect_status 1 $VDISK io -c 'read 0 4k' a.qcow2 2> err
grep -q "loops back" err || fail "no loop message: $(cat err)"
expect_status 1 $VDISK io -c 'read 0 4k' dir-ov.qcow2 2> err
grep -q "regular file" err || fail "no directory message: $(cat err)"

# A backing format the backing file is not (vmdk, for a qcow2 file): the
# vmdk driver's words, as qemu-img's.
expect_status 1 $VDISK info --backing-chain fmt2.qcow2 2> err
grep -q "good.qcow2': invalid VMDK image descriptor" err ||
    fail "unclear message: $(cat err)"

# Wrong formats and names given to the tools.
long=$(printf 'x%.0s' $(seq 1100))
same create -f qcow2 -b r.img -F qcow2 new.qcow2
same create -f raw -b good.qcow2 -F qcow2 new.img
same create -f qcow2 -b good.qcow2 new.qcow2
same create -f qcow2 -b ov.qcow2 -F qcow2 ov.qcow2
same rebase -b r.img -F qcow2 ov.qcow2
same rebase -b missing.qcow2 -F qcow2 ov.qcow2
same rebase -b dir.qcow2 -F qcow2 ov.qcow2
same rebase -b good.qcow2 -F nosuchfmt ov.qcow2
same rebase ov.qcow2
same rebase -F qcow2 ov.qcow2
same commit -b missing.qcow2 ov.qcow2
same commit -b ov.qcow2 ov.qcow2
same commit good.qcow2
same convert -O qcow2 -B good.qcow2 ov.qcow2 out.qcow2
# Overlong names: qemu-img writes the image and then fails; vdisk refuses
# before writing anything.
expect_status 1 $VDISK create -f qcow2 -u -b "$long" -F qcow2 long.qcow2 1M \
    2> err
grep -q "Could not assign backing file" err || fail "message: $(cat err)"
test ! -e long.qcow2 || fail "create with an overlong name left a file"
expect_status 1 $VDISK rebase -u -b "$long" -F qcow2 ov.qcow2 2> err
grep -q "Could not change the backing file" err || fail "message: $(cat err)"
expect_status 1 $VDISK rebase -b "$long" -F qcow2 ov.qcow2 2>/dev/null
# raw cannot hold a backing file at open either.
expect_status 1 $VDISK io -c 'read 0 4k' -o backing=good.qcow2 r.img 2>/dev/null

rm -f new.qcow2 new.img out.qcow2 long.qcow2
sha256sum -c --quiet before.sum || fail "an image was modified"
