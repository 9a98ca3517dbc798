#!/usr/bin/env bash
# vpc (VHD) against qemu-img 7.2: creation (fixed/dynamic, force_size, sizes
# on and off the CHS grid, Azure's whole-MiB fixed disks) byte-identical
# with the footer's timestamp, checksum and UUID masked; qemu-io writes read
# identically; vdisk's writes give qemu's bytes; the creator-app size rules;
# refusals of check/measure/resize/amend; a corruption corpus.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
requires qemu-img qemu-io python3 sha256sum
tmpdir

# vhd.py mask A B: equal once the footers' timestamp, checksum and UUID
# are zeroed (they differ between any two creations).
# vhd.py set FILE WHERE OFF FMT VALUE: writes a big-endian field of the
# footer at 0 (foot0), the footer at the end (footend) or the dynamic
# header (hdr) and fixes that structure's checksum; FMT "raw" writes the
# bytes of VALUE as given (ASCII); "nofix" appended keeps the checksum.
cat > vhd.py <<'EOF'
import os, struct, sys
def extents(p):
    # The data extents of a (sparse) file: holes read as zeros anyway.
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
def masked(f, size, start, end):
    f.seek(start)
    b = bytearray(f.read(end - start))
    for base in (0, size - 512):
        for o, n in ((24, 4), (64, 4), (68, 16)):
            for i in range(base + o, base + o + n):
                if start <= i < end:
                    b[i - start] = 0
    return b
def mask_cmp(a, c):
    sa, ea = extents(a)
    sc, ec = extents(c)
    if sa != sc:
        sys.exit('%s and %s differ in size' % (a, c))
    with open(a, 'rb') as fa, open(c, 'rb') as fc:
        for s0, e0 in sorted(ea + ec):
            while s0 < e0:
                e1 = min(e0, s0 + (1 << 24))
                if masked(fa, sa, s0, e1) != masked(fc, sc, s0, e1):
                    sys.exit('%s and %s differ in [%d, %d)' % (a, c, s0, e1))
                s0 = e1
def fix(b, base, size, ck):
    b[base + ck:base + ck + 4] = bytes(4)
    s = (~sum(b[base:base + size])) & 0xffffffff
    b[base + ck:base + ck + 4] = struct.pack('>I', s)
if sys.argv[1] == 'mask':
    mask_cmp(sys.argv[2], sys.argv[3])
    sys.exit(0)
f, where, off, fmt, val = sys.argv[2:7]
b = bytearray(open(f, 'rb').read())
base = {'foot0': 0, 'footend': len(b) - 512}.get(where)
if where == 'hdr':
    base = struct.unpack('>Q', b[16:24])[0]
off = int(off, 0)
data = val.encode().ljust(4, b'\0')[:4] if fmt == 'raw' else \
    struct.pack('>' + fmt, int(val, 0))
b[base + off:base + off + len(data)] = data
if 'nofix' not in sys.argv[7:]:
    if where == 'hdr':
        fix(b, base, 1024, 36)
    else:
        fix(b, base, 512, 64)
open(f, 'wb').write(b)
EOF

same_bytes() { python3 vhd.py mask "$1" "$2" || fail "$1 and $2 differ"; }

# Info of an image through both tools: human and JSON alike.
same_info()
{
    same info "$@"
    same info --output=json "$@"
}

# ---- creation: every option, on and off the CHS grid ----
split_dirs
n=0
for args in "1M" "100M" "1000" "33M" "127G" "130G" "0" "2040G" \
            "-o subformat=fixed 1000" "-o subformat=fixed 33M" \
            "-o subformat=fixed 1G" "-o subformat=fixed,force_size=on 1G" \
            "-o subformat=fixed,force_size=on 1025M" \
            "-o subformat=fixed,force_size=off 1025M" \
            "-o force_size=on 1234567" "-o subformat=dynamic,force_size=on 3G" \
            "-o subformat=fixed,force_size=on 7"; do
    n=$((n + 1))
    # shellcheck disable=SC2086
    same_rw create -f vpc c$n.vhd $args
    same_bytes q/c$n.vhd v/c$n.vhd
done
# Byte-identical files: info of a few shows the reading side agrees too.
for n in 1 3 8 11 12; do
    (cd v && same_info c$n.vhd)
done
# Errors (each also leaves the file as qemu-img does).
for args in "-o subformat=foo e1.vhd 1M" "e2.vhd" "e3.vhd 3T" \
            "-o force_size=on e4.vhd 2041G" "-o force_size=maybe e5.vhd 1M" \
            "-o cluster_size=64k e6.vhd 1M"; do
    # shellcheck disable=SC2086
    same_rw create -f vpc $args
done
for f in e1 e3 e4; do
    cmp q/$f.vhd v/$f.vhd || fail "$f.vhd left differently"
done
same_rw create -f vpc -o help

# Azure takes a fixed VHD whose virtual size is a whole MiB: force_size
# keeps the size as given (qemu-img's own image is the reference).
for sz in 1G 1025M 16G; do
    "$QEMU_IMG" create -q -f vpc -o subformat=fixed,force_size=on q-az.vhd $sz
    "$VDISK_QEMU_IMG" create -q -f vpc -o subformat=fixed,force_size=on \
        v-az.vhd $sz
    same_bytes q-az.vhd v-az.vhd
    [ $(( $(size_of v-az.vhd) - 512 )) = $(( $(numfmt --from=iec $sz) )) ] ||
        fail "Azure size $sz not kept"
    rm -f q-az.vhd v-az.vhd
done

# ---- data: qemu-io writes read by vdisk; vdisk writes give qemu's file ----
writes=(-c "write -P 0xaa 0 64k" -c "write -P 0xbb 3M 1M"
        -c "write -P 0xcc 2095616 4096" -c "write -P 0xdd 31M 1536"
        -c "write -z 8M 1M" -c "write -P 0xee 4M 512")
for sub in dynamic fixed; do
    for fs in off on; do
        o=subformat=$sub,force_size=$fs
        "$QEMU_IMG" create -q -f vpc -o $o q.vhd 33M
        "$VDISK_QEMU_IMG" create -q -f vpc -o $o v.vhd 33M
        "$QEMU_IO" -f vpc "${writes[@]}" q.vhd >/dev/null
        "$VDISK_QEMU_IO" -f vpc "${writes[@]}" v.vhd >/dev/null
        same_bytes q.vhd v.vhd
        assert_same_content -f vpc -F vpc q.vhd v.vhd
        same check -f vpc v.vhd
        "$QEMU_IMG" convert -f vpc -O raw q.vhd q.raw
        "$VDISK_QEMU_IMG" convert -f vpc -O raw q.vhd v.raw
        cmp q.raw v.raw || fail "$o: vdisk reads qemu's image differently"
        same map -f vpc q.vhd
        same map -f vpc --output=json q.vhd
        # Read back with qemu-io through vdisk: the patterns are there.
        "$VDISK_QEMU_IO" -f vpc -c "read -P 0xbb 3M 1M" \
            -c "read -P 0xdd 31M 1536" -c "read -P 0 8M 1M" q.vhd |
            grep -q "^read 1572864/1536\|^read 1536/1536" ||
            fail "$o: qemu-io read-back"
        # convert -O vpc with the same options, from the raw data.
        same_rw_convert() {
            "$QEMU_IMG" convert -f raw -O vpc -o "$1" q.raw qc.vhd
            "$VDISK_QEMU_IMG" convert -f raw -O vpc -o "$1" q.raw vc.vhd
            same_bytes qc.vhd vc.vhd
            assert_same_content -f vpc -F vpc qc.vhd vc.vhd
        }
        same_rw_convert $o
        rm -f q.vhd v.vhd q.raw v.raw qc.vhd vc.vhd
    done
done

# Round trip through raw, and vpc -> qcow2 -> vpc.
"$QEMU_IMG" create -q -f raw src.raw 20M
"$QEMU_IO" -f raw -c "write -P 0x11 1M 3M" -c "write -P 0x22 17M 2M" \
    src.raw >/dev/null
"$VDISK_QEMU_IMG" convert -f raw -O vpc src.raw v.vhd
"$VDISK_QEMU_IMG" convert -f vpc -O qcow2 v.vhd v.qcow2
"$VDISK_QEMU_IMG" convert -f qcow2 -O vpc -o subformat=fixed v.qcow2 vf.vhd
assert_same_content -f raw -F vpc src.raw v.vhd
assert_same_content -f raw -F vpc src.raw vf.vhd

# Commands QEMU's vpc does not have: the same refusals.
"$QEMU_IMG" create -q -f vpc r.vhd 16M
split_dirs
cp r.vhd q/ && cp r.vhd v/
same check r.vhd
same measure -O vpc --size 1G
same measure -O vpc -f vpc r.vhd
same_rw resize -f vpc r.vhd 32M
same_rw amend -f vpc -o subformat=fixed r.vhd
# A fixed VHD probes as raw (its footer is at the end), as in QEMU.
"$QEMU_IMG" create -q -f vpc -o subformat=fixed rf.vhd 16M
same info rf.vhd

# ---- virtual size: the creator application decides CHS or current_size ----
# current_size (40M) and the geometry (33M) disagree.
"$QEMU_IMG" create -q -f vpc b0.vhd 33M
"$QEMU_IMG" create -q -f vpc -o subformat=fixed bf0.vhd 33M
for app in "vpc " "qemu" "qem2" "win " "d2v " "CTXS" "tap" "xxxx"; do
    cp b0.vhd b.vhd
    python3 vhd.py set b.vhd foot0 48 Q 41943040
    python3 vhd.py set b.vhd foot0 28 raw "$app"
    same info --output=json -f vpc b.vhd
done
for app in "vpc " "win "; do
    cp bf0.vhd bf.vhd
    python3 vhd.py set bf.vhd footend 48 Q 41943040
    python3 vhd.py set bf.vhd footend 28 raw "$app"
    same_info -f vpc bf.vhd
    for calc in chs current_size; do
        "$QEMU_IMG" info --output=json --image-opts \
            driver=vpc,force_size_calc=$calc,file.filename=bf.vhd |
            grep '"virtual-size"' > q.out
        "$VDISK_QEMU_IMG" info --output=json --image-opts \
            driver=vpc,force_size_calc=$calc,file.filename=bf.vhd |
            grep '"virtual-size"' > v.out
        diff q.out v.out || fail "force_size_calc=$calc on '$app'"
    done
done
# The largest geometry means current_size, whatever the creator.
cp b0.vhd b.vhd
python3 vhd.py set b.vhd foot0 56 H 65535
python3 vhd.py set b.vhd foot0 58 B 16
python3 vhd.py set b.vhd foot0 59 B 255
same info -f vpc b.vhd
same info --image-opts driver=vpc,force_size_calc=foo,file.filename=b.vhd

# A differencing disk (type 4): QEMU 7.2 reads it as a dynamic disk of its
# own (no parent), and so does vdisk.
"$QEMU_IMG" create -q -f vpc d.vhd 8M
"$QEMU_IO" -f vpc -c "write -P 0x5a 2M 64k" d.vhd >/dev/null
python3 vhd.py set d.vhd foot0 60 I 4
python3 vhd.py set d.vhd footend 60 I 4
same_info d.vhd
"$QEMU_IMG" convert -O raw d.vhd qd.raw
"$VDISK_QEMU_IMG" convert -O raw d.vhd vd.raw
cmp qd.raw vd.raw || fail "differencing disk read differently"

# ---- corruption corpus ----
# Each damaged image: qemu-img and vdisk give the same error (or vdisk's
# stricter one where noted), exit 1, and the file is not changed.
"$QEMU_IMG" create -q -f vpc good.vhd 8M
"$QEMU_IO" -f vpc -c "write -P 0x33 0 4M" good.vhd >/dev/null
"$QEMU_IMG" create -q -f vpc -o subformat=fixed goodf.vhd 8M
bad() {   # bad NAME BASE EDIT-ARGS...: a copy of BASE with one edit
    local name=$1 base=$2
    shift 2
    cp "$base" "$name"
    python3 vhd.py set "$name" "$@"
}
bad ck.vhd good.vhd foot0 64 I 0x12345678 nofix
bad ckf.vhd goodf.vhd footend 64 I 0 nofix
bad magic.vhd good.vhd hdr 0 raw "xxxx"
bad bs0.vhd good.vhd hdr 32 I 0
bad bs3.vhd good.vhd hdr 32 I 1000
bad bshuge.vhd good.vhd hdr 32 I 0x80000000
bad ent0.vhd good.vhd hdr 28 I 0
bad enthuge.vhd good.vhd hdr 28 I 0xffffffff
bad entbig.vhd good.vhd hdr 28 I 0x10000000
bad hdroff.vhd good.vhd foot0 16 Q 0x7fffffffffff0000
bad hdroff2.vhd good.vhd foot0 16 Q 0xfffffffffffffff0
bad cyls.vhd good.vhd foot0 56 H 0xffff
bad type3.vhd goodf.vhd footend 60 I 3
bad batoff.vhd good.vhd hdr 16 Q 0x100000000
bad cursz.vhd goodf.vhd footend 48 Q 0xffffffffffff0000
bad appsz.vhd goodf.vhd footend 28 raw "win "
python3 vhd.py set appsz.vhd footend 48 Q 0x20000000000000
head -c 300 good.vhd > tiny.vhd
head -c 1536 good.vhd > trunc.vhd
cp good.vhd batpast.vhd
python3 - batpast.vhd <<'EOF'
import struct, sys
p = sys.argv[1]
b = bytearray(open(p, 'rb').read())
b[1536:1540] = struct.pack('>I', 0x00ffffff)     # block past EOF
open(p, 'wb').write(b)
EOF
for f in ck ckf magic bs0 bs3 bshuge ent0 enthuge entbig hdroff hdroff2 cyls \
         cursz appsz tiny trunc batpast batoff type3; do
    cp $f.vhd $f.orig
    same info -f vpc $f.vhd
    cmp $f.vhd $f.orig || fail "$f.vhd changed"
done

# vdisk's own, stricter refusals (QEMU opens these and its writes would
# corrupt the metadata): blocks on the BAT or on each other, a fixed
# disk's write that would reach its footer.
cp good.vhd overlap.vhd
python3 - overlap.vhd <<'EOF'
import struct, sys
p = sys.argv[1]
b = bytearray(open(p, 'rb').read())
first = b[1536:1540]
b[1540:1544] = first                  # entry 1 = entry 0
open(p, 'wb').write(b)
EOF
cp good.vhd onbat.vhd
python3 - onbat.vhd <<'EOF'
import struct, sys
p = sys.argv[1]
b = bytearray(open(p, 'rb').read())
b[1540:1544] = struct.pack('>I', 3)   # entry 1 on the BAT (sector 3)
open(p, 'wb').write(b)
EOF
for f in overlap onbat; do
    cp $f.vhd $f.orig
    # Reading works as in QEMU ...
    "$QEMU_IMG" convert -f vpc -O raw $f.vhd q.raw
    "$VDISK_QEMU_IMG" convert -f vpc -O raw $f.vhd v.raw
    cmp q.raw v.raw || fail "$f: read differently"
    # ... writing is refused, naming the fault, and nothing is written.
    expect_status 1 "$VDISK_QEMU_IO" -f vpc -c "write 6M 512" $f.vhd 2> err
    grep -q "$f.vhd: BAT entr" err || fail "$f: $(cat err)"
    cmp $f.vhd $f.orig || fail "$f.vhd changed"
done
cp appsz.vhd appsz2.vhd
python3 vhd.py set appsz2.vhd footend 48 Q 0x1000000   # 16M on an 8M disk
cp appsz2.vhd appsz2.orig
expect_status 1 "$VDISK_QEMU_IO" -f vpc -c "write 15M 512" appsz2.vhd 2> err
grep -q "would overwrite the VHD metadata" err || fail "appsz2: $(cat err)"
cmp appsz2.vhd appsz2.orig
"$VDISK_QEMU_IO" -f vpc -c "write -P 1 0 512" appsz2.vhd >/dev/null
# A footer copy at offset 0 that says "fixed": both tools read the file
# 1:1 from its first byte (footer and header included); vdisk refuses to
# write there, QEMU would overwrite its own metadata.
bad fix0.vhd good.vhd foot0 60 I 2
cp fix0.vhd fix0.orig
same info fix0.vhd
same map --output=json fix0.vhd
"$QEMU_IMG" convert -O raw fix0.vhd q.raw
"$VDISK_QEMU_IMG" convert -O raw fix0.vhd v.raw
cmp q.raw v.raw || fail "fix0: read differently"
expect_status 1 "$VDISK_QEMU_IO" -f vpc -c "write 0 512" fix0.vhd 2> err
grep -q "would overwrite the VHD metadata" err || fail "fix0: $(cat err)"
cmp fix0.vhd fix0.orig
