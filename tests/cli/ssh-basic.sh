#!/usr/bin/env bash
# The ssh driver against a throwaway sshd: raw and qcow2 images on ssh://
# created, written, read, mapped, converted and resized by vdisk and by
# QEMU's ssh driver (qemu-img, qemu-io) on the same URIs, each reading
# what the other wrote; info and map outputs equal to qemu-img's;
# blockdev options (json:, --image-opts with QEMU's legacy names).
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
source "$(dirname "$0")/ssh-server.bash"
requires qemu-img qemu-io
ssh_test_begin

# raw: created by each tool, the same size and info.
same create -f raw "$U/q.raw$NO" 4M
mv "$D/q.raw" "$D/q0.raw"
"$VDISK_QEMU_IMG" create -f raw "$U/q.raw$NO" 4M >/dev/null
cmp "$D/q.raw" "$D/q0.raw" || fail "vdisk's and qemu-img's raw differ"
same info "$U/q.raw$NO"
same map "$U/q.raw$NO"

# qemu-io writes, vdisk reads; vdisk writes, qemu-io reads.
$QEMU_IO -f raw -c 'write -P 0x5a 0 1M' -c 'write -P 0xa5 3M 4k' \
    "$U/q.raw$NO" >/dev/null
"$VDISK" io -f raw -c 'read -P 0x5a 0 1M' -c 'read -P 0xa5 3M 4k' \
    -c 'read -P 0 1M 2M' "$U/q.raw$NO" >/dev/null ||
    fail "vdisk does not read what qemu-io wrote"
"$VDISK" io -f raw -c 'write -P 0x11 512 70000' -c 'write -P 0x22 2M 1M' \
    -c flush "$U/q.raw$NO" >/dev/null
$QEMU_IO -f raw -c 'read -P 0x5a 0 512' -c 'read -P 0x11 512 70000' \
    -c 'read -P 0x22 2M 1M' "$U/q.raw$NO" >/dev/null ||
    fail "qemu-io does not read what vdisk wrote"

# Convert both ways; the bytes each tool reads over ssh equal the file.
head -c $((6 * 1024 * 1024 + 4096)) /dev/urandom >src.raw
"$VDISK" convert -O raw src.raw "$U/v.raw$NO"
cmp src.raw "$D/v.raw" || fail "vdisk convert to ssh lost data"
$QEMU_IMG convert -f raw -O qcow2 "$U/v.raw$NO" back-q.qcow2
"$VDISK" convert -f raw -O qcow2 "$U/v.raw$NO" back-v.qcow2
$QEMU_IMG compare back-q.qcow2 back-v.qcow2 >/dev/null ||
    fail "qcow2 copies of the ssh image differ"
$QEMU_IMG compare -f raw src.raw back-v.qcow2 >/dev/null ||
    fail "vdisk convert from ssh lost data"

# A file whose end is not a sector boundary: the last sector reads as
# the tail and zeros, as QEMU reads it.
head -c 1000 /dev/urandom >"$D/odd.raw"
$QEMU_IMG convert -f raw -O raw "$U/odd.raw$NO" odd-q.raw
"$VDISK" convert -f raw -O raw "$U/odd.raw$NO" odd-v.raw
cmp odd-q.raw odd-v.raw || fail "the tail of a 1000-byte file reads wrong"

# qcow2 on ssh, made by vdisk: QEMU checks and reads it; the other way.
"$VDISK" create -q -f qcow2 "$U/v.qcow2$NO" 8M
"$VDISK" io -c 'write -P 0x77 64k 1M' -c 'write -P 0x78 7M 512' \
    "$U/v.qcow2$NO" >/dev/null
$QEMU_IMG check "$U/v.qcow2$NO" >/dev/null ||
    fail "qemu-img check refuses vdisk's qcow2 on ssh"
$QEMU_IO -c 'read -P 0x77 64k 1M' -c 'read -P 0x78 7M 512' \
    "$U/v.qcow2$NO" >/dev/null || fail "qemu-io reads vdisk's qcow2 wrong"
same info "$U/v.qcow2$NO"
same map --output=json "$U/v.qcow2$NO"
same check "$U/v.qcow2$NO"
$QEMU_IMG create -q -f qcow2 "$U/q.qcow2$NO" 8M
$QEMU_IO -c 'write -P 0x31 1M 2M' "$U/q.qcow2$NO" >/dev/null
"$VDISK" io -c 'read -P 0x31 1M 2M' -c 'read -P 0 0 1M' \
    "$U/q.qcow2$NO" >/dev/null || fail "vdisk reads qemu's qcow2 wrong"
same info --output=json "$U/q.qcow2$NO"
same compare "$U/q.qcow2$NO" "$U/v.qcow2$NO"

# Resize: grow (raw and qcow2), shrink refused as QEMU refuses it.
same resize -f raw "$U/q.raw$NO" 5M
same info "$U/q.raw$NO"
same resize -f raw --shrink "$U/q.raw$NO" 1M
same resize "$U/v.qcow2$NO" 16M
"$VDISK" io -c 'read -P 0x77 64k 1M' -c 'read -P 0 8M 8M' \
    "$U/v.qcow2$NO" >/dev/null || fail "grown qcow2 reads wrong"

# Blockdev options: json: (server, path, user, host-key-check) and the
# legacy keys of --image-opts; the node's name is QEMU's.
S="\"driver\":\"ssh\",\"server\":{\"host\":\"127.0.0.1\",\"port\":\"$SSH_PORT\"},\"path\":\"$D/q.raw\",\"host-key-check\":{\"mode\":\"none\"}"
J="{\"driver\":\"raw\",\"file\":{$S}}"
same info --output=json "json:$J"
same info --image-opts "driver=raw,file.driver=ssh,file.host=127.0.0.1,file.port=$SSH_PORT,file.path=$D/q.raw,file.host_key_check=no,file.user=root"
same info --image-opts "driver=raw,file.driver=ssh,file.server.host=127.0.0.1,file.server.port=$SSH_PORT,file.path=$D/q.raw,file.host-key-check.mode=none"
# A reopen (read-only, then read-write) of a node opened from options
# reconnects from those options. (QEMU's ssh driver refuses reopening.)
"$VDISK" io -c 'reopen -r' -c 'reopen -w' -c 'write -P 0x45 4M 4k' \
    "json:$J" >/dev/null
$QEMU_IO -f raw -c 'read -P 0x45 4M 4k' "$U/q.raw$NO" >/dev/null ||
    fail "a write after reopening was lost"

# blockdev-add of the storage daemon: an ssh node exported over NBD,
# written through the export by qemu-io and read back over ssh by QEMU.
"$VDISK" serve --blockdev "{$S,\"node-name\":\"s\"}" \
    --nbd-server "addr.type=unix,addr.path=$PWD/nbd.sock" \
    --export type=nbd,id=e,node-name=s,writable=on &
serve=$!
cleanup_fn gone "$serve"
for i in $(seq 100); do
    [ -S nbd.sock ] && break
    sleep 0.1
done
$QEMU_IO -f raw -c 'write -P 0x44 4M 64k' "nbd+unix:///s?socket=$PWD/nbd.sock" \
    >/dev/null
$QEMU_IMG compare -f raw -F raw "nbd+unix:///s?socket=$PWD/nbd.sock" \
    "$U/q.raw$NO" >/dev/null || fail "the NBD export of the ssh node differs"
$QEMU_IO -f raw -c 'read -P 0x44 4M 64k' "$U/q.raw$NO" >/dev/null ||
    fail "a write through the NBD export did not reach the ssh image"
kill "$serve"
wait "$serve" || true

# A URI without host or path, a missing file. (A file name inside the
# options, file.filename=ssh://..., is opened by vdisk where QEMU 7.2
# ignores it and asks for 'server': docs/remote.md.)
same info "ssh:///x$NO"
same info "ssh://127.0.0.1:$SSH_PORT$NO"
same info "$U/missing.raw$NO"
exit 0
