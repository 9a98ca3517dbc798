#!/usr/bin/env bash
# An image whose bitmaps extension was damaged opened for info, convert and snapshot without a word, where qemu-img refuses.
# QEMU 7.2 validates the extension and loads the bitmap directory and
# the tables of bitmaps not in use on every open: vdisk must refuse the
# same images with the same message (after its program name), leave
# them untouched, and treat healthy bitmaps as QEMU does where it matters
# (snapshot apply refused while bitmaps exist, resize while one is in
# use; a stale extension ignored).
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/qcow2-damage-functions.bash"
requires qemu-img qemu-io python3 sha256sum
tmpdir

damage_bases
damages=$(damage_list bm.qcow2 | tr ' ' '\n' | grep '^bm-')
mkdir imgs
# shellcheck disable=SC2046
damage_make imgs $(for d in $damages; do echo "$d=bm.qcow2:$d"; done)

# same_outcome IMAGE ARGS...: vdisk fails exactly when qemu-img fails,
# with qemu-img's (first) line, and leaves IMAGE byte-identical then
# (or as qemu-img left it).
same_outcome()
{
    local img=$1 qrc=0 vrc=0 sum
    shift
    cp "$img" q.qcow2
    cp "$img" v.qcow2
    sum=$(sha256sum < v.qcow2)
    $QEMU_IMG "${@/@/q.qcow2}" >/dev/null 2>qerr || qrc=$?
    "$VDISK" "${@/@/v.qcow2}" >/dev/null 2>verr || vrc=$?
    if [ "$qrc" = 0 ]; then
        [ "$vrc" = 0 ] || fail "$img $*: vdisk failed: $(cat verr)"
        return 0
    fi
    [ "$vrc" = 1 ] || fail "$img $*: vdisk exit $vrc where qemu-img failed"
    diff <(head -n 1 qerr | sed 's/^qemu-img: //; s/q\.qcow2/IMG/') \
         <(head -n 1 verr | sed 's/^vdisk: //; s/v\.qcow2/IMG/') ||
        fail "$img $*: not qemu-img's message"
    # Unchanged, or changed exactly as qemu-img changed it: a writable
    # open of an image with bitmaps marks them in use and stores them
    # back at close, in QEMU as in vdisk, also when the command is then
    # refused (snapshot -a with bitmaps).
    [ "$(sha256sum < v.qcow2)" = "$sum" ] ||
        [ "$(sha256sum < v.qcow2)" = "$(sha256sum < q.qcow2)" ] ||
        fail "$img $*: the file changed"
}

refused=0
for d in $damages; do
    for cmd in "info @" "convert -O raw @ out.raw" "snapshot -c new @" \
               "check @"; do
        # shellcheck disable=SC2086
        same_outcome imgs/$d.qcow2 $cmd
    done
    if ! $QEMU_IMG info imgs/$d.qcow2 >/dev/null 2>&1; then
        refused=$((refused + 1))
    fi
done
[ "$refused" -ge 15 ] || fail "only $refused damaged images refused by qemu-img"

# Healthy bitmaps: snapshot apply is refused as by qemu-img; a bitmap in
# use refuses resize; without the autoclear bit the extension is ignored
# and dropped at the first write.
same_outcome bm.qcow2 snapshot -a s1 @
same_outcome imgs/bm-inuse.qcow2 resize @ +1M
cp bm.qcow2 stale.qcow2
patch stale.qcow2 88 Q 0
same_outcome stale.qcow2 info @
cp stale.qcow2 v.qcow2
"$VDISK" io -c 'write -P 0x12 0 4k' v.qcow2 >/dev/null
$QEMU_IMG info v.qcow2 2>&1 | grep -q "bitmaps" &&
    fail "the stale bitmaps extension was kept"
$QEMU_IMG check v.qcow2 >/dev/null || [ $? = 3 ] ||
    fail "v.qcow2 has errors after the write"
