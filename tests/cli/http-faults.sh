#!/usr/bin/env bash
# Faults of the http and https drivers against a real nginx, each a clear
# error naming the URL (exit 1), never a hang or a crash: a server that
# ignores ranges, 404, a self-signed certificate with sslverify on, bad
# options, opening read-write (QEMU's words, checked against QEMU's curl
# driver where it words them), a server stopped, one killed mid-read, and
# an image that changes size while open.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
source "$(dirname "$0")/http-server.bash"
requires qemu-img qemu-io timeout
tmpdir
"$VDISK" --help | grep -qw https || { echo "$0: vdisk built without libcurl"; exit 77; }

mkdir www
head -c 5000000 /dev/urandom > www/disk.raw
head -c 8000000 /dev/urandom > www/big.raw
cp www/big.raw www/shrink.raw
cp www/big.raw www/grow.raw
http_server_start "$PWD/www"
H=$HTTP_URL
S=$HTTPS_URL

# Refusals at open: the same words and status as QEMU's.
same info "$H/norange/disk.raw"
same info "$H/missing.raw"
same info "$S/disk.raw"
same info "$H/disk.raw"
$QEMU_IO -f raw -c 'write 0 512' "$H/disk.raw" > q.out 2>&1 || true
"$VDISK_QEMU_IO" -f raw -c 'write 0 512' "$H/disk.raw" > v.out 2>&1 || true
diff -u q.out v.out
grep -q "curl driver does not support writes" v.out
# QEMU 7.2 prints GLib assertions beside these messages (a bug of its
# error path): compare the message line alone.
check_last()
{
    local q=0 v=0
    $QEMU_IMG "$@" 2>&1 | grep '^qemu-img:' | grep -v ': GLib: ' | head -1 > q.out || q=$?
    "$VDISK_QEMU_IMG" "$@" 2>&1 | grep '^qemu-img:' | grep -v ': GLib: ' | head -1 > v.out || v=$?
    diff -u q.out v.out
    [ -s v.out ] || fail "no error from: $*"
}
check_last info --image-opts "driver=http,url=$S/disk.raw"
check_last info --image-opts "driver=http,url=$H/disk.raw,readahead=1000"
check_last info --image-opts "driver=http,url=$H/disk.raw,timeout=10001"
check_last info --object secret,id=c,data=x --image-opts \
    "driver=http,url=$H/disk.raw,cookie=a,cookie-secret=c"
check_last info --image-opts "driver=http,url=$H/disk.raw,password-secret=nosuch"
# sslverify=off accepts the same certificate.
"$VDISK" info --image-opts "driver=https,url=$S/disk.raw,sslverify=off" \
    | grep -q 'virtual size: 4.77 MiB'

# A server that stops answering mid-copy: every read fails within the
# timeout (2 s without a byte), and the copy ends with exit 1. Two
# workers read 1 MiB each, about 3 s at the slow rate: at the stop both
# are mid-transfer (eight would read 256 KiB each, sent at once).
master=$HTTP_PID
workers=$(ps -o pid= --ppid "$master")
slowurl="driver=raw,file.driver=http,file.url=$H/slow/big.raw,file.timeout=2"
(sleep 1; kill -STOP $workers) &
bg=$!
start=$SECONDS
expect_status 1 timeout 30 "$VDISK" convert -m 2 -O raw --image-opts \
    "$slowurl" out.raw 2> err.out
wait "$bg"
kill -CONT $workers
cat err.out
[ $((SECONDS - start)) -lt 25 ] || fail "took $((SECONDS - start)) s"
grep -q "curl: $H/slow/big.raw: Operation too slow" err.out
grep -q "error while reading at byte" err.out

# The image changes size while open: the next request's Content-Range
# says so, and the read fails naming the URL (qemu-io's sleep leaves the
# time to change the file between two reads that miss the cache).
for f in shrink:6000000 grow:13000000; do
    name=${f%%:*}
    (sleep 0.5
     if [ "$name" = shrink ]; then truncate -s 6000000 www/shrink.raw
     else cat www/disk.raw >> www/grow.raw; fi) &
    bg=$!
    "$VDISK_QEMU_IO" -r -f raw -c 'read 0 512' -c 'sleep 1500' \
        -c 'read 4M 512' "$H/$name.raw" > err.out 2>&1 || true
    wait "$bg"
    cat err.out
    grep -q "curl: $H/$name.raw changed size from 8000000 to ${f#*:} bytes" \
        err.out
    grep -q "read failed: Input/output error" err.out
done

# The server killed mid-copy (as above, two workers): errors at once, no
# hang.
(sleep 1; kill -9 $master $workers) &
bg=$!
start=$SECONDS
expect_status 1 timeout 30 "$VDISK" convert -m 2 -O raw --image-opts \
    "$slowurl" out.raw 2> err.out
wait "$bg"
HTTP_PID=
cat err.out
[ $((SECONDS - start)) -lt 10 ] || fail "took $((SECONDS - start)) s"
grep -q "curl: $H/slow/big.raw: " err.out
# And nothing answers at all now: a clear error at open.
expect_status 1 "$VDISK" info "$H/disk.raw" 2> err.out
grep -q "Could not open '$H/disk.raw': CURL: Error opening file: " err.out
echo OK
