#!/usr/bin/env bash
# rebase -F refused driver names qemu-img 7.2 knows (host_device, nbd, throttle, ...) and a safe rebase did not reuse a new backing file already in the chain, as qemu-img does whatever -F says.
# For each -F, unsafe and safe, onto the current backing file and onto
# another one: the same messages, exit status and image as qemu-img.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io cmp
tmpdir

$QEMU_IMG create -q -f qcow2 a.qcow2 1M
$QEMU_IO -c 'write -q -P 1 0 1M' a.qcow2
$QEMU_IMG create -q -f qcow2 n.qcow2 1M
$QEMU_IMG create -q -f qcow2 -b a.qcow2 -F qcow2 o.qcow2
$QEMU_IO -c 'write -q -P 2 0 64k' o.qcow2

for fmt in host_device host_cdrom nbd throttle vmdk raw file qcow2 blkdebug \
           null-co foo ''; do
    for mode in -u ''; do
        for b in a.qcow2 n.qcow2; do
            cp o.qcow2 q.qcow2
            cp o.qcow2 v.qcow2
            qs=0; vs=0
            $QEMU_IMG rebase $mode -b $b -F "$fmt" q.qcow2 >q.out 2>&1 || qs=$?
            "$VDISK" rebase $mode -b $b -F "$fmt" v.qcow2 >v.out 2>&1 || vs=$?
            what="rebase $mode -b $b -F '$fmt'"
            [ "$qs" = "$vs" ] || { cat q.out v.out; fail "$what: status $vs, qemu-img's $qs"; }
            # Drivers vdisk does not have fail to open the new backing
            # file in other words; everything else is qemu-img's.
            case "$fmt" in
            nbd|throttle|vmdk) [ "$mode" = -u ] || [ "$b" = a.qcow2 ] ||
                    { grep -q "Could not open new backing file 'n.qcow2'" v.out ||
                      fail "$what: $(cat v.out)"; continue; } ;;
            esac
            diff -u <(sed 's/^qemu-img: //' q.out) <(sed 's/^vdisk: //' v.out) ||
                fail "$what: messages differ"
            cmp q.qcow2 v.qcow2 || fail "$what: images differ"
        done
    done
done
