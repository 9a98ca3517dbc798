#!/usr/bin/env bash
# The iscsi driver against a real tgtd target, QEMU's iscsi driver as the
# referee on the same URIs: info, reads and writes both ways (a 512-byte
# and a 4096-byte LUN, unaligned writes through the core's
# read-modify-write), block status from GET LBA STATUS (thin LUN) and
# without it (thick LUN), discard and zero writes, convert both ways,
# qcow2 on a LUN, blockdev options, and the refusals.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/iscsi-target.bash"
requires qemu-img qemu-io timeout python3 cmp
"$VDISK" --help | grep -q "^Supported formats:.* iscsi" ||
    { echo "SKIP: vdisk built without libiscsi" >&2; exit 77; }
tmpdir

T="timeout 60"
iscsi_target_start
truncate -s 64M thin.img
dd if=/dev/urandom of=thick.img bs=1M count=32 status=none
THIN=$(iscsi_target_lun 1 thin thin.img 512 1)
THICK=$(iscsi_target_lun 2 thick thick.img 4096 0)
PORTAL=127.0.0.1:$ISCSI_PORT

# QEMU's iscsi driver must see the LUNs (Debian's qemu-block-extra).
$QEMU_IMG info "$THIN" >/dev/null 2>&1 ||
    { echo "SKIP: qemu-img has no iscsi driver" >&2; exit 77; }

# info: as qemu-img's, except the image line (QEMU prints the options it
# split the URI into as json:{...}; vdisk keeps the URI).
for u in "$THIN" "$THICK"; do
    $T "$VDISK" info "$u" | grep -v '^image:' > v.info
    $T $QEMU_IMG info "$u" | grep -v '^image:' > q.info
    diff -u q.info v.info || fail "info differs on $u"
    $T "$VDISK" info "$u" | grep -qx "image: $u" || fail "image line of $u"
    $T "$VDISK" info --output=json "$u" > v.json
    $T $QEMU_IMG info --output=json "$u" > q.json
    json_equal_filtered q.json v.json filename
done

# QEMU writes, vdisk reads, and the other way round.
$T $QEMU_IO -f raw -c 'write -P 0x55 0 1M' -c 'write -P 0x66 3M 64k' "$THIN" \
    >/dev/null
$T "$VDISK" io -f raw -c 'read -P 0x55 0 1M' -c 'read -P 0x66 3M 64k' \
    -c 'read -P 0 1M 2M' "$THIN" > out
grep -q 'Pattern verification failed' out && fail "vdisk reads QEMU's writes"
$T "$VDISK" io -f raw -c 'write -P 0x77 5M 192k' -c flush "$THIN" >/dev/null
$T $QEMU_IO -f raw -c 'read -P 0x77 5M 192k' "$THIN" > out
grep -q 'Pattern verification failed' out && fail "QEMU reads vdisk's writes"

# 4096-byte blocks: requests of 512 bytes go through read-modify-write
# and leave the rest of the block alone.
cp thick.img thick.before
$T "$VDISK" io -f raw -c 'write -P 0xab 512 1k' -c 'write -P 0xcd 8191 3' \
    "$THICK" >/dev/null
$T $QEMU_IO -f raw -c 'read -P 0xab 512 1k' -c 'read -P 0xcd 8191 3' \
    "$THICK" > out
grep -q 'Pattern verification failed' out && fail "unaligned writes"
cmp -n 512 thick.img thick.before || fail "bytes before the write changed"
cmp -i 1536:1536 -n 6655 thick.img thick.before ||
    fail "bytes between the writes changed"
cmp -i 8194:8194 thick.img thick.before || fail "bytes after the write changed"

# Whole-LUN contents: vdisk's reads equal the backing file (tgtd writes
# through to it on flush).
$T "$VDISK" convert -O raw "$THICK" thick.copy
cmp thick.copy thick.img || fail "vdisk convert of the 4k LUN"

# Block status: the thin LUN answers GET LBA STATUS (zeros where the
# backing file has holes), the thick one is all data; as QEMU's map.
$T "$VDISK" io -f raw -c 'discard 3M 64k' -c 'write -z -u 8M 4M' \
    -c 'write -z 20M 1M' "$THIN" >/dev/null
for u in "$THIN" "$THICK"; do
    $T "$VDISK" map --output=json -f raw "$u" > v.map
    $T $QEMU_IMG map --output=json -f raw "$u" > q.map
    diff -u q.map v.map || fail "map differs on $u"
done
grep -q '"zero": true' v.map && fail "thick LUN reported zeros"
$T "$VDISK" map --output=json -f raw "$THIN" | grep -q '"zero": true' ||
    fail "thin LUN: no zero extent"
$T $QEMU_IO -f raw -c 'read -P 0 3M 64k' -c 'read -P 0 8M 4M' \
    -c 'read -P 0 20M 1M' "$THIN" > out
grep -q 'Pattern verification failed' out && fail "zeroed ranges"

# convert both ways, checked by qemu-img compare.
dd if=/dev/urandom of=src.raw bs=1M count=8 status=none
truncate -s 64M src.raw
# -W -m 8: eight writes at once, over the driver's pool of sessions.
$T "$VDISK" convert -W -m 8 -n -O raw src.raw "$THIN"
$T $QEMU_IMG compare -f raw -F raw src.raw "$THIN"
$T "$VDISK" convert -O qcow2 "$THIN" back.qcow2
$T $QEMU_IMG compare -f qcow2 -F raw back.qcow2 "$THIN"
$T $QEMU_IMG convert -O qcow2 "$THIN" q.qcow2
$T "$VDISK" compare q.qcow2 back.qcow2

# qcow2 on a LUN, created by vdisk, checked and written by QEMU.
$T "$VDISK" create -f qcow2 "$THIN" 32M >/dev/null
$T $QEMU_IMG check -f qcow2 "$THIN"
$T $QEMU_IMG info -f qcow2 "$THIN" | grep -q '^virtual size: 32 MiB' ||
    fail "qcow2 on the LUN"
$T $QEMU_IO -f qcow2 -c 'write -P 0x42 1M 128k' "$THIN" >/dev/null
$T "$VDISK" io -f qcow2 -c 'read -P 0x42 1M 128k' -c 'write -P 0x43 4M 64k' \
    "$THIN" > out
grep -q 'Pattern verification failed' out && fail "qcow2 read on the LUN"
$T $QEMU_IO -f qcow2 -c 'read -P 0x43 4M 64k' "$THIN" > out
grep -q 'Pattern verification failed' out && fail "qcow2 written by vdisk"
$T "$VDISK" check -f qcow2 "$THIN"
# A raw image larger than the LUN is refused, as by QEMU (which, like
# vdisk, lets a qcow2 image's virtual size exceed the LUN: the LUN
# bounds only what is allocated).
expect_status 1 $T "$VDISK" create -f raw "$THIN" 1G 2> v.err
expect_status 1 $T $QEMU_IMG create -f raw "$THIN" 1G 2> q.err
diff -u <(sed 's/^qemu-img: //' q.err) <(sed 's/^vdisk: //' v.err) ||
    fail "create too large"

# blockdev options instead of the URI (QEMU's BlockdevOptionsIscsi).
opts="driver=iscsi,transport=tcp,portal=$PORTAL"
opts+=",target=iqn.2026-12.org.vdisk:thick,lun=1,header-digest=none"
opts+=",initiator-name=iqn.2026-12.org.vdisk:tester,timeout=10"
$T "$VDISK" info --image-opts "$opts" | grep -v '^image:' > v.info
$T $QEMU_IMG info --image-opts "$opts" | grep -v '^image:' > q.info
diff -u q.info v.info || fail "info with --image-opts"
json="json:{\"driver\":\"raw\",\"file\":{\"driver\":\"iscsi\""
json+=",\"portal\":\"$PORTAL\",\"target\":\"iqn.2026-12.org.vdisk:thick\""
json+=",\"lun\":1,\"transport\":\"tcp\"}}"
$T "$VDISK" io -c 'read -P 0xab 512 1k' "$json" > out
grep -q 'Pattern verification failed' out && fail "json: filename"

# A LUN exported over NBD by vdisk serve (a blockdev-add of the iscsi
# driver, qemu-storage-daemon's syntax), read by qemu-img.
"$VDISK" serve \
    --blockdev "driver=iscsi,node-name=lun,${opts#driver=iscsi,}" \
    --nbd-server "addr.type=unix,addr.path=$PWD/nbd.sock" \
    --export type=nbd,id=exp,node-name=lun,name=lun > serve.log 2>&1 &
spid=$!
cleanup_fn kill "$spid"
for i in $(seq 100); do [ -S nbd.sock ] && break; sleep 0.1; done
[ -S nbd.sock ] || { cat serve.log; fail "vdisk serve did not start"; }
$T $QEMU_IMG compare -f raw -F raw "nbd+unix:///lun?socket=$PWD/nbd.sock" \
    thick.img

# CHAP: a target with an account; the password from the URI or from a
# secret object (password-secret), as QEMU takes them.
truncate -s 16M chap.img
CHAP=$(iscsi_target_lun 3 chap chap.img)
iscsi_tgtadm --mode account --op new --user vduser --password vdsecret12
iscsi_tgtadm --mode account --op bind --tid 3 --user vduser
CHAPU="iscsi://vduser%vdsecret12@$PORTAL/iqn.2026-12.org.vdisk:chap/1"
$T "$VDISK" info "$CHAPU" | grep -v '^image:' > v.info
$T $QEMU_IMG info "$CHAPU" | grep -v '^image:' > q.info
diff -u q.info v.info || fail "info with CHAP"
copts="driver=iscsi,transport=tcp,portal=$PORTAL,lun=1"
copts+=",target=iqn.2026-12.org.vdisk:chap,user=vduser,password-secret=pw"
$T "$VDISK" io --object secret,id=pw,data=vdsecret12 \
    -c 'write -P 0x31 0 64k' --image-opts "$copts" >/dev/null
$T $QEMU_IO --object secret,id=pw,data=vdsecret12 \
    -c 'read -P 0x31 0 64k' --image-opts "$copts" > out
grep -q 'Pattern verification failed' out && fail "CHAP write"
expect_status 1 $T "$VDISK" info "$CHAP" 2> err
grep -q "iSCSI: Failed to connect to LUN" err || fail "CHAP target without CHAP"
expect_status 1 $T "$VDISK" info \
    "iscsi://vduser%wrong@$PORTAL/iqn.2026-12.org.vdisk:chap/1" 2> err
grep -q "iSCSI: Failed to connect to LUN" err || fail "wrong CHAP password"
expect_status 1 $T "$VDISK" info --object secret,id=pw,data=x --image-opts \
    "$copts,password=y" 2> err
grep -q "'password' and 'password-secret' options are mutually exclusive" \
    err || fail "password and password-secret"

# Refusals, with QEMU's messages where it has one.
expect_status 1 $T "$VDISK" info "iscsi://$PORTAL/no-lun" 2> err
grep -q "Failed to parse URL : iscsi://$PORTAL/no-lun" err || fail "bad URL"
expect_status 1 $T "$VDISK" info "iscsi://$PORTAL/iqn.2026-12.org.vdisk:nope/1" \
    2> err
grep -q "iSCSI: Failed to connect to LUN" err || fail "unknown target"
expect_status 1 $T "$VDISK" info --image-opts "$opts,header-digest=bogus" 2> err
grep -q "header-digest" err || fail "bad header-digest"
expect_status 1 $T "$VDISK" info --image-opts \
    "driver=iscsi,portal=$PORTAL,target=x,lun=1,transport=tcp,user=u" 2> err
grep -q "CHAP username specified but no password was given" err ||
    fail "user without password"
expect_status 1 $T "$VDISK" info --image-opts "driver=iscsi,portal=$PORTAL" 2> err
grep -q "Need all of transport, portal and target options" err ||
    fail "missing target"
# A LUN cannot grow.
expect_status 1 $T "$VDISK" resize -f raw "$THIN" 128M 2> err
grep -q "Cannot grow iSCSI devices\|Cannot resize iSCSI devices" err ||
    fail "resize"
exit 0
