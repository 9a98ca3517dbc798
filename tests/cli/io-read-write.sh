#!/usr/bin/env bash
# vdisk io: read/write/readv/writev/discard/write -z/flush print what
# qemu-io prints, leave the same image content, and data written by each
# tool reads back with the other.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/io-functions.bash"
requires qemu-img qemu-io
tmpdir

for fmt in $(io_formats); do
    rm -rf q v
    io_create "$fmt" disk.img 4M

    io_compare -f "$fmt" \
        -c 'write -P 0x5a 0 64k' \
        -c 'write 1M 512k' \
        -c 'write -P 17 100 3' \
        -c 'writev -P 0x33 2M 512 1k 4k' \
        -c 'write -f -P 1 3M 4k' \
        -c 'write -z 64k 64k' \
        -c 'write -z -u 1M 64k' \
        -c 'discard 3M 64k' \
        -c 'flush' \
        -c 'read -P 0x5a 0 100' \
        -c 'read -P 17 100 3' \
        -c 'read -P 0x5a 103 65433' \
        -c 'readv -P 0x33 2M 512 1k 4k' \
        -c 'read -P 0 64k 64k' \
        -c 'read -P 0 1M 64k' \
        -c 'read -P 0xcd 1088k 448k' \
        -c 'read -q 0 4M' \
        -c 'read 0 0' \
        -c 'write 0 0' \
        disk.img

    # Requests past the end fail as in qemu-io, and the exit status says so.
    io_compare -f "$fmt" -c 'read 4M 1' -c 'write 4095k 2k' \
        -c 'readv 4M 512' -c 'writev 4M 512' -c 'discard 5M 512' \
        -c 'write -z 4M 512' disk.img

    # Sizes with suffixes, hex, fractions, junk.
    io_compare -f "$fmt" -c 'read -q 1k 1.5k' -c 'read -q 0x200 0x10' \
        -c 'read -q 010 1.0' -c 'read 0 1.5b' -c 'read 0 1e3' \
        -c 'read 0 x' -c 'read 0 8E' -c 'read 0 .5k' -c 'read -q 1.k +5' \
        disk.img

    assert_same_content -f "$fmt" -F "$fmt" q/disk.img v/disk.img

    # Cross-check: what vdisk wrote, qemu-io reads back, and vice versa.
    "$VDISK" io -f "$fmt" -c 'write -P 0xa1 512k 192k' -c 'writev -P 0xa2 3M 1k 3k' \
        v/disk.img > /dev/null
    out=$("$QEMU_IO" -f "$fmt" -c 'read -P 0xa1 512k 192k' \
        -c 'read -P 0xa2 3M 4k' v/disk.img)
    case $out in
    *"verification failed"*) fail "qemu-io reads back other data: $out" ;;
    esac
    "$QEMU_IO" -f "$fmt" -c 'write -P 0xb7 2M 100k' q/disk.img > /dev/null
    "$VDISK" io -f "$fmt" -c 'read -q -P 0xb7 2M 100k' q/disk.img ||
        fail "vdisk io reads back other data than qemu-io wrote ($fmt)"
    if "$VDISK" io -f "$fmt" -c 'read -q -P 0xb8 2M 100k' q/disk.img > out; then
        fail "vdisk io read -P accepted a wrong pattern"
    fi
    grep -q 'Pattern verification failed at offset 2097152, 102400 bytes' out ||
        fail "no pattern failure message"
    if [ "$fmt" = qcow2 ]; then
        "$QEMU_IMG" check -q v/disk.img || fail "qemu-img check fails after vdisk io"
    fi
done
