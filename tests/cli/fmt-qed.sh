#!/usr/bin/env bash
# qed against qemu-img/qemu-io 7.2 at test time: images qemu-img makes and
# qemu-io writes read identically; images vdisk creates, converts and
# writes are byte-identical to qemu-img's own and pass its check; info,
# check (and -r all), resize, rebase -u, measure and amend as qemu-img;
# the need-check flag (set by a crash, cleared by a writable open as
# QEMU's); a corruption corpus refused with the file and the fault named,
# the file left unchanged.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
source "$(dirname "$0")/fmt-functions.bash"
requires qemu-img qemu-io python3 sha256sum
tmpdir

qio_writes=(-c 'write -P 0x11 0 100k' -c 'write -P 0x22 1M 64k'
            -c 'write -z 3M 128k' -c 'write -P 0x33 5000 3000'
            -c 'write -P 0x44 7M 1k' -c 'write -z 6M 512')

# Both tools create the same image; the files are byte-identical, and
# qemu-img's info of either reads the same; vdisk's info equals qemu-img's.
check_create()
{
    local opts=$1 size=$2
    rm -f q.qed v.qed
    "$QEMU_IMG" create -q -f qed ${opts:+-o "$opts"} q.qed "$size"
    "$VDISK" create -q -f qed ${opts:+-o "$opts"} v.qed "$size"
    cmp q.qed v.qed || fail "create -o '$opts' $size: files differ"
}

for combo in "" "cluster_size=4k" "cluster_size=4k,table_size=2" \
             "cluster_size=128k,table_size=8" "table_size=16" \
             "table_size=1"; do
    check_create "$combo" 8M
done
check_create "" 1000        # rounded up to a sector, as QEMU does

# info, human and JSON, on images of every option qemu-img can open
"$QEMU_IMG" create -q -f raw base.raw 8M
"$QEMU_IO" -f raw -c 'write -P 0xaa 0 8M' base.raw > /dev/null
"$QEMU_IMG" create -q -f qcow2 base.qcow2 8M
"$QEMU_IO" -c 'write -P 0xbb 0 8M' base.qcow2 > /dev/null
for args in "-o cluster_size=4k,table_size=2 img.qed 8M" \
            "-b base.raw -F raw img.qed" "-b base.qcow2 -F qcow2 img.qed" \
            "-o cluster_size=64k img.qed 64M"; do
    rm -f img.qed vimg.qed
    # shellcheck disable=SC2086
    "$QEMU_IMG" create -q -f qed $args
    mv img.qed q.img
    # shellcheck disable=SC2086
    "$VDISK" create -q -f qed $args
    cmp q.img img.qed || fail "create $args: files differ"
    rm -f q.img
    same info img.qed
    same info --output=json img.qed
    same check img.qed
    same check --output=json img.qed
done

# ---- reading what qemu-io wrote --------------------------------------

for opts in "" "cluster_size=4k,table_size=2" "cluster_size=4k,table_size=4"; do
    rm -f r.qed
    "$QEMU_IMG" create -q -f qed ${opts:+-o "$opts"} r.qed 16M
    "$QEMU_IO" "${qio_writes[@]}" r.qed > /dev/null
    "$QEMU_IMG" convert -O raw r.qed q.raw
    "$VDISK" convert -O raw r.qed v.raw
    [ "$(sha256sum < q.raw)" = "$(sha256sum < v.raw)" ] ||
        fail "read of qemu-io's writes differs (-o '$opts')"
    same map --output=json r.qed
done

# over a backing file of each format
for b in "base.raw raw" "base.qcow2 qcow2"; do
    set -- $b
    rm -f ov.qed
    "$QEMU_IMG" create -q -f qed -o cluster_size=4k -b "$1" -F "$2" ov.qed
    "$QEMU_IO" "${qio_writes[@]}" ov.qed > /dev/null
    "$QEMU_IMG" convert -O raw ov.qed q.raw
    "$VDISK" convert -O raw ov.qed v.raw
    cmp q.raw v.raw || fail "read through a $2 backing file differs"
done

# ---- writing: vdisk io on vdisk's image, qemu-io on qemu-img's --------

for b in "" "base.raw raw" "base.qcow2 qcow2"; do
    rm -f q.qed v.qed
    if [ -n "$b" ]; then
        set -- $b
        "$QEMU_IMG" create -q -f qed -o cluster_size=4k -b "$1" -F "$2" q.qed
        "$VDISK" create -q -f qed -o cluster_size=4k -b "$1" -F "$2" v.qed
    else
        "$QEMU_IMG" create -q -f qed -o cluster_size=4k q.qed 8M
        "$VDISK" create -q -f qed -o cluster_size=4k v.qed 8M
    fi
    "$QEMU_IO" "${qio_writes[@]}" q.qed > /dev/null
    "$VDISK" io "${qio_writes[@]}" v.qed > /dev/null
    "$QEMU_IMG" check v.qed > /dev/null || fail "check of vdisk's writes ($b)"
    "$QEMU_IMG" compare q.qed v.qed > /dev/null || fail "content differs ($b)"
    cmp q.qed v.qed || fail "vdisk's writes laid out unlike QEMU's ($b)"
done

# A partial write into a zero cluster over a backing file: the rest of
# the cluster stays zero (QEMU 7.2 copies the backing file's data there,
# so the zeros the guest wrote turn back into old data; vdisk does not).
rm -f zc.qed
"$VDISK" create -q -f qed -b base.raw -F raw zc.qed
"$VDISK" io -c 'write -z 0 64k' -c 'write -P 1 0 4k' zc.qed > /dev/null
"$QEMU_IO" -r -c 'read -P 1 0 4k' -c 'read -P 0 4k 60k' zc.qed > out
grep -q "Pattern verification failed" out && fail "zero cluster lost: $(cat out)"
"$QEMU_IMG" check zc.qed > /dev/null || fail "zc.qed does not check clean"

# ---- convert -O qed with its options ----------------------------------

"$QEMU_IMG" create -q -f raw src.raw 12M
"$QEMU_IO" -f raw -c 'write -P 0x5a 64k 1M' -c 'write -P 0x6b 9M 4k' \
    src.raw > /dev/null
# Byte for byte at -m 1, where vdisk writes qemu-img's 2 MiB chunks whole
# as qemu-img does at any -m; at the default -m 8 each worker writes 256
# KiB pieces, and QED places a new L2 table after the first write's data:
# another layout of the same data.
for opts in "" "cluster_size=4k" "cluster_size=16k,table_size=2"; do
    rm -f q.qed v.qed v1.qed
    "$QEMU_IMG" convert -O qed ${opts:+-o "$opts"} src.raw q.qed
    "$VDISK" convert -O qed ${opts:+-o "$opts"} src.raw v.qed
    "$VDISK" convert -m 1 -O qed ${opts:+-o "$opts"} src.raw v1.qed
    for f in v.qed v1.qed; do
        "$QEMU_IMG" check $f > /dev/null ||
            fail "check after convert '$opts' ($f)"
        "$QEMU_IMG" compare src.raw $f > /dev/null ||
            fail "convert -O qed '$opts' lost data ($f)"
    done
    cmp q.qed v1.qed || fail "convert -O qed '$opts': files differ"
done

# ---- the need-check flag ---------------------------------------------

# A process that dies after an allocating write leaves the flag set.
"$QEMU_IMG" create -q -f qed d.qed 4M
"$QEMU_IO" -c 'write -P 1 0 64k' -c abort d.qed > /dev/null 2>&1 || true
flag() { od -A n -t u1 -j 16 -N 1 "$1" | tr -d ' '; }
[ "$(flag d.qed)" = 2 ] || fail "qemu-io's abort left no need-check flag"
cp d.qed d2.qed
cp d.qed d3.qed
same info --output=json d.qed
same check d.qed
# a read-only open keeps it, a writable one checks and clears it
"$VDISK" io -r -c 'read -P 1 0 64k' d.qed > /dev/null
[ "$(flag d.qed)" = 2 ] || fail "a read-only open cleared the flag"
"$VDISK" io -c 'read -P 1 0 64k' d.qed > /dev/null
"$QEMU_IO" -c 'read -P 1 0 64k' d2.qed > /dev/null
[ "$(flag d.qed)" = 0 ] || fail "a writable open left the flag"
cmp d.qed d2.qed || fail "vdisk's open-time check differs from QEMU's"
# vdisk sets it before an allocating write, as QEMU (seen from a second
# process while the writer waits at a breakpoint is not possible here:
# the crash path is the abort above); a clean close clears it
"$VDISK" io -c 'write -P 2 1M 4k' d3.qed > /dev/null
[ "$(flag d3.qed)" = 0 ] || fail "a clean close left the flag"
# the open-time check repairs what check -r all repairs
python3 - <<'EOF'
import struct
d = bytearray(open('d3.qed', 'rb').read())
l2 = struct.unpack_from('<Q', d, 65536)[0]
struct.pack_into('<Q', d, l2 + 16 * 8, 0x7000000)   # beyond EOF
d[16] |= 2                                           # need check
open('d3.qed', 'wb').write(d)
EOF
cp d3.qed d4.qed
"$VDISK" io -c 'read 0 4k' d3.qed > /dev/null
"$QEMU_IO" -c 'read 0 4k' d4.qed > /dev/null
cmp d3.qed d4.qed || fail "open-time repair differs from QEMU's"

# ---- check and repair --------------------------------------------------

rm -f e.qed
"$QEMU_IMG" create -q -f qed e.qed 4M
"$QEMU_IO" -c 'write -P 1 0 64k' -c 'write -P 2 1M 64k' e.qed > /dev/null
python3 - <<'EOF'
import struct
src = open('e.qed', 'rb').read()
l2 = struct.unpack_from('<Q', src, 65536)[0]
def make(name, fn):
    d = bytearray(src)
    fn(d)
    open(name, 'wb').write(d)
make('c-l2-eof.img', lambda d: struct.pack_into('<Q', d, l2 + 16 * 8, 0x7000000))
make('c-l1-unaligned.img', lambda d: struct.pack_into('<Q', d, 65536 + 8, 0x12345))
make('c-dup.img', lambda d: struct.pack_into('<Q', d, l2 + 17 * 8,
                                             struct.unpack_from('<Q', d, l2)[0]))
make('c-leak.img', lambda d: d.extend(b'\0' * 65536))
EOF
for img in c-*.img; do
    same check "$img"
    same check --output=json "$img"
done
split_dirs
for img in c-*.img; do
    same_rw check -r all "$img"
    cmp "q/$img" "v/$img" || fail "check -r all $img: files differ"
done

# ---- resize, rebase, measure, amend -----------------------------------

rm -f *.img
"$QEMU_IMG" create -q -f qed rs.img 4M
split_dirs
same_rw resize rs.img 8M
same_rw resize rs.img 1M
same_rw resize -f qed rs.img +1000
same_rw rebase -u -b base.raw -F raw rs.img
same_rw rebase -u -b ../base.qcow2 -F qcow2 rs.img
same_rw rebase -u -b '' rs.img
cmp q/rs.img v/rs.img || fail "resize/rebase: files differ"
same measure -O qed --size 1M
same amend -f qed -o cluster_size=4k rs.img

# ---- bad input ---------------------------------------------------------

rm -f *.img
"$QEMU_IMG" create -q -f qed good.img 4M
"$QEMU_IO" -c 'write -P 1 0 64k' -c 'write -P 2 2M 64k' good.img > /dev/null
python3 - <<'EOF'
import struct
src = open('good.img', 'rb').read()
l2 = struct.unpack_from('<Q', src, 65536)[0]
def make(name, fn):
    d = bytearray(src)
    fn(d)
    open('bad-' + name + '.img', 'wb').write(d)
def put(fmt, off, v):
    return lambda d: struct.pack_into(fmt, d, off, v)
make('cluster-size', put('<I', 4, 3000))
make('cluster-size-huge', put('<I', 4, 1 << 31))
make('table-size', put('<I', 8, 3))
make('table-size-huge', put('<I', 8, 1 << 30))
make('image-size', put('<Q', 48, 1 << 62))
make('image-size-odd', put('<Q', 48, 1000))
make('l1-eof', put('<Q', 40, 1 << 40))
make('l1-in-header', put('<Q', 40, 0))
make('l1-unaligned', put('<Q', 40, 65536 + 512))
make('header-size', put('<I', 12, 0xffffffff))
make('features', put('<Q', 16, 0x100))
make('backing-offset', lambda d: (put('<Q', 16, 1)(d), put('<I', 56, 65530)(d),
                                  put('<I', 60, 100)(d)))
make('backing-huge', lambda d: (put('<Q', 16, 1)(d), put('<I', 12, 4)(d),
                                put('<I', 56, 64)(d), put('<I', 60, 200000)(d)))
make('l2-eof', put('<Q', 65536 + 8 * 0, 1 << 40))
make('l2-is-l1', put('<Q', 65536, 65536))
make('l2-overlap', put('<Q', 65536 + 8, l2 + 65536))
make('data-eof', put('<Q', l2, 0x40000000))
make('data-in-l1', put('<Q', l2, 65536 * 2))
make('short', lambda d: d.__delitem__(slice(100, None)))
EOF
for img in bad-*.img; do
    sum=$(sha256sum < "$img")
    cp "$img" pristine.img
    # reading must fail cleanly or read what qemu reads (some corruptions
    # only touch clusters no read of this size meets)
    read_like_qemu "$img"
    # a write must be refused or land where qemu's would, never on a table
    vrc=0
    "$VDISK" io -c 'write -P 9 0 4k' -c 'write -P 9 2M 4k' "$img" \
        > /dev/null 2> v.err || vrc=$?
    [ "$vrc" -lt 2 ] || fail "$img: io exit $vrc: $(cat v.err)"
    if [ "$vrc" = 0 ]; then
        "$QEMU_IMG" check "$img" > /dev/null 2>&1 ||
            fail "$img: a write vdisk accepted damaged the image"
    else
        grep -qF "$img" v.err || fail "$img: io error names no file: $(cat v.err)"
    fi
    case $img in
    bad-l2-is-l1.img|bad-l2-overlap.img|bad-data-in-l1.img)
        # QEMU would write through these onto its own tables: refused,
        # the file unchanged (the first cluster is the damaged one)
        cp pristine.img "$img"
        expect_status 1 "$VDISK" io -c 'write -P 9 0 4k' "$img" \
            > /dev/null 2> v.err
        grep -qF "$img" v.err || fail "$img: $(cat v.err)"
        [ "$(sha256sum < "$img")" = "$sum" ] || fail "$img was modified" ;;
    esac
done
