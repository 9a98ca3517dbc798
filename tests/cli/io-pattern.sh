#!/usr/bin/env bash
# vdisk io: read -P/-s/-l verification, -v hex dumps, -C statistics,
# write -s source files, option errors and usage messages match qemu-io,
# including the exit status (1 when any command failed).
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/io-functions.bash"
requires qemu-img qemu-io
tmpdir

printf 'Hello, vdisk! 0123456789abcdefghij\n' > q-src.txt
for fmt in $(io_formats); do
    rm -rf q v
    io_create "$fmt" disk.img 1M
    cp q-src.txt q/src.txt
    cp q-src.txt v/src.txt

    io_compare -f "$fmt" \
        -c 'write -P 0x41 0 4k' -c 'write -P 0x42 4k 4k' \
        -c 'read -P 0x41 0 4k' -c 'read -P 0x41 0 8k' \
        -c 'read -P 0x42 -s 4k 0 8k' -c 'read -P 0x41 -s 0 -l 4k 0 8k' \
        -c 'read -P 0x42 -s 4095 -l 2 0 8k' \
        -c 'read -P 0x41 -s 100 -l 8000 0 8k' \
        -c 'read -l 10 0 512' -c 'read -s 10 0 512' \
        -c 'read -v 4090 40' -c 'read -v 0 1' -c 'read -v -q 0 16' \
        -c 'write -s src.txt 64k 100' -c 'read -v 64k 100' \
        -c 'read -P 300 0 1' -c 'read -P x 0 1' -c 'write -P -1 0 1' \
        -c 'read -C 0 512' -c 'write -C 8k 512' -c 'discard -C 8k 512' \
        disk.img

    io_compare -f "$fmt" -c 'write -u 0 1' -c 'write -n 0 1' \
        -c 'write -z -P 1 0 1' -c 'write -s src.txt -P 1 0 1' \
        -c 'write -f -c 0 512' -c 'write -b -z 0 1' -c 'write -c 1 512' \
        -c 'write -c 0 100' -c 'read' -c 'read 1 2 3' -c 'length 1' \
        -c 'alloc' -c 'bogus' -c 'read -X 0 1' -c 'sleep abc' \
        -c 'help nope' -c 'truncate -m bogus 1M' disk.img

    # A failed command anywhere makes the exit status 1, even if later
    # commands succeed; 'quit' stops the list.
    io_compare -f "$fmt" -c 'read -P 1 0 1' -c 'read 0 1' disk.img
    io_compare -f "$fmt" -c 'read 0 1' -c 'quit' -c 'read -P 1 0 1' disk.img
    io_compare -f "$fmt" -c 'sleep 1' -c 'length' -c 'flush' disk.img

    for cmd in read readv write writev aio_read aio_write discard alloc \
               map truncate flush length info sleep quit r w; do
        io_compare -f "$fmt" -c "help $cmd" disk.img
    done
done

# Errors outside commands.
rm -rf q v
io_create raw disk.img 1M
io_compare -c 'read 0 1' nonexistent.img
io_compare -c 'read 0 1'
io_compare -f qcow2 -c 'read 0 1' disk.img
io_compare -f raw -t bogus -c 'read 0 1' disk.img
io_compare -r -f raw -c 'write 0 1' -c 'discard 0 1' -c 'truncate 2M' \
    -c 'read -q 0 1' disk.img
