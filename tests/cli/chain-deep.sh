#!/usr/bin/env bash
# Deep chains and reads through chains: a chain of 1000 overlays opens and
# reads with a 128 KiB stack (the read path resolves layers in a loop, not
# by recursion), aio reads on worker threads work too; sub-cluster reads,
# an overlay longer than its backing (zeros past the backing's end) and
# shorter (the backing is cut); copy-on-read populates the overlay as
# qemu-io -C does (same map).
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io
tmpdir

$QEMU_IMG create -q -f qcow2 l0000.qcow2 4M
$QEMU_IO -c 'write -P 5 0 64k' -c 'write -P 6 3M 1M' l0000.qcow2 >/dev/null
# One overlay made by vdisk; the other 999 are its copies with the
# backing file name patched (names of one width: 1000 vdisk processes
# took a minute under ASan).
$VDISK create -q -u -f qcow2 -b l0000.qcow2 -F qcow2 l0001.qcow2 4M
python3 - <<'PY'
data = open("l0001.qcow2", "rb").read()
assert data.count(b"l0000.qcow2") == 1
for i in range(2, 1001):
    with open("l%04d.qcow2" % i, "wb") as f:
        f.write(data.replace(b"l0000.qcow2", b"l%04d.qcow2" % (i - 1)))
PY
$QEMU_IMG info -U --backing-chain l0003.qcow2 > chain3
grep -q "^backing file: l0001.qcow2" chain3 || fail "patched chain broken"
$QEMU_IO -c 'write -P 7 1000 24' l0500.qcow2 >/dev/null
(
    ulimit -s 128
    $VDISK io -c 'read -P 5 0 1000' -c 'read -P 7 1000 24' \
        -c 'read -P 5 1024 63k' -c 'read -P 0 64k 64k' -c 'read -P 6 3M 1M' \
        -c 'aio_read -P 6 3M 64k' -c 'aio_flush' l1000.qcow2 > out
) || fail "reading a chain of 1000 failed"
grep -q "read 65536/65536 bytes at offset 3145728" out || fail "no aio read"
$VDISK info --backing-chain --output=json l1000.qcow2 > info.json
test "$(grep -c '"filename"' info.json)" = 1001 || fail "chain not listed"
$VDISK map --output=json l1000.qcow2 > vmap
grep -q '"depth": 1000' vmap || fail "map of the chain of 1000: no depth 1000"
# qemu-img's map walks the chain once per extent and layer: at 1000
# layers it took 35 s, so the byte comparison is at 300 (l0500's data
# is above it: this chain's map has its base's extents only).
$VDISK map --output=json l0300.qcow2 > vmap
$QEMU_IMG map --output=json l0300.qcow2 > qmap
diff -u qmap vmap || fail "map of the deep chain differs"

# Sizes: a 2M overlay over a 4M base cuts it; a 6M overlay over it reads
# zeros past the 4M end, at sub-cluster offsets too.
$QEMU_IMG create -q -f qcow2 -b l0000.qcow2 -F qcow2 small.qcow2 2M
$QEMU_IMG create -q -f qcow2 -b small.qcow2 -F qcow2 big.qcow2 6M
$VDISK io -c 'read -P 5 0 64k' -c 'read -P 0 2M 4M' -c 'read -P 0 4095k 2k' \
    big.qcow2 >/dev/null
$VDISK io -c 'read -P 5 0 64k' -c 'read -P 0 64k 1984k' small.qcow2 >/dev/null
$VDISK compare big.qcow2 small.qcow2 >/dev/null ||
    fail "compare across chains of different sizes"
# Writes past the shorter backing's end read back exactly.
$VDISK io -c 'write -P 9 4095k 2k' -c 'read -P 9 4095k 2k' \
    -c 'read -P 0 4097k 1k' big.qcow2 >/dev/null
$QEMU_IO -c 'read -P 9 4095k 2k' -c 'read -P 0 3M 1020k' big.qcow2 >/dev/null

# Copy-on-read against qemu-io -C.
for t in q v; do
    $QEMU_IMG create -q -f qcow2 -b l0000.qcow2 -F qcow2 cor-$t.qcow2
done
reads=(-c 'read 0 64k' -c 'read 100k 1k' -c 'read 2M 4k' -c 'read 3M 8k')
$QEMU_IO -C "${reads[@]}" cor-q.qcow2 >/dev/null
$VDISK io -o copy-on-read=on "${reads[@]}" cor-v.qcow2 >/dev/null
$QEMU_IMG map --output=json cor-q.qcow2 > qmap
$QEMU_IMG map --output=json cor-v.qcow2 > vmap
diff -u qmap vmap || fail "copy-on-read populated differently"
$QEMU_IMG compare cor-v.qcow2 l0000.qcow2 >/dev/null
$QEMU_IMG check -q cor-v.qcow2
# Copy-on-read needs a writable node.
expect_status 1 $VDISK io -r -o copy-on-read=on -c 'read 0 4k' cor-v.qcow2 \
    2> err
grep -q "copy-on-read on read-only" err || fail "message: $(cat err)"
# Concurrent copy-on-read and writes (randrw verifies every read).
$QEMU_IMG create -q -f qcow2 -b l0000.qcow2 -F qcow2 cor2.qcow2
$VDISK io -o copy-on-read=on -c 'randrw -q -s 7 -n 400 -j 4 -b 4k 0 1M' \
    cor2.qcow2 >/dev/null || fail "randrw with copy-on-read"
$QEMU_IMG check -q cor2.qcow2
