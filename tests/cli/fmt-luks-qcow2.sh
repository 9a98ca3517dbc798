#!/usr/bin/env bash
# qcow2 encryption against qemu-img 7.2: images qemu-img makes with
# encrypt.format=luks (two ciphers) and the legacy encrypt.format=aes,
# written by qemu-io, read identically by vdisk (convert and io), with
# qemu-img's info (human, JSON) and map; wrong and missing secrets and a
# mismatched encrypt.format refused in qemu-img's words; a damaged LUKS
# header inside the qcow2 refused alike; and what vdisk does not do
# (writing and creating the legacy AES) refused with the file unchanged.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
source "$(dirname "$0")/fmt-functions.bash"
requires qemu-img qemu-io python3
tmpdir

# shellcheck disable=SC2054  # the commas are --object's
SEC=(--object secret,id=sec0,data=QcowPass --object secret,id=sec1,data=x)
iopts() { echo "driver=qcow2,encrypt.key-secret=${2:-sec0},file.filename=$1"; }

# qemu-img create, again when QEMU 7.2's PBKDF2 timing fails at random
# ("Unable to get accurate CPU usage").
qcreate()
{
    qemu_img_pbkdf create -q "$@" && return 0
    cat qemu.err
    fail "qemu-img create $*"
}

qcreate -f qcow2 "${SEC[@]}" \
    -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10 \
    luks.qcow2 4M
qcreate -f qcow2 "${SEC[@]}" \
    -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10 \
    -o encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc \
    -o encrypt.ivgen-alg=essiv,encrypt.hash-alg=sha1,cluster_size=4k \
    cbc.qcow2 4M
"$QEMU_IMG" create -q -f qcow2 "${SEC[@]}" \
    -o encrypt.format=aes,encrypt.key-secret=sec0 aes.qcow2 4M
for img in luks.qcow2 cbc.qcow2 aes.qcow2; do
    $QEMU_IO "${SEC[@]}" --image-opts "$(iopts $img)" \
        -c 'write -P 0x5a 0 70k' -c 'write -P 0xa5 2047k 3k' \
        -c 'write -z 3M 64k' > /dev/null
    $QEMU_IMG convert "${SEC[@]}" --image-opts "$(iopts $img)" -O raw q.raw
    $VDISK convert "${SEC[@]}" --image-opts "$(iopts $img)" -O raw v.raw
    cmp q.raw v.raw || fail "$img reads differently"
    $VDISK io "${SEC[@]}" -r --image-opts "$(iopts $img)" \
        -c 'read -P 0xa5 2047k 3k' -c 'read -P 0 3M 64k' > /dev/null ||
        fail "$img: vdisk io reads other data"
    same info "$img"
    same info --output=json "$img"
    same map --output=json "${SEC[@]}" --image-opts "$(iopts $img)"
    # no key, a wrong one, one that does not exist, the wrong format
    same convert -O raw "$img" x.raw
    same convert --object secret,id=sec0,data=wrong \
        --image-opts "$(iopts $img)" -O raw x.raw
    same convert --image-opts "$(iopts $img sec7)" -O raw x.raw
    same convert "${SEC[@]}" \
        --image-opts "$(iopts $img),encrypt.format=$([ $img = aes.qcow2 ] &&
                        echo luks || echo aes)" -O raw x.raw
    rm -f x.raw
done

# vdisk does not write the legacy AES: the write is refused, nothing
# changes (LUKS writes: fmt-luks-qcow2-write.sh).
cp aes.qcow2 orig
expect_status 1 "$VDISK" io "${SEC[@]}" --image-opts "$(iopts aes.qcow2)" \
    -c 'write -P 0x11 0 4k' > /dev/null 2> err
grep -q "does not write qcow2 images with the legacy AES" err ||
    fail "aes.qcow2 write: $(cat err)"
cmp aes.qcow2 orig || fail "aes.qcow2 changed by a refused write"

# Plaintext written by qemu-io is not in the files (the test's premise).
python3 -c 'import sys; d=open(sys.argv[1],"rb").read(); sys.exit(b"\x5a"*64 in d)' \
    luks.qcow2 || fail "plaintext in luks.qcow2"

# Creating the legacy AES is refused, no file left.
expect_status 1 "$VDISK" create -q -f qcow2 "${SEC[@]}" \
    -o encrypt.format=aes,encrypt.key-secret=sec0 new.qcow2 1M 2> err
grep -q "does not create qcow2 images with the legacy AES" err ||
    fail "create: $(cat err)"
[ ! -e new.qcow2 ] || fail "a refused create left new.qcow2"

# A damaged LUKS header inside the qcow2 (slot 0's stripes, big endian at
# 252 of the header, whose offset the CRYPTO extension gives): refused as
# qemu-img refuses it, the file unchanged.
off=$(python3 - <<'EOF'
import struct
d = open("luks.qcow2", "rb").read(65536)
pos = 104 if struct.unpack(">I", d[4:8])[0] == 3 else 72
pos = struct.unpack(">I", d[100:104])[0]
while pos + 8 <= len(d):
    t, n = struct.unpack(">II", d[pos:pos + 8])
    if t == 0x0537be77:
        print(struct.unpack(">Q", d[pos + 8:pos + 16])[0])
        break
    if t == 0:
        break
    pos += 8 + (n + 7) // 8 * 8
EOF
)
[ -n "$off" ] || fail "no CRYPTO extension in luks.qcow2"
cp luks.qcow2 bad.qcow2
python3 -c "
f = open('bad.qcow2', 'r+b'); f.seek($off + 252); f.write((7).to_bytes(4, 'big'))"
cp bad.qcow2 bad.orig
same info bad.qcow2
same convert "${SEC[@]}" --image-opts "$(iopts bad.qcow2)" -O raw x.raw
cmp bad.qcow2 bad.orig || fail "bad.qcow2 changed"
