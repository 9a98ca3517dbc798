#!/usr/bin/env bash
# qcow2 with encrypt.format=luks created and written by vdisk, qemu-img
# the referee at test time: the same layout and info as qemu-img's own
# image (the header cluster, tables and file size identical, the LUKS
# fields but the random ones), data written by vdisk io (in place,
# copy-on-write of partial clusters, sub-sector writes, zero writes,
# discards, over a backing file) read identically by qemu-io and
# qemu-img and passing qemu-img check, no plaintext in the file; convert,
# resize, measure and amend of the key slots against qemu-img; wrong and
# missing secrets, compression, preallocation and the legacy AES
# refused with the file unchanged or never created.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
source "$(dirname "$0")/fmt-functions.bash"
requires qemu-img qemu-io python3
tmpdir

# shellcheck disable=SC2054  # the commas are --object's
SEC=(--object secret,id=sec0,data=QcowPass --object secret,id=sec1,data=Other)
E=encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10
iopts() { echo "driver=qcow2,encrypt.key-secret=${2:-sec0},file.filename=$1"; }

qcreate()
{
    qemu_img_pbkdf create -q "$@" && return 0
    cat qemu.err
    fail "qemu-img create $*"
}

# The LUKS header's offset and length (the CRYPTO header extension).
crypto_ext()
{
    python3 - "$1" <<'EOF'
import struct, sys
d = open(sys.argv[1], "rb").read(65536)
pos = struct.unpack(">I", d[100:104])[0] if d[7] == 3 else 72
while pos + 8 <= len(d):
    t, n = struct.unpack(">II", d[pos:pos + 8])
    if t == 0x0537be77:
        print(*struct.unpack(">QQ", d[pos + 8:pos + 24]))
        break
    if t == 0:
        break
    pos += 8 + (n + 7) // 8 * 8
EOF
}

# qemu-img info with the random and measured LUKS fields masked.
masked_info()
{
    "$QEMU_IMG" info "$@" | sed -E 's/(uuid|iters|image): .*/\1: X/;
        s/"(uuid|[a-z-]*iters|filename)": .*/"\1": X/; s/disk size: .*/disk size: X/;
        s/"actual-size": .*/"actual-size": X/'
}

no_plaintext()
{
    python3 -c 'import sys
d = open(sys.argv[1], "rb").read()
sys.exit(any(bytes([p]) * 64 in d for p in (0x5a, 0xa5, 0x3c, 0x77)))' "$1" ||
        fail "plaintext of the test pattern in $1"
}

# -o help lists qemu-img's encrypt.* options.
"$QEMU_IMG" create -f qcow2 -o help > q.help
"$VDISK_QEMU_IMG" create -f qcow2 -o help > v.help
diff -u q.help v.help || fail "create -o help differs"

# Creation: two option sets against qemu-img's own images (qemu-img's
# PBKDF2 timing costs a second or more per image: kept to two), two
# more read by qemu-img only.
OPTS=("" ",encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1,cluster_size=4k"
      ",compat=0.10,cluster_size=16k"
      ",extended_l2=on,encrypt.cipher-alg=twofish-256,encrypt.hash-alg=sha512")
for i in 0 1 2 3; do
    "$VDISK" create -q -f qcow2 "${SEC[@]}" -o "$E${OPTS[$i]}" v$i.qcow2 3M ||
        fail "vdisk create ${OPTS[$i]}"
    same info v$i.qcow2
    same info --output=json v$i.qcow2
    [ $i -lt 2 ] || continue
    qcreate -f qcow2 "${SEC[@]}" -o "$E${OPTS[$i]}" q$i.qcow2 3M
    read -r qoff qlen < <(crypto_ext q$i.qcow2)
    read -r voff vlen < <(crypto_ext v$i.qcow2)
    [ "$qoff $qlen" = "$voff $vlen" ] ||
        fail "v$i: LUKS header at $voff+$vlen, qemu-img's at $qoff+$qlen"
    # everything before the LUKS header is byte for byte qemu-img's
    cmp -n "$qoff" q$i.qcow2 v$i.qcow2 || fail "v$i: metadata differs"
    [ "$(stat -c %s q$i.qcow2)" = "$(stat -c %s v$i.qcow2)" ] ||
        fail "v$i: file size differs"
    diff <(masked_info q$i.qcow2) <(masked_info v$i.qcow2) ||
        fail "v$i: qemu-img info differs"
    diff <(masked_info --output=json q$i.qcow2) \
         <(masked_info --output=json v$i.qcow2) ||
        fail "v$i: qemu-img info JSON differs"
done

# Writes: the same qemu-io commands through vdisk io on vdisk's images
# and through qemu-io on a raw file (and on qemu-img's encrypted images)
# read back the same; vdisk's images pass qemu-img check and hold no
# plaintext.
W=(-c 'write -P 0x5a 0 70k' -c 'write -P 0xa5 2047k 3k'
   -c 'write -P 0x3c 100k 1k' -c 'write -P 0x77 130k 700'
   -c 'write -P 0x77 1000k 1537' -c 'write -z 64k 64k' -c 'write -z 5k 2k'
   -c 'write -P 0x5a 2M 256k' -c 'discard 2M 128k' -c 'write -P 0xa5 0 4k')
$QEMU_IMG create -q -f raw ref.raw 3M
$QEMU_IO -f raw "${W[@]}" ref.raw > /dev/null
for i in 0 1 2 3; do
    if [ $i -lt 2 ]; then
        $QEMU_IO "${SEC[@]}" --image-opts "$(iopts q$i.qcow2)" "${W[@]}" \
            > /dev/null || fail "qemu-io q$i"
        $QEMU_IMG convert "${SEC[@]}" --image-opts "$(iopts q$i.qcow2)" \
            -O raw q.raw
        cmp ref.raw q.raw || fail "q$i reads differently in qemu-img"
    fi
    "$VDISK" io "${SEC[@]}" --image-opts "$(iopts v$i.qcow2)" "${W[@]}" \
        > /dev/null || fail "vdisk io v$i"
    $QEMU_IMG convert "${SEC[@]}" --image-opts "$(iopts v$i.qcow2)" -O raw v.raw
    cmp ref.raw v.raw || fail "v$i reads differently in qemu-img"
    "$VDISK" convert "${SEC[@]}" --image-opts "$(iopts v$i.qcow2)" -O raw x.raw
    cmp ref.raw x.raw || fail "v$i reads differently in vdisk"
    $QEMU_IMG check "${SEC[@]}" --image-opts "$(iopts v$i.qcow2)" > /dev/null ||
        fail "qemu-img check v$i"
    same check "${SEC[@]}" --image-opts "$(iopts v$i.qcow2)"
    same map --output=json "${SEC[@]}" --image-opts "$(iopts v$i.qcow2)"
    no_plaintext v$i.qcow2
done
same check "${SEC[@]}" --image-opts "$(iopts q1.qcow2)"

# Overwriting every cluster in place and again through copy-on-write of
# a snapshot's shared clusters (new host offsets: the untouched parts are
# re-encrypted there).
"$VDISK" snapshot -c s1 "${SEC[@]}" --image-opts "$(iopts v1.qcow2)" ||
    fail "snapshot"
$QEMU_IO "${SEC[@]}" --image-opts "$(iopts q1.qcow2)" \
    -c 'write -P 0x3c 3000 2000' -c 'write -P 0x5a 1M 5k' > /dev/null
"$VDISK" io "${SEC[@]}" --image-opts "$(iopts v1.qcow2)" \
    -c 'write -P 0x3c 3000 2000' -c 'write -P 0x5a 1M 5k' > /dev/null
$QEMU_IMG convert "${SEC[@]}" --image-opts "$(iopts q1.qcow2)" -O raw q.raw
$QEMU_IMG convert "${SEC[@]}" --image-opts "$(iopts v1.qcow2)" -O raw v.raw
cmp q.raw v.raw || fail "copy-on-write over a snapshot reads differently"
$QEMU_IMG check "${SEC[@]}" --image-opts "$(iopts v1.qcow2)" > /dev/null ||
    fail "qemu-img check after copy-on-write"

# vdisk writing into qemu-img's image.
$QEMU_IMG convert "${SEC[@]}" --image-opts "$(iopts q1.qcow2)" -O raw ref1.raw
$QEMU_IO -f raw -c 'write -P 0x3c 50k 20k' -c 'write -P 0x77 2100k 1k' \
    ref1.raw > /dev/null
"$VDISK" io "${SEC[@]}" --image-opts "$(iopts q1.qcow2)" \
    -c 'write -P 0x3c 50k 20k' -c 'write -P 0x77 2100k 1k' > /dev/null
$QEMU_IMG convert "${SEC[@]}" --image-opts "$(iopts q1.qcow2)" -O raw q.raw
cmp ref1.raw q.raw || fail "q1 written by vdisk reads differently"
$QEMU_IMG check "${SEC[@]}" --image-opts "$(iopts q1.qcow2)" > /dev/null ||
    fail "qemu-img check q1 after vdisk's writes"

# An encrypted overlay over a plain backing file: partial-cluster writes
# copy the backing file's data into the encrypted cluster.
$QEMU_IMG create -q -f raw base.raw 3M
$QEMU_IO -f raw -c 'write -P 0x11 0 3M' base.raw > /dev/null
cp base.raw bref.raw
"$VDISK" create -q -f qcow2 "${SEC[@]}" -o "$E" -b base.raw -F raw vo.qcow2
same info vo.qcow2
OW=(-c 'write -P 0x5a 10k 3k' -c 'write -z 1M 4k' -c 'write -P 0x77 2M 64k')
$QEMU_IO -f raw "${OW[@]}" bref.raw > /dev/null
"$VDISK" io "${SEC[@]}" --image-opts "$(iopts vo.qcow2)" "${OW[@]}" \
    > /dev/null || fail "overlay write"
$QEMU_IMG convert "${SEC[@]}" --image-opts "$(iopts vo.qcow2)" -O raw vo.raw
cmp bref.raw vo.raw || fail "the overlay reads differently"
$QEMU_IMG check "${SEC[@]}" --image-opts "$(iopts vo.qcow2)" > /dev/null ||
    fail "qemu-img check overlay"

# convert -O qcow2 with encryption, and from an encrypted source.
"$VDISK" convert -O qcow2 "${SEC[@]}" -o "$E" -f raw q.raw c.qcow2 ||
    fail "convert to encrypted qcow2"
$QEMU_IMG convert "${SEC[@]}" --image-opts "$(iopts c.qcow2)" -O raw c.raw
cmp q.raw c.raw || fail "converted image reads differently"
no_plaintext c.qcow2
"$VDISK" convert "${SEC[@]}" --image-opts "$(iopts c.qcow2)" -O qcow2 \
    -o "$E,encrypt.key-secret=sec1" c2.qcow2 || fail "re-encrypting convert"
$QEMU_IMG convert "${SEC[@]}" --image-opts "$(iopts c2.qcow2 sec1)" -O raw c.raw
cmp q.raw c.raw || fail "re-encrypted image reads differently"
same convert -c -O qcow2 "${SEC[@]}" -o "$E" -f raw q.raw cc.qcow2
[ ! -e cc.qcow2 ] || fail "compressed encrypted target created"
cp c.qcow2 c.orig
expect_status 1 "$VDISK" convert -n -c "${SEC[@]}" -f raw q.raw \
    --target-image-opts "$(iopts c.qcow2)" 2> err
grep -q "Compression and encryption not supported" err ||
    fail "convert -n -c: $(cat err)"
expect_status 1 "$VDISK" io "${SEC[@]}" --image-opts "$(iopts c.qcow2)" \
    -c 'write -c -P 0x5a 0 64k' > err 2>&1
grep -q "Compression and encryption not supported" err ||
    fail "compressed write: $(cat err)"
cmp c.qcow2 c.orig || fail "refused compressed writes changed the file"

# measure counts the LUKS header as qemu-img does.
# (qemu-img times PBKDF2 for each: one is enough)
same measure -O qcow2 "${SEC[@]}" -o "$E,cluster_size=4k" -f raw q.raw
for o in encrypt.format=luks encrypt.format=aes; do
    same measure -O qcow2 "${SEC[@]}" -o "$o" --size 100M
done

# Resize: grow reads zeros, shrink keeps the rest, as qemu-img's.
for img in q0 v0; do
    tool=$QEMU_IMG; [ $img = v0 ] && tool=$VDISK
    $tool resize "${SEC[@]}" --image-opts "$(iopts $img.qcow2)" 8M > /dev/null
    $tool resize --shrink "${SEC[@]}" --image-opts "$(iopts $img.qcow2)" \
        2100k > /dev/null
    $QEMU_IMG convert "${SEC[@]}" --image-opts "$(iopts $img.qcow2)" \
        -O raw $img.raw
done
cmp q0.raw v0.raw || fail "resized images read differently"
$QEMU_IMG check "${SEC[@]}" --image-opts "$(iopts v0.qcow2)" > /dev/null ||
    fail "qemu-img check after resize"

# amend: a second key slot, then the first erased; qemu-img opens the
# image with the new secret only.
"$VDISK" amend "${SEC[@]}" --image-opts "$(iopts v0.qcow2)" \
    -o encrypt.state=active,encrypt.new-secret=sec1,encrypt.iter-time=10 ||
    fail "amend add"
"$VDISK" amend "${SEC[@]}" --image-opts "$(iopts v0.qcow2 sec1)" \
    -o encrypt.state=inactive,encrypt.keyslot=0 || fail "amend erase"
$QEMU_IMG convert "${SEC[@]}" --image-opts "$(iopts v0.qcow2 sec1)" -O raw v.raw
cmp q0.raw v.raw || fail "amended image reads differently"
cp v0.qcow2 q0.qcow2
split_dirs
same_rw amend "${SEC[@]}" --image-opts "$(iopts v0.qcow2 sec1)" \
    -o encrypt.state=inactive,encrypt.keyslot=1
same_rw amend "${SEC[@]}" --image-opts "$(iopts v2.qcow2)" \
    -o encrypt.state=active,encrypt.new-secret=sec1,encrypt.keyslot=0
same_rw amend "${SEC[@]}" --image-opts "$(iopts q1.qcow2)" \
    -o encrypt.state=inactive,encrypt.old-secret=sec1
$QEMU_IMG create -q -f qcow2 plain.qcow2 1M
split_dirs
same_rw amend -o encrypt.state=active plain.qcow2

# Regression: a v2 downgrade turned zero clusters into clusters of plain
# zeros, which decrypt to garbage (qemu-img 7.2 does that); vdisk writes
# the encryption of zeros.
"$VDISK" amend "${SEC[@]}" --image-opts "$(iopts v3.qcow2)" -o compat=0.10 \
    2> err && fail "downgrade of an extended L2 image: $(cat err)"
"$VDISK" create -q -f qcow2 "${SEC[@]}" -o "$E" dg.qcow2 1M
$QEMU_IO "${SEC[@]}" --image-opts "$(iopts dg.qcow2)" \
    -c 'write -P 0x5a 0 192k' -c 'write -z 64k 64k' > /dev/null
$QEMU_IMG convert "${SEC[@]}" --image-opts "$(iopts dg.qcow2)" -O raw dg.raw
"$VDISK" amend "${SEC[@]}" --image-opts "$(iopts dg.qcow2)" -o compat=0.10 ||
    fail "downgrade"
$QEMU_IMG convert "${SEC[@]}" --image-opts "$(iopts dg.qcow2)" -O raw x.raw
cmp dg.raw x.raw || fail "downgraded encrypted image reads differently"

# Regression: check counted the LUKS header's clusters as leaked (and
# -r leaks would have freed the key material).
"$VDISK" check -r all "${SEC[@]}" --image-opts "$(iopts dg.qcow2)" \
    > out || fail "check: $(cat out)"
grep -q "No errors were found" out || fail "check: $(cat out)"
$QEMU_IMG convert "${SEC[@]}" --image-opts "$(iopts dg.qcow2)" -O raw x.raw
cmp dg.raw x.raw || fail "check -r changed the data"

# A damaged L2 entry pointing a data cluster into the LUKS header: the
# write is refused (QEMU's overlap checks do not cover the header and it
# would overwrite the key material), the file unchanged.
"$VDISK" create -q -f qcow2 "${SEC[@]}" -o "$E" ov.qcow2 1M
"$VDISK" io "${SEC[@]}" --image-opts "$(iopts ov.qcow2)" \
    -c 'write -P 0x5a 0 64k' > /dev/null
read -r hoff _ < <(crypto_ext ov.qcow2)
python3 - "$hoff" <<'EOF2'
import struct, sys
f = open("ov.qcow2", "r+b")
f.seek(40); l1 = struct.unpack(">Q", f.read(8))[0]
f.seek(l1); l2 = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
f.seek(l2); f.write(struct.pack(">Q", int(sys.argv[1]) | 1 << 63))
EOF2
cp ov.qcow2 ov.orig
expect_status 1 "$VDISK" io "${SEC[@]}" --image-opts "$(iopts ov.qcow2)" \
    -c 'write -P 0x5a 0 4k' > err 2>&1
grep -q "overlap the encryption header" err || fail "overlap: $(cat err)"
cmp ov.qcow2 ov.orig || fail "a refused write into the header changed the file"

# Wrong and missing secrets: qemu-img's messages, the file unchanged.
cp v1.qcow2 v1.orig
same convert --object secret,id=sec0,data=wrong \
    --image-opts "$(iopts v1.qcow2)" -O raw x.raw
same amend -o encrypt.state=active,encrypt.new-secret=sec1 v1.qcow2
same resize v1.qcow2 10M
expect_status 1 "$VDISK" io --object secret,id=sec0,data=wrong \
    --image-opts "$(iopts v1.qcow2)" -c 'write -P 0x5a 0 4k' > /dev/null 2>&1
cmp v1.qcow2 v1.orig || fail "a refused open changed the file"

# Refused at creation, no file left: the legacy AES, a missing secret,
# preallocation (qemu-img's reads garbage), an unknown format.
for o in encrypt.format=aes,encrypt.key-secret=sec0 encryption=on \
         encrypt.format=luks "$E,preallocation=metadata" \
         encrypt.format=foo encrypt.key-secret=sec0 \
         encrypt.format=luks,encryption=on; do
    expect_status 1 "$VDISK" create -q -f qcow2 "${SEC[@]}" -o "$o" n.qcow2 \
        1M 2> err
    [ ! -e n.qcow2 ] || fail "create -o $o left a file"
    case $o in
    *aes*|encryption=on)
        grep -q "does not create qcow2 images with the legacy AES" err ;;
    *preallocation*) grep -q "Preallocation is not supported with" err ;;
    *)  "$QEMU_IMG" create -q -f qcow2 "${SEC[@]}" -o "$o" n.qcow2 1M \
            2>&1 | sed 's/^qemu-img: //' > q.err
        rm -f n.qcow2
        sed 's/^vdisk: //' err | diff q.err - ;;
    esac || fail "create -o $o: $(cat err)"
done
expect_status 1 "$VDISK" resize --preallocation=full "${SEC[@]}" \
    --image-opts "$(iopts v1.qcow2)" 10M 2> err
cmp v1.qcow2 v1.orig || fail "a refused resize changed the file"
