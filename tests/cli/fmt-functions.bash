# Helpers of the format tests (tests/cli/fmt-*.sh), sourced after
# ../functions.sh (and cli-functions.bash for same()).
#
#   read_like_qemu IMG   qemu-img and vdisk each convert IMG to raw: both
#                        fail (vdisk with exit 1 and an error that names
#                        IMG, or qemu-img's own words), or both succeed
#                        with the same bytes. Never a crash.
#   poke FILE OFFSET WIDTH VALUE   write the little-endian integer VALUE
#                                  (WIDTH bytes) at OFFSET into FILE
#   same_header_faults BASE FMT "NAME OFFSET WIDTH VALUE"...
#                                  for each case, a copy of BASE with the
#                                  field poked, which qemu-img and vdisk
#                                  must refuse alike (info), and which a
#                                  writer (qemu-io under vdisk) refuses
#                                  with exit 1 and leaves unchanged
#   qemu_img_pbkdf ARGS...        qemu-img ARGS, made again (up to 20
#                                  times) when QEMU 7.2's PBKDF2 timing
#                                  fails at random on a busy machine
#                                  ("Unable to get accurate CPU usage");
#                                  stdout to qemu.out, stderr to qemu.err,
#                                  qemu-img's exit status
#   check_refused NAME PATTERN VDISK-ARGS...
#                                  vdisk ARGS NAME.img must exit 1 with a
#                                  message naming NAME.img and matching
#                                  PATTERN, and leave NAME.img unchanged
#   sesparsegen                   writes sesparse.py into the current
#                                  directory, a python module that builds
#                                  VMware seSparse images (qemu-img reads
#                                  them but cannot create them):
#                                  sesparse(NAME, SECTORS, data={GRAIN:
#                                  BYTES}, zero=[GRAIN], unmapped=[GRAIN],
#                                  slots={GRAIN: INDEX}, layout='vmware'|
#                                  'compact', parent=, parent_cid=)
#                                  writes the descriptor NAME.vmdk and the
#                                  extent NAME-sesparse.vmdk (GRAIN: a
#                                  4 KiB guest grain number; the grain
#                                  tables placed in the reverse order of
#                                  the directory's) and returns the byte
#                                  offsets of its structures ('vh', 'gd',
#                                  'gt': {GD index: offset}, 'grain':
#                                  {GRAIN: offset}) for corruption corpora;
#                                  grain_bytes(N) is 4 KiB of test data

read_like_qemu()
{
    local img=$1 qrc=0 vrc=0
    "$QEMU_IMG" convert -O raw "$img" q.raw 2> q.err || qrc=$?
    "$VDISK" convert -O raw "$img" v.raw 2> v.err || vrc=$?
    [ "$vrc" -lt 2 ] || fail "$img: convert exit $vrc: $(cat v.err)"
    if [ "$qrc" = 0 ]; then
        [ "$vrc" = 0 ] || fail "$img: qemu-img reads it, vdisk: $(cat v.err)"
        cmp q.raw v.raw || fail "$img: read differs from qemu-img's"
    else
        [ "$vrc" = 1 ] || fail "$img: vdisk reads what qemu-img refuses"
        # named, or in qemu-img's own words (convert's block status error)
        sed 's/^qemu-img:/vdisk:/' q.err > q2.err
        grep -qF "$img" v.err || cmp -s q2.err v.err ||
            fail "$img: the error names no file: $(cat v.err)"
    fi
    rm -f q.raw v.raw
}

poke()
{
    python3 - "$@" <<'PYEOF'
import sys
f, off, width, val = sys.argv[1], int(sys.argv[2], 0), int(sys.argv[3]), int(sys.argv[4], 0)
with open(f, "r+b") as fh:
    fh.seek(off)
    fh.write(val.to_bytes(width, "little"))
PYEOF
}

same_header_faults()
{
    local base=$1 fmt=$2 c
    shift 2
    for c in "$@"; do
        # shellcheck disable=SC2086
        set -- $c
        cp "$base" "$1.img"
        poke "$1.img" "$2" "$3" "$4"
        cp "$1.img" "$1.orig"
        same info -f "$fmt" "$1.img"
        expect_status 1 "$VDISK_QEMU_IO" -f "$fmt" -c 'write 0 512' "$1.img"
        cmp "$1.img" "$1.orig" || fail "$1: file changed"
    done
}

check_refused()
{
    local name=$1 pattern=$2 st=0
    shift 2
    cp "$name.img" "$name.orig"
    "$VDISK" "$@" "$name.img" > out 2>&1 || st=$?
    [ "$st" = 1 ] || { cat out; fail "$name: exit status $st"; }
    grep -q "$name.img" out || { cat out; fail "$name: file not named"; }
    grep -q "$pattern" out || { cat out; fail "$name: fault not named"; }
    cmp "$name.img" "$name.orig" || fail "$name: file changed"
}

qemu_img_pbkdf()
{
    local rc
    for _ in $(seq 20); do
        rc=0
        "$QEMU_IMG" "$@" > qemu.out 2> qemu.err || rc=$?
        [ "$rc" != 0 ] && grep -q "Unable to get accurate CPU usage" \
            qemu.err || break
    done
    return "$rc"
}

sesparsegen()
{
    cat > sesparse.py <<'PYEOF'
# seSparse (ESXi 6.5+ snapshot extents) as QEMU 7.2's block/vmdk.c
# reads them: const header (sector 0), volatile header, journal, grain
# directory, grain tables (4096 64-bit entries, 16 MiB of guest data
# each), free bitmap, backmap, grains (4 KiB). 'vmware' places the areas
# where ESXi does (<1:1> volatile header, <2:2> journal header,
# <2048:2048> journal, <4096:2048> directory, <6144:2048> tables,
# <8192:2048> bitmap, <10240:2048> backmap, grains from 12288);
# 'compact' packs them (small fuzz seeds).
import struct

def grain_bytes(n):
    return bytes((n * 31 + i // 7) & 0xff for i in range(4096))

def _areas(layout, n_gd, n_gt):
    gd_sectors = max(1, -(-n_gd * 8 // 512))
    if layout == 'vmware':
        a = dict(vh=(1, 1), jh=(2, 2), j=(2048, 2048),
                 gd=(4096, max(2048, gd_sectors)))
        gts = 4096 + a['gd'][1]
        a['gts'] = (max(6144, gts), max(2048, 64 * n_gt))
        fb = a['gts'][0] + a['gts'][1]
        a['fb'] = (max(8192, fb), 2048)
        a['bm'] = (a['fb'][0] + 2048, 2048)
        a['grains'] = a['bm'][0] + 2048
    else:
        a = dict(vh=(1, 1), jh=(2, 1), j=(3, 1), gd=(4, gd_sectors))
        a['gts'] = (4 + gd_sectors, 64 * max(1, n_gt))
        a['fb'] = (a['gts'][0] + a['gts'][1], 1)
        a['bm'] = (a['fb'][0] + 1, 1)
        a['grains'] = -(-(a['bm'][0] + 1) // 8) * 8
    return a

def sesparse(name, sectors, data=None, zero=(), unmapped=(), slots=None,
             layout='vmware', parent=None, parent_cid=0xffffffff,
             cid=0x5e5a11ce):
    data = dict(data or {})
    kinds = {g: 3 for g in data}
    kinds.update({g: 2 for g in zero})
    kinds.update({g: 1 for g in unmapped})
    n_gd = -(-sectors // (4096 * 8))
    used = sorted({g // 4096 for g in kinds}, reverse=True)
    a = _areas(layout, n_gd, len(used))
    if slots is None:
        slots = {g: i for i, g in enumerate(data)}
    n_grains = max(list(slots.values()) + [-1]) + 1
    h = bytearray(512)
    struct.pack_into('<26Q', h, 0, 0xcafebabe, 0x0000000200000001, sectors,
                     8, 64, 0, 0, 0, 0, 0, a['vh'][0], a['vh'][1],
                     a['jh'][0], a['jh'][1], a['j'][0], a['j'][1],
                     a['gd'][0], a['gd'][1], a['gts'][0], a['gts'][1],
                     a['fb'][0], a['fb'][1], a['bm'][0], a['bm'][1],
                     a['grains'], 8 * n_grains)
    vh = bytearray(512)
    struct.pack_into('<4Q', vh, 0, 0xcafecafe, len(used), 1, 0)
    gd = bytearray(a['gd'][1] * 512)
    offs = dict(vh=a['vh'][0] * 512, gd=a['gd'][0] * 512, gt={}, grain={})
    gts = {}
    for i, l1 in enumerate(used):
        struct.pack_into('<Q', gd, 8 * l1, 0x1000000000000000 | i)
        offs['gt'][l1] = (a['gts'][0] + 64 * i) * 512
        gts[l1] = bytearray(32768)
    for g, k in kinds.items():
        v = k << 60
        if k == 3:
            idx = slots[g]
            v |= (idx & 0xfff) << 48 | idx >> 12
            offs['grain'][g] = (a['grains'] + 8 * idx) * 512
        struct.pack_into('<Q', gts[g // 4096], 8 * (g % 4096), v)
    end = a['grains'] * 512 + n_grains * 4096
    with open(name + '-sesparse.vmdk', 'wb') as f:
        f.truncate(end)
        for off, b in [(0, h), (offs['vh'], vh), (offs['gd'], gd)] + \
                [(offs['gt'][l1], t) for l1, t in gts.items()] + \
                [(offs['grain'][g], data[g].ljust(4096, b'\0'))
                 for g in data]:
            f.seek(off)
            f.write(b)
    hint = 'parentFileNameHint="%s"\n' % parent if parent else ''
    with open(name + '.vmdk', 'w') as f:
        f.write('# Disk DescriptorFile\nversion=1\nencoding="UTF-8"\n'
                'CID=%08x\nparentCID=%08x\nisNativeSnapshot="no"\n'
                'createType="seSparse"\n%s\n# Extent description\n'
                'RW %d SESPARSE "%s-sesparse.vmdk"\n\n# The Disk Data Base\n'
                '#DDB\n\nddb.grain = "8"\nddb.longContentID = '
                '"0123456789abcdef0123456789abcdef"\n'
                'ddb.virtualHWVersion = "14"\n'
                % (cid, parent_cid, hint, sectors, name.split('/')[-1]))
    return offs
PYEOF
}
