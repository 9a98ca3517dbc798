# Helpers of the format tests (tests/cli/fmt-*.sh), sourced after
# ../functions.sh.
#
#   read_like_qemu IMG   qemu-img and vdisk each convert IMG to raw: both
#                        fail (vdisk with exit 1 and an error that names
#                        IMG, or qemu-img's own words), or both succeed
#                        with the same bytes. Never a crash.

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
