#!/usr/bin/env bash
# Probing as QEMU 7.2 probes: an image of every format QEMU recognises by
# its first bytes (vmdk in each subformat, vhdx, vpc, qed, qcow, luks,
# bochs, cloop, dmg; qemu-img makes those it can create, the others are
# built from their layouts) is taken by vdisk for the format qemu-img
# names, or for raw where qemu-img says raw (a fixed VHD, a flat extent),
# or refused, naming the file, where qemu-img cannot open it (a sparse
# extent without its descriptor); the raw sector-0 guard and the
# probed-raw warning match qemu-io for every one of them. Once these
# formats were refused by name until their drivers existed; before that,
# `vdisk info disk.vmdk` said "file format: raw" and `convert -O qcow2
# disk.vmdk` exited 0 with the VMDK's header bytes as the guest's disk.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io python3 sha256sum timeout
tmpdir

# The format qemu-img names for @1, or nothing when it cannot open it.
peer_format()
{
    "$QEMU_IMG" info --output=json "$1" 2>/dev/null |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["format"])' \
        2>/dev/null || true
}

# ---- the images --------------------------------------------------------

images=()
add() { images+=("$@"); }
for fmt in vhdx qed qcow; do
    if "$QEMU_IMG" create -q -f "$fmt" "img.$fmt" 1M; then
        add "img.$fmt"
    else
        echo "qemu-img cannot create $fmt here: not tested"
    fi
done
for sub in monolithicSparse monolithicFlat twoGbMaxExtentSparse \
           twoGbMaxExtentFlat streamOptimized; do
    "$QEMU_IMG" create -q -f vmdk -o subformat=$sub "vmdk-$sub.vmdk" 1M
done
add vmdk-*.vmdk          # descriptors and their extent files
# A dynamic VHD carries its footer at offset 0; a fixed one only at the
# end, and QEMU calls that raw: vdisk must agree either way.
"$QEMU_IMG" create -q -f vpc -o subformat=dynamic vpc-dynamic.vpc 1M
"$QEMU_IMG" create -q -f vpc -o subformat=fixed vpc-fixed.vpc 1M
add vpc-dynamic.vpc vpc-fixed.vpc
"$QEMU_IMG" create -q -f luks --object secret,id=sec0,data=probe \
    -o key-secret=sec0,iter-time=10 img.luks 1M
add img.luks

# Formats qemu-img cannot create, built from their layouts as QEMU 7.2's
# drivers read them (block/bochs.c, cloop.c, dmg.c, vmdk.c).
python3 - <<'EOF'
import struct, zlib

size = 1 << 20

# bochs: a growing redolog, v2 header, every extent unallocated
extent = 4096
catalog = size // extent
hdr = (b'Bochs Virtual HD Image'.ljust(32, b'\0') +
       b'Redolog'.ljust(16, b'\0') + b'Growing'.ljust(16, b'\0') +
       struct.pack('<IIIIIIQ', 0x20000, 512, catalog, 512, extent, 0, size))
open('img.bochs', 'wb').write(hdr.ljust(512, b'\0') +
                              b'\xff\xff\xff\xff' * catalog)

# cloop: the V2.0 script header, block size and count, the offsets
magic = (b'#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && '
         b'mount -r -t iso9660 /dev/cloop $1\n')
bs = 65536
n = size // bs
blk = zlib.compress(bytes(bs))
first = 128 + 8 + 8 * (n + 1)
offs = b''.join(struct.pack('>Q', first + i * len(blk)) for i in range(n + 1))
open('img.cloop', 'wb').write(magic.ljust(128, b'\0') +
                              struct.pack('>II', bs, n) + offs + blk * n)

# dmg: recognised by its name only; an empty XML property list and the
# 512-byte "koly" trailer that points at it
plist = b'<?xml version="1.0"?><plist version="1.0"><dict/></plist>\n'
plist = plist.ljust(512, b' ')
koly = bytearray(512)
koly[0:4] = b'koly'
struct.pack_into('>II', koly, 4, 4, 512)
struct.pack_into('>QQ', koly, 0xd8, 0, len(plist))
struct.pack_into('>Q', koly, 0x1ec, size // 512)
open('img.dmg', 'wb').write(plist + bytes(koly))

# vmdk version 3 ("COWD"): header, a descriptor with the CIDs in sector 1,
# a one-entry grain directory in sector 4
hdr = b'COWD' + struct.pack('<IIIIII', 1, 3, size // 512, 8, 4, 1)
desc = b'CID=fffffffe\nparentCID=ffffffff\n'
open('cowd.vmdk', 'wb').write(hdr.ljust(512, b'\0') +
                              desc.ljust(3 * 512, b'\0') + bytes(512))
EOF
add img.bochs img.cloop img.dmg cowd.vmdk

"$QEMU_IMG" create -q -f qcow2 good.qcow2 1M
"$QEMU_IO" -f qcow2 -c 'write -P 0x11 0 64k' good.qcow2 >/dev/null

# ---- vdisk probes what qemu-img probes ------------------------------------

probe() # the format vdisk's info names for @1
{
    "$VDISK" info --output=json "$1" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["format"])'
}
met=()
for img in "${images[@]}"; do
    fmt=$(peer_format "$img")
    if [ -z "$fmt" ]; then
        # qemu cannot open it either (a sparse extent without its
        # descriptor): vdisk must refuse it too, not read it as raw, and
        # name it.
        expect_status 1 "$VDISK" info "$img" 2> err
        grep -qF "'$img'" err || grep -qF "$img:" err ||
            fail "$img: $(cat err)"
        continue
    fi
    sum=$(sha256sum < "$img")
    [ "$(probe "$img")" = "$fmt" ] ||
        fail "$img: qemu-img probes $fmt, vdisk $(probe "$img")"
    [ "$(sha256sum < "$img")" = "$sum" ] || fail "$img was modified"
    met+=("$fmt")
done
# Every format QEMU probes was met, and vdisk lists it.
formats=$("$VDISK" --help | sed -n 's/^Supported formats://p')
[ -n "$formats" ] || fail "no format list in --help"
for fmt in vmdk vhdx vpc qed qcow luks bochs cloop dmg; do
    case " ${met[*]} " in
    *" $fmt "*) ;;
    *) if "$QEMU_IMG" --help | grep -q "^Supported formats:.* $fmt\b"; then
           fail "no $fmt image was probed"
       fi ;;
    esac
    case " $formats " in *" $fmt "*) ;; *) fail "--help lacks $fmt" ;; esac
done

# Names nobody knows keep qemu-img's words.
for args in "info -f nosuchfmt good.qcow2" "create -f nosuchfmt new.img 1M" \
            "convert -O nosuchfmt good.qcow2 new.img"; do
    # shellcheck disable=SC2086
    "$QEMU_IMG" $args > q.out 2>&1 && fail "qemu-img accepted: $args"
    # shellcheck disable=SC2086
    expect_status 1 "$VDISK_QEMU_IMG" $args > v.out 2>&1
    diff -u q.out v.out || fail "unknown format message differs: $args"
done

# ---- the raw guard and the warning, against qemu-io ---------------------

# Writing the first sector of each image into sector 0 of a probed raw
# image: qemu-io refuses what would make it probe as another format.
for img in "${images[@]}" good.qcow2; do
    head -c 512 "$img" > sector0
    head -c 1048576 /dev/zero > q.raw
    cp q.raw v.raw
    qrc=0
    vrc=0
    "$QEMU_IO" -c 'write -s sector0 0 512' q.raw > q.out 2> q.err || qrc=$?
    "$VDISK" io -c 'write -s sector0 0 512' v.raw > v.out 2> v.err || vrc=$?
    [ "$qrc" = "$vrc" ] || fail "guard on $img: qemu-io $qrc, vdisk $vrc"
    # timings vary; the file names differ
    sed -i 's/ops; .*/ops;/; s/q\.raw/IMG/' q.out q.err
    sed -i 's/ops; .*/ops;/; s/v\.raw/IMG/' v.out v.err
    diff -u q.out v.out || fail "guard output differs for $img"
    # vdisk may add its own "vdisk: ..." detail; the warning is qemu's
    grep -v '^vdisk: ' v.err > v.warn || true
    diff -u q.err v.warn || fail "probed-raw warning differs for $img"
    cmp q.raw v.raw || fail "guard on $img: the files differ"
done
