#!/usr/bin/env bash
# A qcow2 image's backing format must be a name of QEMU's BlockdevDriver
# enum: `vdisk create -u -F vmdx` and `convert -B -F vmdx` used to write
# an image qemu-img refuses to create ("Parameter 'backing-fmt' does not
# accept value"); qemu-img's messages, statuses and whether a file is left.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
requires qemu-img
tmpdir

$QEMU_IMG create -q -f qcow2 base.qcow2 1M
$QEMU_IMG create -q -f qcow2 src.qcow2 1M
split_dirs

# same_file_left NAME: both tools left the file, or neither did.
same_file_left()
{
    local q=no v=no
    [ -e "q/$1" ] && q=yes
    [ -e "v/$1" ] && v=yes
    [ "$q" = "$v" ] || fail "$1 left by qemu-img: $q, by vdisk: $v"
    rm -f "q/$1" "v/$1"
}

# Not driver names, names of drivers Debian's QEMU is built without
# (CONFIG_BLKIO), names QEMU has and vdisk does not, probe-only formats,
# and vdisk's own.
for fmt in vmdx QCOW2 '' io_uring nvme-io_uring virtio-blk-vfio-pci \
           virtio-blk-vhost-user nbd vvfat ssh replication host_cdrom \
           throttle vmdk qcow raw qcow2; do
    same_rw create -f qcow2 -u -b base.qcow2 -F "$fmt" o.qcow2 1M
    same_file_left o.qcow2
    same_rw create -f qcow2 -u -o "backing_file=base.qcow2,backing_fmt=$fmt" \
        o.qcow2 1M
    same_file_left o.qcow2
done

# Safe mode opens the backing file with the named driver first (QEMU
# drivers vdisk lacks or only probes, such as nbd or vmdk, fail there
# with their own messages).
for fmt in vmdx raw qcow2; do
    same_rw create -f qcow2 -b base.qcow2 -F "$fmt" o.qcow2 1M
    same_file_left o.qcow2
    same_rw create -f qcow2 -b missing.qcow2 -F "$fmt" o.qcow2
    same_file_left o.qcow2
done

# A backing format without a backing file, and one that is wrong as well
# as other options that qcow2 checks later.
same_rw create -f qcow2 -o backing_fmt=vmdx o.qcow2 1M
same_file_left o.qcow2
same_rw create -f qcow2 -u -o cluster_size=1000,backing_file=x,backing_fmt=vmdx \
    o.qcow2 1M
same_file_left o.qcow2

# convert -B: refused before the target exists.
same_rw convert -O qcow2 -B base.qcow2 -F vmdx src.qcow2 o.qcow2
same_file_left o.qcow2
same_rw convert -O qcow2 -B base.qcow2 -F qcow2 src.qcow2 o.qcow2
same_file_left o.qcow2
