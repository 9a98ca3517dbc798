#!/usr/bin/env bash
# qcow (version 1), read only, against qemu-img/qemu-io 7.2 at test time:
# images qemu-img makes (plain, compressed, over raw and qcow2 backing
# files, encrypted) read identically, info and map as qemu-img's; what
# vdisk refuses (writing, creating, reading an AES-encrypted image) is
# refused with a clear error; a corruption corpus fails where qemu-img
# fails and reads what it reads, the file unchanged.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
source "$(dirname "$0")/fmt-functions.bash"
requires qemu-img qemu-io python3 sha256sum
tmpdir

"$QEMU_IMG" create -q -f raw base.raw 8M
"$QEMU_IO" -f raw -c 'write -P 0xaa 0 8M' base.raw > /dev/null
"$QEMU_IMG" create -q -f qcow2 base.qcow2 8M
"$QEMU_IO" -c 'write -P 0xbb 0 8M' base.qcow2 > /dev/null

writes=(-c 'write -P 0x11 0 100k' -c 'write -P 0x22 1M 64k'
        -c 'write -z 3M 128k' -c 'write -P 0x33 5000 3000'
        -c 'write -P 0x44 7M 1k')

"$QEMU_IMG" create -q -f qcow plain.img 8M
"$QEMU_IO" "${writes[@]}" plain.img > /dev/null
"$QEMU_IMG" create -q -f qcow -b base.raw -F raw over-raw.img
"$QEMU_IO" "${writes[@]}" over-raw.img > /dev/null
"$QEMU_IMG" create -q -f qcow -b base.qcow2 -F qcow2 over-qcow2.img
"$QEMU_IO" "${writes[@]}" over-qcow2.img > /dev/null
# qemu-img 7.2 fails (silently) to write more than one cluster
# compressed into a qcow image, so convert -c cannot make one: qemu-io
# writes them a cluster at a time.
"$QEMU_IMG" create -q -f qcow compressed.img 2M
"$QEMU_IO" -c 'write -c -P 0x55 0 4k' -c 'write -c -P 0x66 64k 4k' \
    -c 'write -c -P 0x77 1M 4k' -c 'write -P 0x88 1028k 4k' \
    compressed.img > /dev/null
"$QEMU_IMG" create -q -f qcow odd.img 1000001      # not a sector multiple
"$QEMU_IMG" create -q -f qcow big.img 5T            # a large L1 table

for img in plain.img over-raw.img over-qcow2.img compressed.img odd.img \
           big.img; do
    if [ "$img" = big.img ]; then
        # 5 TiB: read a piece of the far end rather than converting or
        # mapping it (qemu-img maps qcow a cluster at a time)
        "$QEMU_IO" -c 'write -P 0x99 4T 64k' big.img > /dev/null
        "$VDISK" io -r -c 'read -P 0x99 4T 64k' -c 'read -P 0 5000G 4k' \
            big.img > out
        grep -q "^read 65536/65536" out || fail "big.img: $(cat out)"
        same info --output=json "$img"
        continue
    fi
    "$QEMU_IMG" convert -O raw "$img" q.raw
    "$VDISK" convert -O raw "$img" v.raw
    [ "$(sha256sum < q.raw)" = "$(sha256sum < v.raw)" ] ||
        fail "$img reads differently"
    rm -f q.raw v.raw
    same info "$img"
    same info --output=json "$img"
    same map --output=json "$img"
    same check "$img"
done
"$VDISK" io -r -c 'read -P 0x22 1M 64k' plain.img > /dev/null

# ---- refusals ----------------------------------------------------------

# AES: info as qemu-img (no key needed), reading refused by name.
"$QEMU_IMG" create -q -f qcow --object secret,id=s0,data=key \
    -o encryption=on,encrypt.key-secret=s0 aes.img 1M
same info aes.img
same info --output=json aes.img
sum=$(sha256sum < aes.img)
expect_status 1 "$VDISK" convert -O raw aes.img out.raw 2> err
grep -qF "aes.img" err && grep -qi "encrypted" err || fail "aes: $(cat err)"
[ "$(sha256sum < aes.img)" = "$sum" ] || fail "aes.img was modified"

# Writing and creating: vdisk reads qcow only.
sum=$(sha256sum < plain.img)
expect_status 1 "$VDISK" io -c 'write 0 512' plain.img > /dev/null 2> err
grep -qF "plain.img" err && grep -q "read-only" err || fail "io: $(cat err)"
[ "$(sha256sum < plain.img)" = "$sum" ] || fail "plain.img was modified"
expect_status 1 "$VDISK" create -f qcow new.img 1M 2> err
grep -q "does not support image creation" err || fail "create: $(cat err)"

# ---- bad input ---------------------------------------------------------

python3 - <<'EOF'
import struct, zlib
src = open('plain.img', 'rb').read()
l1_off = struct.unpack_from('>Q', src, 40)[0]
l2 = struct.unpack_from('>Q', src, l1_off)[0]
def make(name, fn):
    d = bytearray(src)
    fn(d)
    open('bad-' + name + '.img', 'wb').write(d)
def put(fmt, off, v):
    return lambda d: struct.pack_into(fmt, d, off, v)
make('version2', put('>I', 4, 2))
make('size0', put('>Q', 24, 1))
make('cluster-small', lambda d: d.__setitem__(32, 8))
make('cluster-big', lambda d: d.__setitem__(32, 17))
make('l2-small', lambda d: d.__setitem__(33, 5))
make('l2-big', lambda d: d.__setitem__(33, 14))
make('crypt', put('>I', 36, 7))
make('huge', put('>Q', 24, (1 << 64) - 512))
make('huge-l1', put('>Q', 24, 1 << 62))
make('l1-eof', put('>Q', 40, 1 << 40))
make('l1-wrap', put('>Q', 40, (1 << 64) - 8))
make('backing-long', lambda d: (put('>Q', 8, 48)(d), put('>I', 16, 2000)(d)))
make('l2-eof', put('>Q', l1_off, 1 << 40))
make('data-eof', put('>Q', l2, 1 << 40))
make('data-unaligned', put('>Q', l2, 4097))
make('compressed-junk', put('>Q', l2, (1 << 63) | (100 << 51) | 4096))
make('short', lambda d: d.__delitem__(slice(30, None)))
EOF
for img in bad-*.img; do
    sum=$(sha256sum < "$img")
    read_like_qemu "$img"
    [ "$(sha256sum < "$img")" = "$sum" ] || fail "$img was modified"
done
