#!/usr/bin/env bash
# vdisk dd: bs/count/skip arithmetic (including qemu's count-before-skip
# size rule), skipping past the end, output formats, and operand errors,
# compared with qemu-img dd output files and messages.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
requires qemu-img qemu-io
tmpdir

$QEMU_IMG create -f raw src.img 4M >/dev/null
$QEMU_IO -f raw -c 'write -P 0x5a 0 1M' -c 'write -P 0x33 3M 4097' src.img >/dev/null
$QEMU_IMG create -f qcow2 src.qcow2 3M >/dev/null
$QEMU_IO -f qcow2 -c 'write -P 0x44 1M 1M' src.qcow2 >/dev/null
split_dirs

n=0
for args in "if=src.img" "bs=4k count=10 skip=1 if=src.img" \
            "bs=1M skip=1 if=src.img" "bs=3 count=1000 if=src.img" \
            "bs=1k count=99999 if=src.img" "skip=99999999 if=src.img" \
            "-f raw -O raw bs=64k if=src.img" "-O qcow2 bs=1M if=src.img" \
            "if=src.qcow2 bs=1M count=2" "-f qcow2 -O qcow2 if=src.qcow2"; do
    n=$((n + 1))
    # shellcheck disable=SC2086
    same_rw dd $args of=out$n.img
    fmt=raw
    case $args in *"-O qcow2"*) fmt=qcow2 ;; esac
    [ -e "q/out$n.img" ] && [ -e "v/out$n.img" ] || fail "out$n.img missing"
    assert_same_content -f $fmt -F $fmt "q/out$n.img" "v/out$n.img"
    [ "$($QEMU_IMG info -U -f $fmt --output=json q/out$n.img | grep virtual-size)" = \
      "$($QEMU_IMG info -U -f $fmt --output=json v/out$n.img | grep virtual-size)" ] ||
        fail "out$n.img sizes differ"
done

same_rw dd if=src.img
same_rw dd if=src.img of=e.img bs=0
same_rw dd if=src.img of=e.img bs=4G
same_rw dd if=src.img of=e.img foo=1
same_rw dd if=src.img of=e.img junk
same_rw dd if=src.img of=e.img count=x
same_rw dd if=src.img of=e.img skip=-1
same_rw dd if=missing.img of=e.img
same_rw dd -O foo if=src.img of=e.img
