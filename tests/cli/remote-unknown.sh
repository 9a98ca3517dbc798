#!/usr/bin/env bash
# A protocol this vdisk has no driver for (QEMU's gluster and nfs, or a
# remote driver whose library was missing at build time) is refused with
# QEMU's "Unknown protocol 'NAME'", in the form qemu-img gives an unknown
# protocol, for info and create; never taken as a file name.
source "$(dirname "$0")/../functions.sh"
requires qemu-img
tmpdir

# qemu-img's words for a protocol it does not know, renamed.
qemu_says()
{
    { "$QEMU_IMG" "$@" 2>&1 || true; } |
        sed -e 's/^qemu-img: //' -e "s/novdiskproto/$proto/g"
}

for proto in gluster nfs; do
    url="$proto://127.0.0.1/vol/img"
    qurl="novdiskproto://127.0.0.1/vol/img"
    expect_status 1 "$VDISK" info "$url" 2> err
    want=$(qemu_says info "$qurl")
    grep -qxF "vdisk: $want" err || fail "info $url: $(cat err), want: $want"
    for fmt in raw qcow2; do
        expect_status 1 "$VDISK" create -q -f $fmt "$url" 1M 2> err
        want=$(qemu_says create -q -f $fmt "$qurl" 1M)
        grep -qxF "vdisk: $want" err ||
            fail "create -f $fmt $url: $(cat err), want: $want"
    done
    [ ! -e "$proto:" ] || fail "a file was created for $url"
done
exit 0
