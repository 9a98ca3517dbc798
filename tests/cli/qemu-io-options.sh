#!/usr/bin/env bash
# qemu-io's remaining options and commands, by QEMU's qemu-io and by
# vdisk under qemu-io's name: read -b/write -b (the VM state, which each
# tool must read back from the other's image), -C/open -C copy-on-read
# (qemu-img map and compare are the referees), open -o without a path,
# -k/-i native AIO, -T, sigraise, -U. Output and exit status as qemu-io.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/io-functions.bash"
requires qemu-img qemu-io
tmpdir

map_same()
{
    "$QEMU_IMG" map --output=json "q/$1" > q.map
    "$QEMU_IMG" map --output=json "v/$1" > v.map
    diff -u q.map v.map || fail "qemu-img map differs after: $2"
}

# ---- the VM state ----
rm -rf q v
io_create qcow2 disk.qcow2 4M
io_compare -c 'write -b -P 0x71 0 128k' -c 'write -b -P 0x72 1M 4k' \
    -c 'read -b -P 0x71 0 128k' -c 'read -b -v 1M 32' -c 'read -P 0 0 128k' \
    -c 'write -b 0 100' -c 'read -b 512 100' -c 'write -b -z 0 512' \
    -c 'write -b -f 0 512' -c 'map' disk.qcow2
# Each tool reads what the other saved, and the images stay consistent.
"$QEMU_IO" -c 'read -b -q -P 0x71 0 128k' -c 'read -b -q -P 0x72 1M 4k' \
    v/disk.qcow2 > out 2>&1 || fail "qemu-io reads other VM state: $(cat out)"
"$VDISK_QEMU_IO" -c 'read -b -q -P 0x71 0 128k' q/disk.qcow2 > out 2>&1 ||
    fail "vdisk reads other VM state than qemu-io saved: $(cat out)"
"$QEMU_IMG" check q/disk.qcow2 > /dev/null
"$QEMU_IMG" check v/disk.qcow2 > out 2>&1 || fail "$(cat out)"
map_same disk.qcow2 "write -b"
rm -rf q v
io_create raw disk.raw 1M
io_compare -f raw -c 'write -b 0 4k' -c 'read -b 0 4k' -c 'read -P 0 0 4k' \
    disk.raw
cmp q/disk.raw v/disk.raw || fail "write -b on raw changed the file"

# ---- copy-on-read ----
io_backed_pair 2M
io_compare -C -c 'read -P 0x66 0 64k' -c 'read 1M 4k' -c 'map' top.qcow2
io_compare -c 'open -C top.qcow2' -c 'read -P 0x66 128k 192k' -c 'map'
io_compare -r -C -c 'read 0 4k' top.qcow2
io_compare -c 'open -r -C top.qcow2'
map_same top.qcow2 "copy-on-read"
assert_same_content q/top.qcow2 v/top.qcow2

# ---- open with options only ----
io_compare -c 'open -o driver=qcow2,file.filename=top.qcow2' \
    -c 'write -P 0x77 3M 64k' -c 'map'
io_compare -c 'open -o driver=qcow2' -c 'open -r' \
    -c 'open -o driver=qcow2,file.filename=nosuch.qcow2' \
    -c 'open -o file.filename=base.qcow2 base.qcow2' \
    -c 'open -o file.filename=base.qcow2' -c 'length'
map_same top.qcow2 "open -o"
assert_same_content q/top.qcow2 v/top.qcow2

# ---- native AIO, -T, sigraise, -U ----
io_compare -k -c 'read 0 4k' base.qcow2
io_compare -k -n -c 'write -P 0x78 0 4k' -c 'read -P 0x78 0 4k' base.qcow2
io_compare -i native -c 'read 0 4k' base.qcow2
io_compare -i native -t none -c 'read 0 4k' base.qcow2
io_compare -i io_uring -c 'read 0 4k' base.qcow2
io_compare -c 'open -k base.qcow2' -c 'open -k -t none base.qcow2' \
    -c 'read 0 4k'
io_compare -T nosuchevent -T 'nosuch*' -c 'length' base.qcow2
io_compare -T nosuchparam=1 -c 'length' base.qcow2
io_compare -T events=nosuch.file -c 'length' base.qcow2
io_compare -c 'write -P 0x79 0 4k' -c 'sigraise 15' -c 'write 0 4k' base.qcow2
io_compare -c 'sigraise 10' -c 'sigraise 14' -c 'sigraise 65' \
    -c 'sigraise x' -c 'length' base.qcow2
io_compare -U -c 'length' base.qcow2
io_compare -U -r -c 'read -P 0x79 0 4k' base.qcow2
io_compare -c 'open -U -r base.qcow2' -c 'open -U base.qcow2'
assert_same_content q/base.qcow2 v/base.qcow2
exit 0
