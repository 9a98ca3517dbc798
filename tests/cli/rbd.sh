#!/usr/bin/env bash
# The rbd driver against a real single-node Ceph cluster (tests/ceph-
# cluster.sh): images written by vdisk read by qemu-img/qemu-io (QEMU's
# rbd driver) and `rbd export`, and the other way round (`rbd import`,
# qemu-io writes); info, map and snapshot listings equal to QEMU's;
# `rbd snap ls` shows vdisk's snapshots, goto rolls back, @snap opens
# read-only; qcow2 on rbd; resize, discard, write zeroes; `vdisk serve`
# exporting an RBD image with fio writing and verifying through NBD; the
# errors (no pool, no image, bad user, bad option, cluster down) as
# QEMU's, never a hang.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io ceph-mon ceph-mgr ceph-osd ceph rbd timeout cmp python3
"$VDISK" --help | grep -qw rbd || { echo "vdisk built without librbd"; exit 77; }
source "$(dirname "$0")/../ceph-cluster.sh"
tmpdir
ceph_cluster_for_test

# Messages without the program's name, to compare vdisk's with QEMU's.
msg() { sed -e 's/^[a-z-]*: //' "$1"; }

# ---- vdisk creates and writes; QEMU and the rbd CLI read ----
"$VDISK" create -f raw rbd:rbd/a 16M > create.out
rbd info rbd/a --format json > a.json
python3 -c 'import json,sys; assert json.load(open(sys.argv[1]))["size"] == 16 << 20' a.json ||
    fail "rbd info does not show the 16 MiB vdisk created"
head -c 3M /dev/urandom > r3
"$VDISK" io -f raw -c 'write -P 0x5a 4M 1M' -c 'write -z 8M 4M' \
    -c 'write -P 0x33 13M 512' rbd:rbd/a > /dev/null
"$VDISK" convert -n -f raw -O raw r3 rbd:rbd/a
"$QEMU_IO" -f raw -c 'read -P 0x5a 4M 1M' -c 'read -P 0 8M 4M' \
    -c 'read -P 0x33 13M 512' rbd:rbd/a > qio.out || fail "qemu-io reads other bytes"
grep -q 'Pattern verification failed' qio.out && fail "qemu-io: pattern mismatch"
rbd export rbd/a exported.raw > /dev/null 2>&1
cmp -n $((3 << 20)) exported.raw r3 || fail "rbd export differs from what vdisk wrote"
"$QEMU_IMG" convert -f raw -O raw rbd:rbd/a q.raw
"$VDISK" convert -f raw -O raw rbd:rbd/a v.raw
cmp exported.raw q.raw || fail "rbd export and qemu-img convert differ"
cmp v.raw q.raw || fail "vdisk convert and qemu-img convert of rbd:rbd/a differ"

# ---- the other way: rbd import and qemu-io write; vdisk reads ----
head -c 5M /dev/urandom > r5
rbd import r5 rbd/b > /dev/null 2>&1
"$VDISK" convert -f raw -O raw rbd:rbd/b b.raw
cmp b.raw r5 || fail "vdisk reads other bytes than rbd import wrote"
"$QEMU_IO" -f raw -c 'write -P 0x77 1M 64k' rbd:rbd/b > /dev/null
"$VDISK" io -f raw -c 'read -P 0x77 1M 64k' rbd:rbd/b > vio.out
grep -q 'Pattern verification failed' vio.out && fail "vdisk io: pattern mismatch"
"$VDISK" compare -f raw -F raw rbd:rbd/b b.raw > /dev/null &&
    fail "compare calls the changed image equal to the old copy"

# ---- info and map as QEMU's (QEMU names the node with a json: filename
# built from its options; vdisk keeps the rbd: filename) ----
"$VDISK" info -f raw rbd:rbd/a | grep -v '^image:' > info.v
"$QEMU_IMG" info -f raw rbd:rbd/a | grep -v '^image:' > info.q
diff -u info.q info.v || fail "info differs from qemu-img info"
"$VDISK" info -f raw --output=json rbd:rbd/a > info.vj
"$QEMU_IMG" info -f raw --output=json rbd:rbd/a > info.qj
json_equal_filtered info.qj info.vj filename || fail "info --output=json differs"
"$VDISK" io -f raw -c 'discard 4M 4M' rbd:rbd/a > /dev/null
"$VDISK" map -f raw --output=json rbd:rbd/a > map.v
"$QEMU_IMG" map -f raw --output=json rbd:rbd/a > map.q
diff -u map.q map.v || fail "map differs from qemu-img map"
grep -q '"zero": true' map.v || fail "map found no hole (fast-diff unused?)"

# ---- the protocol's creation options (with -f rbd, as qemu-img) ----
"$VDISK" create -f rbd -o cluster_size=8M rbd:rbd/o1 4M > co.v
"$QEMU_IMG" create -f rbd -o cluster_size=8M rbd:rbd/o2 4M > co.q
diff -u <(sed 's/o2/o1/' co.q) co.v || fail "create -f rbd prints other than qemu-img"
[ "$(rbd info rbd/o1 --format json | python3 -c 'import json,sys; print(json.load(sys.stdin)["order"])')" = \
  "$(rbd info rbd/o2 --format json | python3 -c 'import json,sys; print(json.load(sys.stdin)["order"])')" ] ||
    fail "cluster_size did not set the object size as QEMU"
# The same with -f raw (the usual way): the rbd protocol's options merge
# with raw's, as qemu-img merges them.
"$VDISK" create -f raw -o cluster_size=8M rbd:rbd/o4 4M > co.v
"$QEMU_IMG" create -f raw -o cluster_size=8M rbd:rbd/o5 4M > co.q
diff -u <(sed 's/o5/o4/' co.q) co.v || fail "create -f raw -o cluster_size"
[ "$(rbd info rbd/o4 --format json | python3 -c 'import json,sys; print(json.load(sys.stdin)["order"])')" = 23 ] ||
    fail "-f raw -o cluster_size=8M did not make 8 MiB objects"
for o in cluster_size=1000 cluster_size=2048; do
    expect_status 1 "$VDISK" create -f rbd -o $o rbd:rbd/o3 4M > /dev/null 2> e.v
    "$QEMU_IMG" create -f rbd -o $o rbd:rbd/o3 4M > /dev/null 2> e.q && fail "qemu-img created with $o"
    [ "$(msg e.v)" = "$(msg e.q)" ] || fail "$o: vdisk says '$(msg e.v)', qemu-img '$(msg e.q)'"
done

# ---- resize ----
"$VDISK" resize -f raw rbd:rbd/a 20M > /dev/null
rbd info rbd/a --format json > a.json
python3 -c 'import json,sys; assert json.load(open(sys.argv[1]))["size"] == 20 << 20' a.json ||
    fail "rbd info does not show the resized size"

# ---- snapshots: RBD snapshots ----
"$QEMU_IMG" convert -f raw -O raw rbd:rbd/b b1.raw
"$VDISK" snapshot -c s1 rbd:rbd/b 2> /dev/null
"$VDISK" snapshot -c s2 rbd:rbd/b 2> /dev/null
rbd snap ls rbd/b --format json > snaps.json
python3 -c 'import json,sys; n=[s["name"] for s in json.load(open(sys.argv[1]))]; assert n == ["s1","s2"], n' snaps.json ||
    fail "rbd snap ls does not show the snapshots vdisk made"
"$VDISK" snapshot -l rbd:rbd/b > snl.v 2> /dev/null
"$QEMU_IMG" snapshot -l rbd:rbd/b > snl.q 2> /dev/null
diff -u snl.q snl.v || fail "snapshot -l differs from qemu-img's"
"$QEMU_IO" -f raw -c 'write -P 0x99 0 1M' rbd:rbd/b > /dev/null
# @snap opens read-only, reads the snapshot, refuses writes as QEMU
"$VDISK" convert -f raw -O raw rbd:rbd/b@s1 s1.v.raw
cmp s1.v.raw b1.raw || fail "rbd:rbd/b@s1 does not read the snapshot"
expect_status 1 "$VDISK" io -f raw -c 'write 0 512' rbd:rbd/b@s1 2> ro.v
"$QEMU_IO" -f raw -c 'write 0 512' rbd:rbd/b@s1 2> ro.q && fail "qemu-io wrote a snapshot"
grep -q 'rbd snapshots are read-only' ro.v || fail "no read-only message: $(cat ro.v)"
# goto = rollback
"$VDISK" snapshot -a s1 rbd:rbd/b 2> /dev/null
"$VDISK" convert -f raw -O raw rbd:rbd/b rolled.raw
cmp rolled.raw b1.raw || fail "snapshot -a did not roll the image back"
# delete, and the errors as qemu-img's
"$VDISK" snapshot -d s2 rbd:rbd/b 2> /dev/null
rbd snap ls rbd/b --format json > snaps.json
python3 -c 'import json,sys; n=[s["name"] for s in json.load(open(sys.argv[1]))]; assert n == ["s1"], n' snaps.json ||
    fail "snapshot -d did not remove the RBD snapshot"
# (QEMU's rbd driver prints "failed to create snap: File exists" on a
# line of its own first: only the last line is compared.)
for args in "-a nosuch" "-d nosuch" "-c s1"; do
    expect_status 1 "$VDISK" snapshot $args rbd:rbd/b 2> e.v
    "$QEMU_IMG" snapshot $args rbd:rbd/b 2> e.q && fail "qemu-img snapshot $args succeeded"
    [ "$(msg e.v | grep -v '^ \|WARNING' | tail -n 1)" = \
      "$(msg e.q | grep -v '^ \|WARNING' | tail -n 1)" ] ||
        fail "snapshot $args: vdisk says '$(msg e.v)', qemu-img '$(msg e.q)'"
done

# ---- qcow2 on rbd ----
"$VDISK" create -f qcow2 rbd:rbd/q 32M > /dev/null
"$VDISK" io -c 'write -P 0x44 1M 2M' -c 'write -z 8M 1M' rbd:rbd/q > /dev/null
"$QEMU_IMG" check rbd:rbd/q > /dev/null || fail "qemu-img check: the qcow2 on rbd is damaged"
"$QEMU_IO" -c 'read -P 0x44 1M 2M' rbd:rbd/q > qq.out
grep -q 'Pattern verification failed' qq.out && fail "qemu-io reads other bytes from the qcow2 on rbd"
"$VDISK" map --output=json rbd:rbd/q > qmap.v
"$QEMU_IMG" map --output=json rbd:rbd/q > qmap.q
diff -u qmap.q qmap.v || fail "map of the qcow2 on rbd differs"
"$QEMU_IMG" create -q -f qcow2 rbd:rbd/q2 16M
"$QEMU_IO" -c 'write -P 0x21 0 1M' rbd:rbd/q2 > /dev/null
"$VDISK" check rbd:rbd/q2 > /dev/null || fail "vdisk check of qemu's qcow2 on rbd"
"$VDISK" io -c 'read -P 0x21 0 1M' rbd:rbd/q2 > vq.out
grep -q 'Pattern verification failed' vq.out && fail "vdisk reads other bytes from qemu's qcow2 on rbd"

# ---- blockdev options ----
"$VDISK" info --image-opts driver=raw,file.driver=rbd,file.pool=rbd,file.image=a,file.user=admin > io.v
grep -q 'virtual size: 20 MiB' io.v || fail "--image-opts with the rbd options"
expect_status 1 "$VDISK" info --image-opts driver=rbd,pool=rbd,image=a,encrypt.format=luks 2> enc.v
grep -q 'encryption' enc.v || fail "encryption not refused clearly: $(cat enc.v)"

# ---- namespaces, escaped names, cephx keys by secret object ----
rbd namespace create rbd/ns1
"$VDISK" create -f raw rbd:rbd/ns1/img 4M > /dev/null
[ "$(rbd ls rbd/ns1)" = img ] || fail "the image is not in namespace ns1"
"$QEMU_IMG" info -f raw rbd:rbd/ns1/img | grep -q 'virtual size: 4 MiB' ||
    fail "qemu-img does not find vdisk's image in namespace ns1"
rbd create -s 1M 'rbd/c:d'
"$VDISK" info -f raw 'rbd:rbd/c\:d' | grep -q 'virtual size: 1 MiB' ||
    fail "the escaped image name 'c\:d' was not found"
key=$(ceph auth get-key client.admin)
"$VDISK" info --object "secret,id=k,data=$key,format=base64" \
    --image-opts "driver=raw,file.driver=rbd,file.pool=rbd,file.image=a,file.user=admin,file.key-secret=k,file.auth-client-required.0=cephx,file.conf=$CEPH_CONF" \
    | grep -q 'virtual size: 20 MiB' || fail "open with key-secret failed"
bad=AQBAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==
for o in "key-secret=k" "auth-client-required.0=none"; do
    expect_status 1 timeout 60 "$VDISK" info --object "secret,id=k,data=$bad,format=base64" \
        --image-opts "driver=rbd,pool=rbd,image=a,$o" 2> e.v
    "$QEMU_IMG" info --object "secret,id=k,data=$bad,format=base64" \
        --image-opts "driver=rbd,pool=rbd,image=a,$o" 2> e.q && fail "qemu-img opened with $o"
    [ "$(msg e.v)" = "$(msg e.q)" ] || fail "$o: vdisk says '$(msg e.v)', qemu-img '$(msg e.q)'"
done

# ---- the image deleted while open: the client is fenced (blocklisted,
# as Ceph does before removing an image that is in use) and the image
# removed; the open vdisk io fails its next requests clearly ----
rbd create -s 8M rbd/del
mkfifo cmds
timeout 60 "$VDISK" io -f raw rbd:rbd/del < cmds > del.out 2>&1 &
iopid=$!
exec 7> cmds
echo "write -P 1 0 1M" >&7
for i in $(seq 100); do
    addr=$(rbd status rbd/del --format json | python3 -c 'import json,sys; w=json.load(sys.stdin)["watchers"]; print(w[0]["address"] if w else "")')
    [ -n "$addr" ] && break
    sleep 0.1
done
[ -n "$addr" ] || fail "vdisk io does not watch rbd/del"
ceph osd blocklist add "$addr" > /dev/null 2>&1
rbd rm rbd/del > /dev/null 2>&1 || fail "rbd rm of the fenced image failed"
echo "read -P 1 0 1M" >&7
exec 7>&-
st=0
wait "$iopid" || st=$?
[ "$st" = 1 ] || { cat del.out; fail "vdisk io exited with $st after the image went away"; }
grep -q 'vdisk: rbd:rbd/del: read failed' del.out || { cat del.out; fail "no clear error after the image went away"; }
ceph osd blocklist rm "$addr" > /dev/null 2>&1 || true

# ---- vdisk serve exports the RBD image; fio writes and verifies ----
if command -v fio > /dev/null && fio --enghelp 2>/dev/null | grep -qw nbd; then
    "$VDISK" create -f raw rbd:rbd/s 32M > /dev/null
    "$VDISK" serve -t -f raw -k "$PWD/nbd.sock" rbd:rbd/s 2> serve.err &
    spid=$!
    stop_serve() { kill "$spid" 2> /dev/null || true; }
    cleanup_fn stop_serve
    for i in $(seq 100); do [ -S nbd.sock ] && break; sleep 0.1; done
    timeout 120 fio --name=w --ioengine=nbd --uri="nbd+unix:///?socket=$PWD/nbd.sock" \
        --rw=randwrite --bs=64k --iodepth=8 --size=16M --verify=crc32c \
        --verify_fatal=1 --do_verify=1 > fio.out 2>&1 || { cat fio.out; fail "fio over vdisk serve of rbd:rbd/s failed"; }
    kill "$spid"
    wait "$spid" || true
    # What fio wrote is in the RBD image: the exported bytes equal QEMU's
    "$QEMU_IMG" convert -f raw -O raw rbd:rbd/s s.q.raw
    rbd export rbd/s s.rbd.raw > /dev/null 2>&1
    cmp s.q.raw s.rbd.raw || fail "after fio: qemu-img and rbd export differ"
    cmp -n $((16 << 20)) s.q.raw /dev/zero > /dev/null && fail "fio's writes did not reach the RBD image"
else
    echo "note: fio without an nbd engine: the serve check is skipped"
fi
# The qemu-storage-daemon form: a --blockdev with the monitors as
# "server" and the key as a secret object, no configuration file at all.
mon=$(sed -n 's/^mon host = .*v1:127\.0\.0\.1:\([0-9]*\)\].*/\1/p' "$CEPH_CONF")
[ -n "$mon" ] || fail "no monitor port in $CEPH_CONF"
env -u CEPH_CONF "$VDISK" serve --object "secret,id=k,data=$key,format=base64" \
    --blockdev "{\"driver\": \"rbd\", \"node-name\": \"r\", \"pool\": \"rbd\",
                \"image\": \"b\", \"user\": \"admin\", \"key-secret\": \"k\",
                \"server\": [{\"host\": \"127.0.0.1\", \"port\": \"$mon\"}]}" \
    --nbd-server "addr.type=unix,addr.path=$PWD/qsd.sock" \
    --export type=nbd,id=e,node-name=r,name=b 2> qsd.err &
qpid=$!
stop_qsd() { kill "$qpid" 2> /dev/null || true; }
cleanup_fn stop_qsd
for i in $(seq 100); do [ -S qsd.sock ] && break; sleep 0.1; done
[ -S qsd.sock ] || { cat qsd.err; fail "vdisk serve --blockdev driver=rbd did not start"; }
"$QEMU_IMG" compare -f raw -F raw "nbd+unix:///b?socket=$PWD/qsd.sock" rbd:rbd/b ||
    fail "the --blockdev rbd export differs from the image"
"$QEMU_IMG" map -f raw --output=json "nbd+unix:///b?socket=$PWD/qsd.sock" > nmap.v
"$QEMU_IMG" map -f raw --output=json rbd:rbd/b > nmap.q
diff -u nmap.q nmap.v || fail "the export's block status differs from QEMU's map of the image"
stop_qsd

# ---- errors as QEMU's ----
for f in rbd:nopool/x rbd:rbd/nosuch 'rbd:rbd/a:id=nobody' 'rbd:rbd/a:conf=/nonexistent' \
         rbd:rbd 'rbd:rbd/a:foo' 'rbd:rbd/a:foo=bar'; do
    expect_status 1 timeout 60 "$VDISK" info -f raw "$f" 2> e.v
    "$QEMU_IMG" info -f raw "$f" 2> e.q && fail "qemu-img opened $f"
    [ "$(msg e.v)" = "$(msg e.q)" ] || fail "$f: vdisk says '$(msg e.v)', qemu-img '$(msg e.q)'"
done
expect_status 1 "$VDISK" create -f raw rbd:rbd/a 1M 2> e.v
grep -q 'error rbd create: File exists' e.v || fail "create over an image: $(cat e.v)"

# ---- the OSD dies under an open image: the next request fails within
# rados_osd_op_timeout, naming the image ----
mkfifo cmds2
timeout 60 "$VDISK" io -f raw 'rbd:rbd/a:rados_osd_op_timeout=3' < cmds2 > osd.out 2>&1 &
iopid=$!
exec 7> cmds2
echo "read 0 64k" >&7
for i in $(seq 100); do grep -q 'read 65536/65536' osd.out && break; sleep 0.1; done
grep -q 'read 65536/65536' osd.out || { cat osd.out; fail "vdisk io did not read before the OSD stopped"; }
ceph_cluster_kill "$PWD/ceph/pids/osd.pid"
start=$SECONDS
echo "read 8M 64k" >&7
exec 7>&-
st=0
wait "$iopid" || st=$?
[ "$st" = 1 ] || { cat osd.out; fail "vdisk io exited with $st after the OSD died"; }
[ $((SECONDS - start)) -lt 30 ] || fail "the OSD's death took $((SECONDS - start)) s to report"
grep -q 'vdisk: rbd:rbd/a: read failed: Connection timed out' osd.out || { cat osd.out; fail "no clear error after the OSD died"; }

# ---- the cluster goes away: a clear error within the timeout ----
ceph_cluster_stop "$PWD/ceph"
start=$SECONDS
expect_status 1 timeout 60 "$VDISK" info -f raw 'rbd:rbd/a:client_mount_timeout=3' 2> down.v
[ $((SECONDS - start)) -lt 30 ] || fail "a cluster that is down took $((SECONDS - start)) s to report"
grep -q 'error connecting' down.v || fail "cluster down: $(cat down.v)"
exit 0
