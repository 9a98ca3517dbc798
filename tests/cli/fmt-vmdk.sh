#!/usr/bin/env bash
# vmdk against qemu-img 7.2: every subformat and creation option made by
# both tools gives the same files (the descriptor's random CID masked);
# the same qemu-io writes give the same files again; each tool reads the
# other's images alike (convert, map, info, check); streamOptimized (the
# OVA kind) converted both ways; backing files; descriptor files naming
# extents in other directories; refusals of measure/resize/amend; check of
# a damaged image; a corruption corpus of headers and descriptors.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
source "$(dirname "$0")/fmt-functions.bash"
requires qemu-img qemu-io python3
tmpdir

# vmdk.py same DIR1 DIR2: every file of DIR1 equals its namesake in DIR2
# once the descriptors' CID and parentCID values are masked (random in
# both tools); large files (flat extents) are compared with cmp.
cat > vmdk.py <<'EOF'
import os, re, sys
def extents(p):
    # The data extents of a sparse file (holes read as zeros anyway).
    fd, out, off = os.open(p, os.O_RDONLY), [], 0
    size = os.fstat(fd).st_size
    while off < size:
        try:
            d = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:
            break
        h = os.lseek(fd, d, os.SEEK_HOLE)
        out.append((d, h))
        off = h
    os.close(fd)
    return size, out
def same_big(a, b):
    sa, ea = extents(a)
    sb, eb = extents(b)
    if sa != sb:
        return False
    with open(a, 'rb') as fa, open(b, 'rb') as fb:
        for s0, e0 in sorted(ea + eb):
            fa.seek(s0)
            fb.seek(s0)
            if fa.read(e0 - s0) != fb.read(e0 - s0):
                return False
    return True
def masked(p):
    # The descriptor's text up to its NUL (the CID rewrite leaves bytes
    # of the old, longer text after it), the CIDs blanked.
    d = open(p, 'rb').read()
    if d[:4] == b'KDMV':
        d = d[:512] + d[512:512 + 10240].split(b'\0')[0] + d[512 + 10240:]
    else:
        d = d.split(b'\0')[0]
    return re.sub(rb'(parent)?CID=[0-9a-f]+\n',
                  lambda m: (m.group(1) or b'') + b'CID=\n', d)
a, b = sys.argv[2], sys.argv[3]
names = sorted(f for f in os.listdir(a) if f.endswith('.vmdk'))
if names != sorted(f for f in os.listdir(b) if f.endswith('.vmdk')):
    sys.exit('%s and %s hold different files' % (a, b))
for n in names:
    pa, pb = os.path.join(a, n), os.path.join(b, n)
    if os.path.getsize(pa) > (1 << 24):
        if not same_big(pa, pb):
            sys.exit('%s differs' % n)
    elif masked(pa) != masked(pb):
        sys.exit('%s differs' % n)
EOF
same_files() { python3 vmdk.py same q v || fail "q/ and v/ differ"; }
# vdisk reads a large sparse image as qemu-img does (qemu-img compare
# skips the holes that cmp would read).
reads_alike()
{
    "$VDISK_QEMU_IMG" convert -O raw "$1" v.raw
    "$QEMU_IMG" compare -q -f raw v.raw "$1" || fail "$1: read differs"
    rm -f v.raw
}

# ---- creation: every subformat and option ----
opts=("" "-o subformat=monolithicFlat" "-o subformat=twoGbMaxExtentSparse"
      "-o subformat=twoGbMaxExtentFlat" "-o subformat=streamOptimized"
      "-o adapter_type=lsilogic,compat6=on"
      "-o adapter_type=buslogic,hwversion=7,toolsversion=10240"
      "-o zeroed_grain=on,adapter_type=legacyESX")
for o in "${opts[@]}"; do
    split_dirs
    # shellcheck disable=SC2086
    same_rw create -f vmdk $o c.vmdk 2200M
    same_files
    (cd q && same info --output=json c.vmdk && same check c.vmdk)
done
split_dirs
for args in "-o subformat=foo e.vmdk 1M" "-o adapter_type=scsi e.vmdk 1M" \
            "-o compat6=on,hwversion=7 e.vmdk 1M" \
            "-o subformat=monolithicFlat,zeroed_grain=on e.vmdk 1M" \
            "-o backing_fmt=qcow2,backing_file=x e.vmdk 1M"; do
    # shellcheck disable=SC2086
    same_rw create -f vmdk $args
done
same_rw create -f vmdk -o help

# ---- data: the same writes give the same files; reads agree ----
writes=(-c "write -P 0xab 1M 100k" -c "write -P 0xcd 2047M 2M"
        -c "write -P 0x11 2099M 64k" -c "write -z 64k 64k"
        -c "write -z 4M 1M" -c "write -P 0x22 4M 512")
for o in "" "-o subformat=monolithicFlat" "-o subformat=twoGbMaxExtentSparse" \
         "-o subformat=twoGbMaxExtentFlat" "-o zeroed_grain=on"; do
    split_dirs
    # shellcheck disable=SC2086
    same_rw create -q -f vmdk $o d.vmdk 2100M
    (cd q && "$QEMU_IO" -f vmdk "${writes[@]}" d.vmdk >/dev/null)
    (cd v && "$VDISK_QEMU_IO" -f vmdk "${writes[@]}" d.vmdk >/dev/null)
    same_files
    assert_same_content q/d.vmdk v/d.vmdk
    (cd v && same check d.vmdk)
    (cd q && reads_alike d.vmdk && same map --output=json d.vmdk)
done

# ---- streamOptimized (OVA disks): convert both ways ----
"$QEMU_IMG" create -q -f raw s.raw 20M
"$QEMU_IO" -f raw -c "write -P 0x33 5000 7000" -c "write -P 0x44 3M 1M" \
    -c "write -P 0x55 20905984 65536" s.raw >/dev/null
head -c 300000 /dev/urandom | dd of=s.raw bs=1 seek=8000000 conv=notrunc \
    2>/dev/null
truncate -s 20000000 s.raw
split_dirs
"$QEMU_IMG" convert -O vmdk -o subformat=streamOptimized s.raw q/s.vmdk
"$VDISK_QEMU_IMG" convert -O vmdk -o subformat=streamOptimized s.raw v/s.vmdk
same_files
# qemu-img takes vdisk's image as its own.
"$QEMU_IMG" check v/s.vmdk >/dev/null || fail "qemu-img check of v/s.vmdk"
assert_same_content -f raw s.raw v/s.vmdk
"$QEMU_IMG" info --output=json v/s.vmdk | grep -v '"cid"' > vi.json
"$QEMU_IMG" info --output=json q/s.vmdk | grep -v '"cid"' |
    sed 's,q/s.vmdk,v/s.vmdk,' > qi.json
cmp qi.json vi.json || fail "qemu-img info of vdisk's streamOptimized image"
(cd q && read_like_qemu s.vmdk && same info s.vmdk && same check s.vmdk &&
 same map --output=json s.vmdk)
# VMware's own stream layout: the grain directory at the end, found
# through the footer (built from qemu-img's image).
python3 - q/s.vmdk <<'EOF'
import struct, sys
d = bytearray(open(sys.argv[1], 'rb').read())
hdr = bytes(d[:512])
d[56:64] = struct.pack('<Q', 0xffffffffffffffff)
d += bytes(-len(d) % 512)
d += struct.pack('<QII', 1, 0, 3).ljust(512, b'\0') + hdr + bytes(512)
open('vmw.vmdk', 'wb').write(d)
EOF
read_like_qemu vmw.vmdk
same info vmw.vmdk
# A written grain cannot be rewritten; a new one is appended.
cp q/s.vmdk qs.vmdk
split_dirs
cp qs.vmdk q/w.vmdk
cp qs.vmdk v/w.vmdk
(cd q && "$QEMU_IO" -f vmdk -c "write -P 7 10M 64k" w.vmdk >/dev/null)
(cd v && "$VDISK_QEMU_IO" -f vmdk -c "write -P 7 10M 64k" w.vmdk >/dev/null)
same_files
st=0
"$VDISK_QEMU_IO" -f vmdk -c "write -P 1 0 64k" v/w.vmdk > out 2>&1 || st=$?
grep -q "Could not write to allocated cluster for streamOptimized" out ||
    fail "rewrite of a streamOptimized grain: $(cat out)"
# vmdk -> qcow2 -> vmdk round trip through vdisk.
"$VDISK_QEMU_IMG" convert -O qcow2 v/w.vmdk w.qcow2
"$VDISK_QEMU_IMG" convert -O vmdk -o subformat=twoGbMaxExtentSparse w.qcow2 \
    rt.vmdk
assert_same_content v/w.vmdk rt.vmdk
# Damaged deflated grains (a grain is read 16 KiB first, then the rest
# of a longer one): a huge size, a stream that does not inflate, the
# file cut inside an incompressible grain, and zeros over such a grain's
# data fail or read as qemu-io's reads do.
"$QEMU_IMG" create -q -f raw g.raw 4M
"$QEMU_IO" -f raw -c "write -P 0x33 0 64k" g.raw >/dev/null
head -c 200000 /dev/urandom | dd of=g.raw bs=1 seek=1M conv=notrunc \
    2>/dev/null
"$QEMU_IMG" convert -O vmdk -o subformat=streamOptimized g.raw g.vmdk
python3 - g.vmdk <<'EOF'
import struct, sys
d = open(sys.argv[1], 'rb').read()
# The grains of guest sectors 0 (well compressed) and 2048 (random).
grain = {}
for off in range(0, len(d) - 12, 512):
    lba, size = struct.unpack_from('<QI', d, off)
    if lba in (0, 2048) and 0 < size < 70000 and d[off + 12] == 0x78:
        grain.setdefault(lba, off)
small, big = grain[0], grain[2048]
def put(name, data):
    open(name, 'wb').write(bytes(data))
b = bytearray(d); b[small + 8:small + 12] = struct.pack('<I', 0x7fffffff)
put('g-size.vmdk', b)
b = bytearray(d); b[small + 20:small + 40] = b'\xff' * 20
put('g-data.vmdk', b)
put('g-cut.vmdk', d[:big + 5000])
b = bytearray(d); b[big + 112:big + 152] = bytes(40)
put('g-hole.vmdk', b)
EOF
for f in g-size g-data g-cut g-hole; do
    for off in 0 1M; do
        q=ok v=ok
        "$QEMU_IO" -f vmdk -c "read $off 64k" $f.vmdk 2>&1 |
            grep -q 'read failed' && q=failed
        "$VDISK_QEMU_IO" -f vmdk -c "read $off 64k" $f.vmdk 2>&1 |
            grep -q 'read failed' && v=failed
        [ $q = $v ] || fail "$f.vmdk at $off: qemu-io $q, vdisk $v"
    done
done

# ---- backing files (parentFileNameHint, parentCID) ----
rm -f ./*.vmdk
"$QEMU_IMG" create -q -f vmdk base.vmdk 100M
"$QEMU_IO" -f vmdk -c "write -P 7 0 1M" -c "write -P 8 50M 64k" base.vmdk \
    >/dev/null
split_dirs
cp base.vmdk q/ && cp base.vmdk v/
same_rw create -f vmdk -b base.vmdk -F vmdk top.vmdk
same_rw create -f vmdk -o subformat=monolithicFlat -b base.vmdk -F vmdk f.vmdk
(cd q && "$QEMU_IO" -f vmdk -c "write -P 9 512k 4k" -c "write -P 10 60M 1k" \
    top.vmdk >/dev/null)
(cd v && "$VDISK_QEMU_IO" -f vmdk -c "write -P 9 512k 4k" \
    -c "write -P 10 60M 1k" top.vmdk >/dev/null)
same_files
(cd q && same info top.vmdk && same info --output=json top.vmdk &&
 read_like_qemu top.vmdk && same map --output=json top.vmdk)

# ---- descriptor files: extents named relative to the descriptor ----
rm -rf d && mkdir -p d/sub
"$QEMU_IMG" create -q -f vmdk -o subformat=twoGbMaxExtentSparse d/sub/x.vmdk \
    3G
"$QEMU_IO" -f vmdk -c "write -P 3 2047M 2M" d/sub/x.vmdk >/dev/null
head -c 1048576 /dev/urandom > d/flat.bin
cat > d/multi.vmdk <<'EOF'
# Disk DescriptorFile
version=1
CID=12345678
parentCID=ffffffff
createType="twoGbMaxExtentFlat"

# Extent description
RW 2048 FLAT "flat.bin" 0
RW 4194304 SPARSE "sub/x-s001.vmdk"
RW 1024 VMFS "flat.bin"
RW 2048 ZERO
RW 2097152 SPARSE "sub/x-s002.vmdk"
EOF
reads_alike d/multi.vmdk
same info d/multi.vmdk
same info --output=json d/multi.vmdk
same map --output=json d/multi.vmdk
(cd d && reads_alike multi.vmdk && same info multi.vmdk)

# ---- commands QEMU's vmdk driver does not have ----
rm -f ./*.vmdk
"$QEMU_IMG" create -q -f vmdk r.vmdk 16M
split_dirs
cp r.vmdk q/ && cp r.vmdk v/
same measure -O vmdk --size 1G
same measure -O vmdk r.vmdk
same_rw resize r.vmdk 32M
same_rw amend -o zeroed_grain=on r.vmdk
same_rw check -r all r.vmdk

# check: a grain past the end of the file (QEMU's one fault).
"$QEMU_IMG" create -q -f vmdk k.vmdk 10M
"$QEMU_IO" -f vmdk -c "write 0 64k" -c "write 128k 64k" k.vmdk >/dev/null
gt=$(python3 -c "
import struct
d = open('k.vmdk', 'rb').read()
gd = struct.unpack('<Q', d[56:64])[0] * 512
print(struct.unpack('<I', d[gd:gd + 4])[0] * 512)")
poke k.vmdk $((gt + 8)) 4 100000
same check k.vmdk
same check --output=json k.vmdk
read_like_qemu k.vmdk

# ---- corruption corpus ----
"$QEMU_IMG" create -q -f vmdk h.vmdk 10M
"$QEMU_IO" -f vmdk -c "write 0 64k" h.vmdk >/dev/null
# Faults QEMU refuses too: the same words, and writers leave the file.
same_header_faults h.vmdk vmdk "ver 4 4 4" "l2big 44 4 100000" \
    "l1zero 44 4 0" "gran 20 8 0x400000" "gran2 20 8 0x10000000000" \
    "trunc 64 8 0x100000" \
    "gdend 56 8 0xffffffffffffffff"
# Faults vdisk refuses beyond QEMU (which reads zeros or writes there;
# a grain directory of 2^32 entries QEMU truncates to none).
cp h.vmdk cap.img && poke cap.img 12 8 0xffffffffffff
check_refused cap "L1 size too big" info
cp h.vmdk gd.img && poke gd.img 56 8 0x10000
check_refused gd "grain directory at 0x2000000" info
cp h.vmdk rgd.img && poke rgd.img 48 8 0x7ffffff0
check_refused rgd "redundant grain directory" info
python3 - <<'EOF'
import struct
d = bytearray(open('h.vmdk', 'rb').read())
gd = struct.unpack('<Q', d[56:64])[0] * 512
rgd = struct.unpack('<Q', d[48:56])[0] * 512
# A grain table past the end of the file.
e = bytearray(d); e[gd:gd + 4] = struct.pack('<I', 0x7fffffff)
open('gt.img', 'wb').write(e)
# A grain table on top of the grain directory (writers only).
e = bytearray(d); e[gd:gd + 4] = struct.pack('<I', gd // 512)
open('ovl.img', 'wb').write(e)
# A grain pointing into the grain directory (writers only).
gt = struct.unpack('<I', d[gd:gd + 4])[0] * 512
e = bytearray(d); e[gt + 4:gt + 8] = struct.pack('<I', rgd // 512)
open('gmeta.img', 'wb').write(e)
# No redundant copy of a grain table (QEMU writes the copy at 0).
e = bytearray(d); e[rgd:rgd + 4] = bytes(4)
open('norgt.img', 'wb').write(e)
EOF
check_refused gt "grain table 0 of the grain directory" info
for n in ovl gmeta norgt; do
    cp $n.img $n.orig
    st=0
    "$VDISK_QEMU_IO" -f vmdk -c "write 64k 64k" $n.img > out 2>&1 || st=$?
    [ "$st" = 1 ] || { cat out; fail "$n: exit $st"; }
    grep -q "$n.img" out || { cat out; fail "$n: file not named"; }
    cmp $n.img $n.orig || fail "$n: file changed"
done
# Descriptors: absurd sizes, missing files, bad lines, unknown types.
desc() {
    printf '# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n'
    printf 'createType="%s"\n' "$1"
    shift
    printf '%s\n' "$@"
}
truncate -s 1M fl.bin
desc monolithicFlat 'RW 9223372036854775807 FLAT "fl.bin" 0' \
    'RW 9223372036854775807 FLAT "fl.bin" 0' > huge.img
check_refused huge "extents add up" info
desc monolithicFlat 'RW 2048 FLAT "nonexistent.bin" 0' > nofile.img
read_like_qemu nofile.img
desc monolithicFlat 'RW 2048 FLAT "fl.bin"' > badline.img
read_like_qemu badline.img
same info badline.img
desc streamOptimized 'RW 2048 FLAT "fl.bin" 0' > badtype.img
same info badtype.img
desc monolithicFlat 'RW 2048 SPARSE "fl.bin"' > notsparse.img
read_like_qemu notsparse.img
# An offset past any file (QEMU shifts it by 9 bits and overflows).
desc monolithicFlat 'RW 2048 FLAT "fl.bin" 9223372036854775807' > far.img
check_refused far "Invalid extent line" info
desc monolithicFlat 'RW 2048 SPARSE "self.img"' > self.img
read_like_qemu self.img
printf 'version=1\n' > nocreate.img
same info -f vmdk nocreate.img
# A stream footer that is not one.
cp h.vmdk foot.img && poke foot.img 56 8 0xffffffffffffffff
same info foot.img
