#!/usr/bin/env bash
# vdisk convert against qemu-img convert on the same inputs: same content,
# same allocation (qemu-img map of both outputs, so sparse detection with
# -S, zero handling and qcow2 cluster layout match), same check results,
# several sources, -n, -c, -m/-W, -p, and qemu-img's error messages.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
requires qemu-img qemu-io
tmpdir

$QEMU_IMG create -f raw src.img 64M >/dev/null
$QEMU_IO -f raw -c 'write -P 0x5a 1M 512k' -c 'write -P 1 10M 3000' \
    -c 'write -P 2 20M 64k' -c 'write -z 30M 1M' -c 'write -P 3 40M 8k' \
    -c 'write -P 0 40M 4k' -c 'write -P 4 63M 1M' src.img >/dev/null
head -c 1000 /dev/urandom > odd.img
$QEMU_IMG create -f raw small.img 64k >/dev/null
$QEMU_IMG create -f qcow2 base.qcow2 64M >/dev/null
$QEMU_IO -f qcow2 -c 'write -P 0xcd 0 2M' base.qcow2 >/dev/null
$QEMU_IMG create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2 >/dev/null
$QEMU_IO -f qcow2 -c 'write -P 0xab 0 1M' -c 'write -z 4M 1M' \
    -c 'write -P 0xef 8M 64k' overlay.qcow2 >/dev/null
split_dirs

# check_outputs NAME FMT: both tools produced NAME with equal content and
# allocation.
check_outputs()
{
    local f=$1 fmt=$2
    [ -e "q/$f" ] && [ -e "v/$f" ] || fail "$f missing"
    assert_same_content -f "$fmt" -F "$fmt" "q/$f" "v/$f"
    (cd q && $QEMU_IMG map -U -f "$fmt" --output=json "$f") > qm.json
    (cd v && $QEMU_IMG map -U -f "$fmt" --output=json "$f") > vm.json
    diff -u qm.json vm.json || fail "allocation of $f differs"
    if [ "$fmt" = qcow2 ]; then
        (cd q && $QEMU_IMG check --output=json "$f") > qc.json
        (cd v && $QEMU_IMG check --output=json "$f") > vc.json
        json_equal_filtered qc.json vc.json || fail "check of $f differs"
    fi
}

same_rw convert -f raw -O raw src.img r1.img
check_outputs r1.img raw
same_rw convert src.img r2.img
check_outputs r2.img raw
same_rw convert -S 0 -O raw src.img r3.img
assert_same_content -f raw -F raw q/r3.img v/r3.img
same_rw convert -S 512 -O raw src.img r4.img
check_outputs r4.img raw
same_rw convert -S 64k -O raw src.img r5.img
check_outputs r5.img raw
same_rw convert -m 1 -O raw src.img r6.img
check_outputs r6.img raw
same_rw convert -m 16 -W -O raw src.img r7.img
assert_same_content -f raw -F raw q/r7.img v/r7.img
same_rw convert -f raw -O raw odd.img r8.img
check_outputs r8.img raw
same_rw convert -O raw src.img odd.img small.img r9.img
check_outputs r9.img raw
same_rw convert -p -O raw small.img r10.img
same_rw convert -q -p -O raw small.img r11.img

same_rw convert -f raw -O qcow2 src.img q1.qcow2
check_outputs q1.qcow2 qcow2
same_rw convert -O qcow2 -o cluster_size=4k,compat=0.10 src.img q2.qcow2
check_outputs q2.qcow2 qcow2
same_rw convert -O qcow2 overlay.qcow2 q3.qcow2
check_outputs q3.qcow2 qcow2
same_rw convert -c -O qcow2 src.img q4.qcow2
check_outputs q4.qcow2 qcow2
same_rw convert -c -O qcow2 overlay.qcow2 q5.qcow2
check_outputs q5.qcow2 qcow2
same_rw convert -O raw overlay.qcow2 r12.img
check_outputs r12.img raw

# -n: an existing target of the right size (or larger).
$QEMU_IMG create -f raw q/n1.img 64M >/dev/null
$QEMU_IO -f raw -c 'write -P 0x77 0 64M' q/n1.img >/dev/null
cp q/n1.img v/n1.img
same_rw convert -n -O raw src.img n1.img
assert_same_content -f raw -F raw q/n1.img v/n1.img
assert_same_content -f raw -F raw src.img v/n1.img
$QEMU_IMG create -f qcow2 q/n2.qcow2 80M >/dev/null
cp q/n2.qcow2 v/n2.qcow2
same_rw convert -n -O qcow2 overlay.qcow2 n2.qcow2
check_outputs n2.qcow2 qcow2
same_rw convert -n --target-is-zero -O qcow2 overlay.qcow2 n2.qcow2

# Errors.
same_rw convert -n -O raw src.img small.img
same_rw convert src.img
same_rw convert
same_rw convert -O raw -S 1000 src.img e.img
same_rw convert -O raw -S foo src.img e.img
same_rw convert -O raw -S 32M src.img e.img
same_rw convert -O raw -m 0 src.img e.img
same_rw convert -O raw -m 17 src.img e.img
same_rw convert -O raw -c src.img e.img
same_rw convert -O raw missing.img e.img
same_rw convert -n -o size=1 -O raw src.img e.img
same_rw convert --target-is-zero -O raw src.img e.img
same_rw convert -O raw -o bogus=1 src.img e.img
same_rw convert -O foo src.img e.img
same_rw convert -O raw -o help
same_rw convert -O qcow2 -o cluster_size=1234 src.img e.qcow2
