#!/usr/bin/env bash
# discard on a compat=0.10 image with a backing file exposed the backing file's data where QEMU keeps the guest's.
# v2 has no zero clusters, so a discarded cluster would fall through to
# the backing file; QEMU discards nothing then (the request is advisory)
# and vdisk must do the same, through vdisk io and through NBD TRIM.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io timeout
tmpdir

$QEMU_IMG create -q -f qcow2 back.qcow2 1M
$QEMU_IO -c 'write -q -P 0x99 0 1M' back.qcow2
$QEMU_IMG create -q -f qcow2 -o compat=0.10 -b back.qcow2 -F qcow2 \
    base.qcow2 1M
$QEMU_IO -c 'write -q -P 0x11 0 256k' base.qcow2

cp base.qcow2 q.qcow2
cp base.qcow2 v.qcow2
$QEMU_IO -c 'discard 0 256k' q.qcow2 >/dev/null
"$VDISK" io -c 'discard 0 256k' v.qcow2 >/dev/null
$QEMU_IO -r -c 'read -P 0x11 0 256k' q.qcow2 >/dev/null ||
    fail "qemu-io no longer keeps the data: the reference changed"
assert_same_content q.qcow2 v.qcow2
$QEMU_IMG check v.qcow2 >/dev/null || fail "v.qcow2 does not check clean"

# NBD TRIM reaches the same driver callback.
cp base.qcow2 n.qcow2
timeout 60 "$VDISK" serve --fork --pid-file "$PWD/pid" -f qcow2 \
    -k "$PWD/sock" n.qcow2
cleanup_fn sh -c '[ ! -s pid ] || kill "$(cat pid)"'
timeout 60 $QEMU_IO -f raw -c 'discard 0 256k' \
    "nbd+unix:///?socket=$PWD/sock" >/dev/null
for _ in $(seq 100); do [ -e pid ] || break; sleep 0.1; done
[ ! -e pid ] || fail "the server did not exit after its client"
assert_same_content q.qcow2 n.qcow2

# Without a backing file a v2 discard still frees the clusters (they read
# as zeros then), as in QEMU.
$QEMU_IMG create -q -f qcow2 -o compat=0.10 alone.qcow2 1M
$QEMU_IO -c 'write -q -P 0x11 0 256k' alone.qcow2
cp alone.qcow2 qa.qcow2
$QEMU_IO -c 'discard 0 256k' qa.qcow2 >/dev/null
"$VDISK" io -c 'discard 0 256k' alone.qcow2 >/dev/null
assert_same_content qa.qcow2 alone.qcow2
$QEMU_IMG map --output=json qa.qcow2 > qa.map
$QEMU_IMG map --output=json alone.qcow2 > va.map
diff qa.map va.map || fail "the discard allocated differently"
