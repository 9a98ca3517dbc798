#!/usr/bin/env bash
# qemu-nbd -c/-d with the kernel's NBD client, vdisk invoked as qemu-nbd
# beside QEMU's qemu-nbd: each binds a /dev/nbdN device to its own copy
# of an image; the data read through the two devices must be the same,
# a write through vdisk's device must land in its image, -d must print
# what qemu-nbd prints and unbind the device, and the server must end
# then (qemu-nbd -c's lifetime). Needs root, the nbd module and two free
# devices; skipped otherwise, saying which is missing.
source "$(dirname "$0")/../functions.sh"
requires qemu-nbd qemu-img qemu-io timeout cmp
tmpdir

Q=qemu-nbd
V=$VDISK_QEMU_NBD

skip() { echo "$0: test skipped because $*"; exit 77; }
[ "$(id -u)" = 0 ] || skip "binding /dev/nbdN needs root"
[ -d /sys/module/nbd ] ||
    skip "the kernel's nbd module is not loaded (modprobe nbd)"
free=()
for d in /dev/nbd[0-9]*; do
    [ -b "$d" ] || continue
    # A device in use has a pid file in sysfs.
    [ -e "/sys/block/$(basename "$d")/pid" ] && continue
    free+=("$d")
    [ ${#free[@]} = 2 ] && break
done
[ ${#free[@]} = 2 ] || skip "two free /dev/nbdN devices are needed"
qdev=${free[0]}
vdev=${free[1]}

$QEMU_IMG create -q -f qcow2 q.qcow2 4M
$QEMU_IO -c 'write -P 0x5a 0 1M' -c 'write -P 0x3c 2M 64k' q.qcow2 >/dev/null
cp q.qcow2 v.qcow2

# Both with -v: they stay in the foreground and say when the device is
# bound.
$Q -v -c "$qdev" -k "$PWD/q.sock" -f qcow2 q.qcow2 2> q.err &
qpid=$!
cleanup_fn sh -c "$Q -d $qdev >/dev/null 2>&1; kill $qpid 2>/dev/null; true"
"$V" -v -c "$vdev" -k "$PWD/v.sock" -f qcow2 v.qcow2 2> v.err &
vpid=$!
cleanup_fn sh -c "$V -d $vdev >/dev/null 2>&1; kill $vpid 2>/dev/null; true"
for ((i = 0; i < 200; i++)); do
    grep -q 'is now connected' q.err && grep -q 'is now connected' v.err &&
        break
    sleep 0.05
done
sed "s|$qdev|DEV|; s|q.qcow2|IMG|" q.err > q.norm
sed "s|$vdev|DEV|; s|v.qcow2|IMG|" v.err > v.norm
diff -u q.norm v.norm || fail "-v -c printed something else"

timeout 30 cmp -n 4194304 "$qdev" "$vdev" || fail "the devices read differently"
timeout 30 dd if=/dev/zero bs=64k count=1 seek=16 of="$vdev" oflag=direct \
    status=none || fail "write through the device failed"

$Q -d "$qdev" > q.d.out
"$V" -d "$vdev" > v.d.out
sed -i "s|$qdev|DEV|" q.d.out
sed -i "s|$vdev|DEV|" v.d.out
diff -u q.d.out v.d.out || fail "-d printed something else"
qs=0 vs=0
wait "$qpid" || qs=$?
wait "$vpid" || vs=$?
[ "$qs" = "$vs" ] || fail "exit status $vs after -d, qemu-nbd's $qs"
$QEMU_IO -c 'read -P 0 1M 64k' -c 'read -P 0x3c 2M 64k' v.qcow2 |
    grep -q 'verification failed' && fail "the write did not land in the image"
$QEMU_IMG check -q v.qcow2 || fail "image damaged"
