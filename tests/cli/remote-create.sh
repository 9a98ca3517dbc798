#!/usr/bin/env bash
# Creating images on remote protocols as qemu-img 7.2 does: the creation
# options are the format's merged with those of the protocol the filename
# names (rbd's cluster_size, nbd's preallocation=off; never the file
# protocol's nocow), `-o help` lists them; a protocol that cannot create
# (http) is refused before "Formatting ..." is printed; on an nbd export
# (a protocol that reaches an existing image) "creating" formats what is
# there, byte for byte as qemu-img does: the first sector zeroed for raw,
# a qcow2 header on top of the old data, a size larger than the export
# refused.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/nbd-servers.bash"
requires qemu-img qemu-io qemu-nbd timeout
tmpdir

T="timeout 60"

# Same stdout and stderr as qemu-img (prefix renamed), same exit status.
same_as_qemu()
{
    local qrc=0 vrc=0
    $T "$QEMU_IMG" "$@" > q.out 2> q.err || qrc=$?
    $T "$VDISK" "$@" > v.out 2> v.err || vrc=$?
    [ "$qrc" = "$vrc" ] || fail "$*: exit $vrc, qemu-img $qrc: $(cat v.err)"
    sed -i 's/^qemu-img:/vdisk:/' q.err
    diff -u q.out v.out || fail "$*: output differs from qemu-img's"
    diff -u q.err v.err || fail "$*: errors differ from qemu-img's"
}

# The option lists of each protocol, merged with raw's and qcow2's.
# (--help kept in a file: grep -q ending a pipe early fails it under
# pipefail.)
"$VDISK" --help > help.out
for url in "rbd:rbd/img" "iscsi://127.0.0.1/iqn.x/0" "ssh://127.0.0.1/x" \
    "nbd://127.0.0.1:1/x" "nbd+unix:///x?socket=s" "/tmp/file.img" \
    "http://127.0.0.1:1/x" "https://127.0.0.1:1/x"; do
    grep -qw "${url%%:*}" help.out || [ "${url:0:1}" = / ] ||
        continue
    for fmt in raw qcow2; do
        same_as_qemu create -f $fmt -o help "$url"
    done
done

# Options checked against the protocol's list: rbd takes cluster_size
# (no cluster: the connection error differs, so only the parse is
# compared), the file protocol's options are not rbd's.
if grep -qw rbd help.out; then
    same_as_qemu create -f raw -o nocow=on rbd:rbd/img 1M
    same_as_qemu convert -O raw -o nocow=on -f raw /dev/null rbd:rbd/img
    expect_status 1 "$VDISK" create -f raw -o cluster_size=4M rbd:rbd/img 1M \
        > v.out 2> v.err
    grep -q "Invalid parameter" v.err && fail "rbd cluster_size refused"
    grep -q "^Formatting 'rbd:rbd/img', fmt=raw size=1048576 cluster_size=4194304$" \
        v.out || fail "rbd Formatting line: $(cat v.out)"
fi

# A protocol that cannot create is refused before anything is printed.
same_as_qemu create -f qcow2 http://127.0.0.1:1/x 1M
same_as_qemu convert -O raw -f raw /dev/null http://127.0.0.1:1/x

# nbd: qemu-img's preallocation checks, after the Formatting line.
same_as_qemu create -f raw -o preallocation=full nbd://127.0.0.1:1/x 1M
same_as_qemu create -f raw -o preallocation=bad nbd://127.0.0.1:1/x 1M

# "Creating" on a live export: the same bytes as qemu-img's create on a
# copy of the same export.
$QEMU_IMG create -q -f raw q.raw 8M
$QEMU_IO -f raw -c 'write -P 0x5a 0 8M' q.raw > /dev/null
cp q.raw v.raw
nbds_qemu_nbd qpid '' -f raw -k "$PWD/qsock" q.raw || fail "qemu-nbd"
nbds_qemu_nbd vpid '' -f raw -k "$PWD/vsock" v.raw || fail "qemu-nbd"
for args in "-f raw URL 4M" "-f qcow2 URL 64M" \
    "-f qcow2 -o cluster_size=4k,lazy_refcounts=on URL 1G" "-f raw URL 8M"; do
    qargs=${args//URL/nbd+unix:///?socket=$PWD/qsock}
    vargs=${args//URL/nbd+unix:///?socket=$PWD/vsock}
    $T $QEMU_IMG create $qargs > q.out || fail "qemu-img create $args"
    $T "$VDISK" create $vargs > v.out || fail "vdisk create $args"
    diff -u <(sed s/qsock/SOCK/ q.out) <(sed s/vsock/SOCK/ v.out) ||
        fail "create $args: Formatting line"
    cmp q.raw v.raw || fail "create $args on an export: bytes differ"
done
# The qcow2 made on the export is one qemu-img reads clean.
$T "$VDISK" create -q -f qcow2 "nbd+unix:///?socket=$PWD/vsock" 16M
$T $QEMU_IO -f qcow2 -c 'write -P 7 1M 64k' "nbd+unix:///?socket=$PWD/vsock" \
    > /dev/null
$T "$VDISK" io -f qcow2 -c 'read -P 7 1M 64k' \
    "nbd+unix:///?socket=$PWD/vsock" > out
grep -q 'Pattern verification failed' out && fail "qcow2 on an export"
$T $QEMU_IMG check -f qcow2 "nbd+unix:///?socket=$PWD/vsock" > /dev/null ||
    fail "qemu-img check of the qcow2 vdisk made on an export"
# Larger than the export: refused, and nothing written.
cp v.raw before.raw
expect_status 1 $T "$VDISK" create -q -f raw \
    "nbd+unix:///?socket=$PWD/vsock" 1G 2> v.err
expect_status 1 $T $QEMU_IMG create -q -f raw \
    "nbd+unix:///?socket=$PWD/qsock" 1G 2> q.err
diff -u <(sed -e 's/^qemu-img: //' -e s/qsock/SOCK/ q.err) \
    <(sed -e 's/^vdisk: //' -e s/vsock/SOCK/ v.err) ||
    fail "create larger than the export"
cmp before.raw v.raw || fail "a refused create wrote to the export"
exit 0
