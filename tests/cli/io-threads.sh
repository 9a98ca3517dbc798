#!/usr/bin/env bash
# vdisk io randrw: many requests from many threads read back exactly. The
# final content depends only on the arguments, so a qcow2 image and a raw
# image driven alike must compare equal, whatever the scheduling was;
# qcow2 must also stay consistent (small blocks make threads allocate the
# same clusters concurrently).
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/io-functions.bash"
requires qemu-img qemu-io
tmpdir

"$QEMU_IMG" create -q -f raw ref.raw 32M
"$VDISK" io -f raw -c 'randrw -q -s 42 -j 8 -n 20000 -b 4k 0 32M' ref.raw > ref.out ||
    fail "randrw failed on raw: $(cat ref.out)"
grep -q ' 0 mismatches, 0 errors' ref.out || fail "randrw summary: $(cat ref.out)"

for fmt in $(io_formats); do
    "$QEMU_IMG" create -q -f "$fmt" img.$fmt 32M
    "$VDISK" io -f "$fmt" -c 'randrw -q -s 42 -j 8 -n 20000 -b 4k 0 32M' img.$fmt > out ||
        fail "randrw failed on $fmt: $(cat out)"
    # Same arguments, same operation counts.
    diff ref.out out || fail "randrw summaries differ between raw and $fmt"
    assert_same_content -f raw -F "$fmt" ref.raw img.$fmt

    # Sub-cluster blocks: neighbours in one cluster written concurrently.
    "$QEMU_IMG" create -q -f "$fmt" small.$fmt 4M
    "$QEMU_IMG" create -q -f raw small.raw 4M
    for img in small.$fmt small.raw; do
        f=${img##*.}
        "$VDISK" io -f "$f" -c 'randrw -q -s 9 -j 16 -n 8000 -b 512 -w 70 0 4M' \
            $img > out.$f || fail "randrw failed on $img: $(cat out.$f)"
    done
    assert_same_content -f raw -F "$fmt" small.raw small.$fmt
    if [ "$fmt" = qcow2 ]; then
        "$QEMU_IMG" check -q img.qcow2 || fail "qcow2 corrupt after randrw"
        "$QEMU_IMG" check -q small.qcow2 || fail "qcow2 corrupt after small randrw"
    fi
done

# Unaligned block size and offset, and a write-only run read back by
# qemu-io through a known pattern: a 1-thread 100%-write run over every
# block, then qemu-io writes a pattern that vdisk io must read.
"$QEMU_IMG" create -q -f qcow2 odd.qcow2 3M
"$VDISK" io -f qcow2 -c 'randrw -q -s 3 -j 5 -n 3000 -b 3000 1000 2M' odd.qcow2 > out ||
    fail "randrw with odd sizes failed: $(cat out)"
"$QEMU_IO" -f qcow2 -c 'write -P 0x3c 0 3M' odd.qcow2 > /dev/null
"$VDISK" io -f qcow2 -c 'read -q -P 0x3c 0 3M' odd.qcow2 ||
    fail "vdisk io reads other data than qemu-io wrote"

# Bad arguments are refused.
if "$VDISK" io -f qcow2 -c 'randrw -j 0 0 1M' odd.qcow2 > out; then
    fail "randrw -j 0 accepted"
fi
if "$VDISK" io -f qcow2 -c 'randrw 0 4M' odd.qcow2 > out; then
    fail "randrw past the end accepted"
fi

# The checker itself: null-co drops writes and reads zeros, so every read
# of a written block must be reported and the command must fail.
if "$VDISK" io -f null-co -c 'randrw -q -n 400 -j 4 0 1M' null-co:// > out; then
    fail "randrw did not notice lost writes: $(tail -2 out)"
fi
grep -q 'does not hold generation' out || fail "randrw printed no mismatch"
grep -q ' [1-9][0-9]* mismatches' out || fail "randrw summary shows no mismatch"
