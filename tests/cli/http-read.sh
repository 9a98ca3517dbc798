#!/usr/bin/env bash
# The http and https drivers against a real nginx: info, map, compare,
# convert and qemu-io reads of raw and qcow2 images give what QEMU's curl
# driver gives on the same URLs (redirects, basic auth with a secret,
# cookies, read-ahead on small reads, several threads), and an NBD export
# of an http node by vdisk serve.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
source "$(dirname "$0")/http-server.bash"
requires qemu-img qemu-io qemu-storage-daemon timeout
requires_run qemu-img --help
tmpdir
"$VDISK" --help | grep -qw https || { echo "$0: vdisk built without libcurl"; exit 77; }

mkdir www
$QEMU_IMG create -f qcow2 www/disk.qcow2 64M >/dev/null
$QEMU_IO -f qcow2 -c 'write -P 0x5a 1M 3M' -c 'write -P 0x11 20M 64k' \
    -c 'write -z 40M 1M' www/disk.qcow2 >/dev/null
# A raw file whose length is no multiple of 512 (the tail reads as zeros).
head -c 5000000 /dev/urandom > www/disk.raw
http_server_start "$PWD/www"
H=$HTTP_URL
S=$HTTPS_URL

# QEMU's curl driver is here only as a referee: its convert with several
# coroutines hangs with this libcurl (QEMU 7.2 + curl 7.88), so it copies
# with -m 1.
for url in "$H/disk.qcow2" "$H/disk.raw" "$H/redirect/disk.qcow2"; do
    same info "$url"
    same info --output=json "$url"
    same map --output=json "$url"
    same compare "$url" "www/${url##*/}"
    $QEMU_IMG convert -m 1 -O raw "$url" q.raw
    "$VDISK" convert -O raw "$url" v.raw
    cmp q.raw v.raw || fail "convert of $url differs from qemu-img's"
    if [ "${url##*.}" = raw ]; then
        # The file's bytes, then zeros to the 512 boundary.
        cmp -n 5000000 v.raw www/disk.raw
        [ "$(size_of v.raw)" = 5000192 ] || fail "raw size $(size_of v.raw)"
    fi
    "$VDISK" convert -m 8 -W -O qcow2 "$url" v.qcow2
    $QEMU_IMG compare -f raw -F qcow2 q.raw v.qcow2
done

# https with the self-signed certificate: verification off. QEMU names a
# node with a non-default option by its json: options; vdisk by its URL.
sopts="driver=qcow2,file.driver=https,file.url=$S/disk.qcow2,file.sslverify=off"
$QEMU_IMG info --image-opts "$sopts" | grep -v '^image:' > q.out
"$VDISK_QEMU_IMG" info --image-opts "$sopts" | grep -v '^image:' > v.out
diff -u q.out v.out
same map --output=json --image-opts "$sopts"
$QEMU_IMG convert -m 1 -O raw --image-opts "$sopts" q.raw
"$VDISK" convert -O raw --image-opts "$sopts" v.raw
cmp q.raw v.raw

# Small reads through the read-ahead cache, with the referee's pattern
# checks; and from several threads at once (aio_read: one thread each).
reads=(-c 'read -P 0x5a 1M 512' -c 'read -P 0x5a 1049088 4k'
       -c 'read -P 0x5a 1M 3M' -c 'read -P 0x11 20M 64k'
       -c 'read -P 0 40M 1M' -c 'read -v 4194300 8')
$QEMU_IO -r -f qcow2 "${reads[@]}" "$H/disk.qcow2" | grep -v ops/sec > q.out
"$VDISK_QEMU_IO" -r -f qcow2 "${reads[@]}" "$H/disk.qcow2" |
    grep -v ops/sec > v.out
diff -u q.out v.out
for r in 1 2 3; do
    $QEMU_IO -r -f raw -c "read -v $((r * 777777)) 100" "$H/disk.raw" \
        > q.out
    "$VDISK_QEMU_IO" -r -f raw -c "read -v $((r * 777777)) 100" \
        "$H/disk.raw" > v.out
    diff -u <(grep -v ops/sec q.out) <(grep -v ops/sec v.out)
done
"$VDISK_QEMU_IO" -r -f qcow2 -c 'aio_read -P 0x5a 1M 1M' \
    -c 'aio_read -P 0x5a 2M 1M' -c 'aio_read -P 0x5a 3M 1M' \
    -c 'aio_read -P 0x11 20M 64k' -c 'aio_read -P 0 40M 1M' -c aio_flush \
    "$H/disk.qcow2" > v.out
! grep -q -i -E 'fail|error' v.out || fail "aio reads: $(cat v.out)"

# Basic auth (password from a secret) and cookies, plain and secret.
auth="driver=raw,file.driver=http,file.url=$H/auth/disk.raw,file.username=vdisk,file.password-secret=pw"
for tool in "$QEMU_IMG" "$VDISK_QEMU_IMG"; do
    "$tool" convert -m 1 --object secret,id=pw,data=s3cret -O raw \
        --image-opts "$auth" out.raw
    cmp -n 5000000 out.raw www/disk.raw
    rm out.raw
    "$tool" info --image-opts \
        "driver=http,url=$H/cookie/disk.raw,cookie=key=v4lue" >/dev/null
    "$tool" info --object secret,id=ck,data=key=v4lue --image-opts \
        "driver=http,url=$H/cookie/disk.raw,cookie-secret=ck" >/dev/null
done
same info --object secret,id=pw,data=wrong --image-opts "$auth"
same info --image-opts "driver=http,url=$H/cookie/disk.raw"

# blockdev-add of vdisk serve (qemu-storage-daemon's --blockdev): read-only
# is required as in QEMU, and the export serves the image's bytes.
bd="driver=http,node-name=h,url=$H/disk.raw"
timeout 10 qemu-storage-daemon --blockdev "$bd" > q.out 2>&1 || true
timeout 10 "$VDISK_QEMU_STORAGE_DAEMON" --blockdev "$bd" > v.out 2>&1 || true
diff -u q.out v.out
"$VDISK" serve --blockdev "$bd,read-only=on" \
    --nbd-server "addr.type=unix,addr.path=$PWD/nbd.sock" \
    --export type=nbd,id=e,node-name=h,name=x > serve.log 2>&1 &
serve_pid=$!
cleanup_fn kill "$serve_pid"
for i in $(seq 100); do [ -S nbd.sock ] && break; sleep 0.1; done
$QEMU_IMG compare -f raw -F raw "nbd+unix:///x?socket=$PWD/nbd.sock" \
    www/disk.raw
echo OK
