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
#   qemu_img_pbkdf ARGS...        qemu-img ARGS, made again (up to 5
#                                  times) when QEMU 7.2's PBKDF2 timing
#                                  fails at random on a busy machine
#                                  ("Unable to get accurate CPU usage");
#                                  stdout to qemu.out, stderr to qemu.err,
#                                  qemu-img's exit status
#   check_refused NAME PATTERN VDISK-ARGS...
#                                  vdisk ARGS NAME.img must exit 1 with a
#                                  message naming NAME.img and matching
#                                  PATTERN, and leave NAME.img unchanged

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
    for _ in 1 2 3 4 5; do
        rc=0
        "$QEMU_IMG" "$@" > qemu.out 2> qemu.err || rc=$?
        [ "$rc" != 0 ] && grep -q "Unable to get accurate CPU usage" \
            qemu.err || break
    done
    return "$rc"
}
