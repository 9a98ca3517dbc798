#!/usr/bin/env bash
# vdisk serve with qemu-storage-daemon's options: nodes from --blockdev
# (key=value and JSON forms), --nbd-server over UNIX and TCP, --export,
# --pidfile; qemu-io writes through the exports, SIGTERM shuts the daemon
# down cleanly (flushed nodes, pid file removed) and bad options fail.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io python3 timeout
tmpdir

$QEMU_IMG create -q -f qcow2 a.qcow2 16M
$QEMU_IMG create -q -f raw b.raw 4M
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

timeout 100 "$VDISK" serve \
    --blockdev "driver=file,node-name=af,filename=$PWD/a.qcow2" \
    --blockdev driver=qcow2,node-name=a,file=af \
    --blockdev "{\"driver\": \"raw\", \"node-name\": \"b\", \"file\": {\"driver\": \"file\", \"filename\": \"$PWD/b.raw\"}}" \
    --nbd-server "addr.type=unix,addr.path=$PWD/nbd.sock" \
    --export type=nbd,id=ea,node-name=a,name=a,writable=on \
    --export type=nbd,id=eb,node-name=b,writable=on \
    --qmp "unix:$PWD/qmp.sock,server=on,wait=off" \
    --pidfile "$PWD/pid" > daemon.log 2>&1 &
daemon=$!
cleanup_fn sh -c "kill $daemon 2>/dev/null; true"
for ((i = 0; i < 100; i++)); do
    [ -S nbd.sock ] && [ -s pid ] && break
    sleep 0.05
done
kill -0 "$(cat pid)" 2>/dev/null || fail "pid file does not name a live process"

U="nbd+unix:///a?socket=$PWD/nbd.sock"
timeout 60 $QEMU_IO -f raw -c 'write -P 0x5a 1M 1M' -c 'read -P 0x5a 1M 1M' "$U" > io.out
grep -qi 'fail\|error' io.out && fail "I/O through export a failed"
timeout 60 $QEMU_IO -f raw -c 'write -P 0x6b 0 64k' \
    "nbd+unix:///b?socket=$PWD/nbd.sock" > io2.out
grep -qi 'fail\|error' io2.out && fail "I/O through export b failed"

kill -TERM "$daemon"
for ((i = 0; i < 100; i++)); do
    kill -0 "$daemon" 2>/dev/null || break
    sleep 0.1
done
kill -0 "$daemon" 2>/dev/null && fail "daemon ignored SIGTERM"
wait "$daemon" || fail "daemon exited with status $?"
[ -e pid ] && fail "pid file left behind"
[ -e nbd.sock ] && fail "NBD socket left behind"
$QEMU_IMG check -q a.qcow2 || fail "image damaged"
$QEMU_IO -f qcow2 -c 'read -P 0x5a 1M 1M' a.qcow2 | grep -q 'verification failed' &&
    fail "data written through NBD lost"
$QEMU_IO -f raw -c 'read -P 0x6b 0 64k' b.raw | grep -q 'verification failed' &&
    fail "raw data lost"

# TCP, and a daemon with only a monitor.
timeout 100 "$VDISK" serve --blockdev driver=null-co,node-name=n,size=1M \
    --nbd-server addr.type=inet,addr.host=127.0.0.1,addr.port=$port \
    --export type=nbd,id=e,node-name=n > tcp.log 2>&1 &
d2=$!
cleanup_fn sh -c "kill $d2 2>/dev/null; true"
for ((i = 0; i < 100; i++)); do
    timeout 10 $QEMU_IMG info -f raw "nbd://127.0.0.1:$port/n" > info.out 2>&1 && break
    sleep 0.05
done
grep -q '1 MiB' info.out || fail "TCP export not served: $(cat info.out)"
kill -TERM "$d2"
wait "$d2" || fail "TCP daemon exited with status $?"

# A qcow2 node with an external data file given as a node name and as
# an object (the header's name points elsewhere, so only the option can
# find it); qemu-io on the image with qemu's own data-file option is the
# reference for what the export must read, and writes through the
# export land in the data file.
$QEMU_IMG create -q -f qcow2 -o data_file=orig.raw d.qcow2 8M
$QEMU_IO -c 'write -P 0x3c 0 1M' -c 'write -P 0x4d 3M 64k' d.qcow2 > /dev/null
mv orig.raw moved.raw
dref="json:{\"driver\":\"qcow2\",\"file\":{\"driver\":\"file\",\"filename\":\"$PWD/d.qcow2\"},\"data-file\":{\"driver\":\"file\",\"filename\":\"$PWD/moved.raw\"}}"
$QEMU_IMG convert -O raw "$dref" expect.raw
for form in ref object; do
    if [ $form = ref ]; then
        nodes=(--blockdev "driver=file,node-name=df,filename=$PWD/moved.raw"
               --blockdev "driver=file,node-name=f,filename=$PWD/d.qcow2"
               --blockdev driver=qcow2,node-name=d,file=f,data-file=df)
    else
        nodes=(--blockdev "{\"driver\": \"qcow2\", \"node-name\": \"d\", \"file\": {\"driver\": \"file\", \"filename\": \"$PWD/d.qcow2\"}, \"data-file\": {\"driver\": \"file\", \"filename\": \"$PWD/moved.raw\"}}")
    fi
    rm -f d.sock
    timeout 100 "$VDISK" serve "${nodes[@]}" \
        --nbd-server "addr.type=unix,addr.path=$PWD/d.sock" \
        --export type=nbd,id=ed,node-name=d,writable=on > d.log 2>&1 &
    d3=$!
    cleanup_fn sh -c "kill $d3 2>/dev/null; true"
    for ((i = 0; i < 100; i++)); do
        [ -S d.sock ] && break
        sleep 0.05
    done
    DU="nbd+unix:///d?socket=$PWD/d.sock"
    timeout 60 $QEMU_IMG compare -f raw -F raw expect.raw "$DU" > cmp.out 2>&1 ||
        fail "data-file as $form: export differs: $(cat cmp.out d.log)"
    timeout 60 $QEMU_IO -f raw -c 'write -P 0x5e 2M 64k' "$DU" > /dev/null
    kill -TERM "$d3"
    wait "$d3" || fail "data-file daemon ($form) exited with status $?"
    $QEMU_IO -f raw -c 'read -P 0x5e 2M 64k' moved.raw |
        grep -q 'verification failed' && fail "data-file as $form: write lost"
    $QEMU_IMG check -q "$dref" || fail "data-file as $form: image damaged"
    $QEMU_IO -f raw -c 'write -P 0 2M 64k' moved.raw > /dev/null
done
expect_fail_dref()
{
    timeout 20 "$VDISK" serve --blockdev "driver=file,node-name=f2,filename=$PWD/d.qcow2" \
        --blockdev driver=qcow2,node-name=d,file=f2,data-file=nosuch > bad.out 2>&1 &&
        fail "unknown data-file node accepted"
    grep -q "Cannot find device='nosuch' nor node-name='nosuch'" bad.out ||
        fail "$(cat bad.out)"
}
expect_fail_dref

# Bad options fail at start-up with a message naming the option.
expect_fail()
{
    timeout 20 "$VDISK" serve "$@" > bad.out 2>&1 && fail "accepted: $*"
    return 0
}
expect_fail --blockdev driver=qcow2,node-name=x
grep -q "Parameter 'file' is missing" bad.out || fail "$(cat bad.out)"
expect_fail --blockdev driver=file,node-name=x,filename=/nonexistent/x
expect_fail --blockdev '{"driver": "file",'
# QEMU looks the node up before its NBD driver looks for the server.
expect_fail --export type=nbd,id=e,node-name=x
grep -q "Cannot find device='' nor node-name='x'" bad.out || fail "$(cat bad.out)"
expect_fail --blockdev driver=null-co,node-name=n --export type=nbd,id=e,node-name=n
grep -q "NBD server not running" bad.out || fail "$(cat bad.out)"
expect_fail --blockdev driver=null-co,node-name=n,read-only=maybe
expect_fail --monitor chardev=nope
expect_fail --qmp tcp:1234
exit 0
