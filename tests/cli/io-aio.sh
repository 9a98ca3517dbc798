#!/usr/bin/env bash
# vdisk io: aio_read/aio_write run concurrently, report like qemu-io (in
# any order), complete at aio_flush or exit, and leave the data qemu-io
# reads back. Async failures are reported but, as in qemu-io, do not
# change the exit status.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/io-functions.bash"
requires qemu-img qemu-io
tmpdir

for fmt in $(io_formats); do
    rm -rf q v
    io_create "$fmt" disk.img 8M

    # 64 overlapping-free writes of distinct patterns in flight at once.
    args=()
    for i in $(seq 0 63); do
        args+=(-c "aio_write -P $((i + 1)) $((i * 65536 + 512 * (i % 7))) $((4096 + 512 * i)) 512")
    done
    args+=(-c aio_flush)
    for i in $(seq 0 63); do
        args+=(-c "aio_read -P $((i + 1)) $((i * 65536 + 512 * (i % 7))) $((4096 + 512 * i))")
    done
    args+=(-c aio_flush -c 'aio_read -v 64k 32' -c 'aio_write -z 1M 64k')
    args+=(-c 'aio_read 8M 512' -c 'aio_write 9M 512' -c 'aio_read -P 9 0 512')
    args+=(-c 'aio_write -u 0 1' -c 'aio_write -z -P 1 0 1' -c 'aio_write -z 0 1 2')
    io_compare_sorted -f "$fmt" "${args[@]}" disk.img

    # Requests still in flight when the command list ends are completed.
    io_compare_sorted -f "$fmt" -c 'aio_write -P 0x77 2M 1M' \
        -c 'aio_write -P 0x78 3M 1M' -c 'aio_write -P 0x79 4M 1M' disk.img
    out=$("$QEMU_IO" -f "$fmt" -c 'read -P 0x77 2M 1M' -c 'read -P 0x78 3M 1M' \
        -c 'read -P 0x79 4M 1M' v/disk.img)
    case $out in
    *"verification failed"*) fail "aio writes lost: $out" ;;
    esac

    assert_same_content -f "$fmt" -F "$fmt" q/disk.img v/disk.img
    if [ "$fmt" = qcow2 ]; then
        "$QEMU_IMG" check -q v/disk.img || fail "qemu-img check fails after aio"
    fi
done
