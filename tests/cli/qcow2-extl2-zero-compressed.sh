#!/usr/bin/env bash
# On an extended_l2 image a zero write over part of a compressed cluster reported success but the old data stayed.
# QEMU cannot mark part of a compressed cluster as zeros and falls back to
# writing zeros (the cluster is decompressed and rewritten); vdisk must
# end with the same guest data, through vdisk io and through NBD
# WRITE_ZEROES, and an image that checks clean.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io python3 timeout
tmpdir

$QEMU_IMG create -q -f qcow2 -o extended_l2=on base.qcow2 1M
$QEMU_IO -c 'write -q -c -P 0x33 0 64k' -c 'write -q -c -P 0x44 64k 64k' \
    -c 'write -q -P 0x55 128k 64k' base.qcow2

# The zero writes: inside one compressed cluster (subcluster-aligned and
# not), across the end of one into the next, and over a whole one.
cmds=(-c 'write -z 4k 8k' -c 'write -z 20000 100' -c 'write -z 60k 12k'
      -c 'write -z 64k 64k')

cp base.qcow2 q.qcow2
cp base.qcow2 v.qcow2
$QEMU_IO "${cmds[@]}" q.qcow2 >/dev/null
"$VDISK" io "${cmds[@]}" v.qcow2 >/dev/null
assert_same_content q.qcow2 v.qcow2
$QEMU_IO -r -c 'read -P 0 4k 8k' -c 'read -P 0x33 0 4k' -c 'read -P 0 60k 4k' \
    v.qcow2 >/dev/null || fail "the zeroed range does not read as zeros"
$QEMU_IMG check v.qcow2 >/dev/null || fail "v.qcow2 does not check clean"

# Through NBD: qemu-io's write -z sends WRITE_ZEROES. Without -t the
# server exits (and removes its pid file) when the client disconnects.
cp base.qcow2 n.qcow2
timeout 60 "$VDISK" serve --fork --pid-file "$PWD/pid" -f qcow2 \
    -k "$PWD/sock" n.qcow2
cleanup_fn sh -c '[ ! -s pid ] || kill "$(cat pid)"'
timeout 60 $QEMU_IO -f raw "${cmds[@]}" "nbd+unix:///?socket=$PWD/sock" \
    >/dev/null
for _ in $(seq 100); do [ -e pid ] || break; sleep 0.1; done
[ ! -e pid ] || fail "the server did not exit after its client"
assert_same_content q.qcow2 n.qcow2
$QEMU_IMG check n.qcow2 >/dev/null || fail "n.qcow2 does not check clean"
