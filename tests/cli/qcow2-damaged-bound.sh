#!/usr/bin/env bash
# snapshot -c on an image whose L1 table and refcount table shared an offset kept writing until the file-size limit killed the process.
# It counted refcounts as L2 entries and raised references terabytes past
# the end of the file. Under `ulimit -f` (SIGXFSZ ignored, so a write
# past the limit fails with EFBIG) every writing command on such images
# must end with an error, not a kill, leave the file as it was, and never
# grow a file past the bound of docs/qcow2.md.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/qcow2-damage-functions.bash"
requires qemu-img qemu-io python3 sha256sum timeout
tmpdir

damage_bases
damage_make . hdr-l1-rt=main.qcow2:hdr-l1-rt hdr-rt-l1=main.qcow2:hdr-rt-l1 \
    l1-far=main.qcow2:l1-far l2-far=main.qcow2:l2-far \
    comp-far=main.qcow2:comp-far rt-far=main.qcow2:rt-far

# 16 MiB: four times the virtual size, far below where the bug wrote.
limit_kib=16384

# limited ARGS...: ARGS with the file size limited, SIGXFSZ ignored.
limited()
{
    ( trap '' XFSZ; ulimit -f $limit_kib; exec timeout 20 "$@" )
}

for img in hdr-l1-rt hdr-rt-l1 l1-far l2-far comp-far rt-far; do
    sum=$(sha256sum < $img.qcow2)
    for cmd in "snapshot -c new" "snapshot -a s1" "snapshot -d s1" \
               "commit" "amend -o compat=0.10" "resize --shrink @ 2M"; do
        cp $img.qcow2 v.qcow2
        args=${cmd/@/v.qcow2}
        [ "$args" != "$cmd" ] || args="$cmd v.qcow2"
        st=0
        # shellcheck disable=SC2086
        limited "$VDISK" $args > out 2> err || st=$?
        [ "$st" = 1 ] || fail "$img $cmd: exit status $st: $(cat err)"
        grep -q "v.qcow2" err || fail "$img $cmd: no file name: $(cat err)"
        [ "$(sha256sum < v.qcow2)" = "$sum" ] ||
            fail "$img $cmd: the file changed"
    done
    for cmd in "write -P 0x55 0 192k" "write -z 64k 64k" "discard 0 1M"; do
        cp $img.qcow2 v.qcow2
        st=0
        limited "$VDISK" io -c "$cmd" v.qcow2 > out 2> err || st=$?
        [ "$st" = 0 ] || [ "$st" = 1 ] || fail "$img $cmd: exit status $st"
        [ "$(size_of v.qcow2)" -le $(( $(size_of $img.qcow2) + (6 << 20) )) ] ||
            fail "$img $cmd: the file grew to $(size_of v.qcow2) bytes"
    done
done
