#!/usr/bin/env bash
# convert between every pair of writable formats, vdisk against qemu-img
# on the same source: for each format A that both tools create (raw,
# qcow2, qed, vdi, vpc, parallels, and whichever of vmdk, vhdx and luks
# this vdisk writes), a source image made by qemu-img and written by
# qemu-io (data, zeroes, a hole, a partial last cluster); then for each
# target format B, `vdisk convert -f A -O B` and `qemu-img convert` of the
# same source: vdisk's copy reads back the source's bytes (qemu-img
# convert to raw, then compare with the raw original) and passes `qemu-img check` where the
# format has one (qemu-img checks its own copy), and `qemu-img info`
# shows the same virtual size and format for both copies. `measure -O B`
# of a raw and a qcow2 source prints what qemu-img prints.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
source "$(dirname "$0")/fmt-functions.bash"
requires qemu-img qemu-io
tmpdir

T="timeout 120"

# luks needs a secret; every command gets the object (harmless for the
# other formats). qemu-img's luks creations go through qemu_img_pbkdf
# (fmt-functions.bash), which makes a creation again when QEMU's PBKDF2
# timing fails at random on a busy machine.
printf 'matrix-pw' > pw
obj=(--object secret,id=sec0,file=pw)
create_opts() # FMT: the options a target needs
{
    case $1 in
    luks) echo "-o key-secret=sec0,iter-time=10" ;;
    vpc) echo "-o force_size=on" ;;
    esac
}
src_opts() # FMT: how to open a source of FMT
{
    case $1 in
    luks) echo "--image-opts driver=luks,key-secret=sec0,file.filename=" ;;
    *) echo "-f $1 " ;;
    esac
}

formats=()
for f in raw qcow2 qed vdi vpc parallels vmdk vhdx luks; do
    # shellcheck disable=SC2046
    if qemu_img_pbkdf create -q "${obj[@]}" -f $f $(create_opts $f) \
            probe.q 1M &&
        "$VDISK" create -q "${obj[@]}" -f $f $(create_opts $f) probe.v 1M \
            2> /dev/null; then
        formats+=("$f")
    fi
    rm -f probe.q probe.v
done
echo "formats: ${formats[*]}"
[ ${#formats[@]} -ge 2 ] || fail "fewer than two writable formats"

# The guest data: 8 MiB + 512 bytes (not a multiple of any cluster).
size=$((8 * 1024 * 1024 + 512))
$QEMU_IMG create -q -f raw want.raw $size
$QEMU_IO -f raw -c 'write -P 0x5a 0 1M' -c 'write -P 0xa5 3M 64k' \
    -c 'write -P 0x11 6M 1536k' -c "write -P 0x22 $((size - 4096)) 4096" \
    want.raw > /dev/null

for a in "${formats[@]}"; do
    # shellcheck disable=SC2046
    qemu_img_pbkdf convert "${obj[@]}" -f raw -O $a $(create_opts $a) \
        want.raw src.$a || fail "qemu-img convert raw -> $a: $(cat qemu.err)"
    $T $QEMU_IO "${obj[@]}" $(src_opts $a)src.$a -c 'write -z 6M 64k' \
        > /dev/null 2>&1 || fail "qemu-io write -z on $a"
    $T $QEMU_IO -f raw -c 'write -z 6M 64k' want.raw > /dev/null
    for b in "${formats[@]}"; do
        rm -f q.$b v.$b
        # shellcheck disable=SC2046
        qemu_img_pbkdf convert "${obj[@]}" $(src_opts $a)src.$a -O $b \
            $(create_opts $b) q.$b ||
            fail "qemu-img convert $a -> $b: $(cat qemu.err)"
        # shellcheck disable=SC2046
        $T "$VDISK" convert "${obj[@]}" $(src_opts $a)src.$a -O $b \
            $(create_opts $b) v.$b 2> v.err ||
            fail "vdisk convert $a -> $b: $(cat v.err)"
        # (Through a raw copy: compare cannot mix --image-opts, which
        # luks needs, with a plain file name.)
        # shellcheck disable=SC2046
        $T $QEMU_IMG convert "${obj[@]}" $(src_opts $b)v.$b -O raw back.raw \
            && $T $QEMU_IMG compare -f raw -F raw back.raw want.raw \
            > cmp.out 2>&1 || fail "$a -> $b: $(cat cmp.out)"
        # Checked where qemu-img checks its own copy (vpc and raw have no
        # check).
        # shellcheck disable=SC2046
        if $QEMU_IMG check "${obj[@]}" $(src_opts $b)q.$b > /dev/null 2>&1
        then
            # shellcheck disable=SC2046
            $T $QEMU_IMG check "${obj[@]}" $(src_opts $b)v.$b > chk.out \
                2>&1 || fail "$a -> $b: qemu-img check: $(cat chk.out)"
        fi
        for c in q v; do
            # shellcheck disable=SC2046
            $QEMU_IMG info "${obj[@]}" $(src_opts $b)$c.$b |
                grep -E '^(file format|virtual size):' > $c.info
        done
        diff -u q.info v.info || fail "$a -> $b: info differs"
    done
    # measure (where qemu-img measures a format: else the same refusal),
    # from a raw and a qcow2 source (the source's format only changes
    # what block status says, which those two cover).
    case $a in raw|qcow2) ;; *) continue ;; esac
    for b in "${formats[@]}"; do
        [ "$b" = luks ] && continue
        # shellcheck disable=SC2046
        same measure "${obj[@]}" $(src_opts $a)src.$a -O $b
    done
done
exit 0
