#!/usr/bin/env bash
# vdisk io without -c reads commands from stdin, one per line, printing
# qemu-io's "qemu-io> " prompt before each (qemu-io prints it even when
# stdin is not a terminal), stops at 'quit' or end of input, and exits 1
# when any command failed.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/io-functions.bash"
requires qemu-img qemu-io
tmpdir

io_create raw disk.img 1M
printf 'write -P 7 0 512\nread -P 7 0 512\n\n   \nlength\n' > in1
IO_STDIN=in1 io_compare -f raw disk.img
printf 'read 0 512\nbogus\nread  -v  0  8\n' > in2
IO_STDIN=in2 io_compare -f raw disk.img
printf 'read 0 512\nquit\nread -P 9 0 512\n' > in3
IO_STDIN=in3 io_compare -f raw disk.img
printf 'read 0 512' > in4     # no final newline
IO_STDIN=in4 io_compare -f raw disk.img
: > in5
IO_STDIN=in5 io_compare -f raw disk.img
