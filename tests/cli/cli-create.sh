#!/usr/bin/env bash
# vdisk create: the "Formatting ..." line (option order and defaults for
# raw and qcow2), -o help, size parsing and every error qemu-img reports,
# and that the images it creates look the same to qemu-img.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
requires qemu-img qemu-io python3
tmpdir

$QEMU_IMG create -f raw base.img 1M >/dev/null
$QEMU_IMG create -f qcow2 base.qcow2 2M >/dev/null
split_dirs

same_rw create -f raw a.img 1M
same_rw create a2.img 1.5G
same_rw create -f raw -o preallocation=full,size=2M b.img
same_rw create -f raw -o preallocation=falloc,nocow=on,extent_size_hint=2M c.img 1M
same_rw create -q -f raw d.img 64k
same_rw create -f qcow2 e.qcow2 64M
same_rw create -f qcow2 -o compat=0.10 f.qcow2 16M
same_rw create -f qcow2 -o compression_type=zstd,extended_l2=on,cluster_size=128k g.qcow2 16M
same_rw create -f qcow2 -o lazy_refcounts=on,refcount_bits=64 h.qcow2 16M
same_rw create -f qcow2 -b base.qcow2 -F qcow2 i.qcow2
same_rw create -f qcow2 -b base.img -F raw j.qcow2 4M
same_rw create -f qcow2 -u -b nothere.qcow2 -F qcow2 k.qcow2 1M
same_rw create -f qcow2 -o cluster_size=4k -o preallocation=metadata l.qcow2 1M

# Help listings.
same_rw create -f raw -o help
same_rw create -f raw -o help x.img
same_rw create -f qcow2 -o help
same_rw create -f qcow2 -o '?'

# Errors, each with qemu-img's message and status.
same_rw create -f raw x.img 12X
same_rw create -f raw x.img -- -1
same_rw create -f raw x.img 99999999999E
same_rw create -f raw x.img
same_rw create -f raw x.img 1M extra
same_rw create
same_rw create -f raw -b base.img x.img 1M
same_rw create -f foo x.img 1M
same_rw create -f raw -o bogus=1 x.img 1M
same_rw create -f raw -o size=foo x.img
same_rw create -f raw -o size=1M x.img 2M
same_rw create -f qcow2 -o lazy_refcounts=maybe x.qcow2 1M
same_rw create -f qcow2 -o refcount_bits=x x.qcow2 1M
same_rw create -f qcow2 -b nothere.qcow2 x.qcow2
same_rw create -f qcow2 -b base.img x.qcow2
same_rw create -f qcow2 -u -b nothere.qcow2 x.qcow2 1M
same_rw create -f qcow2 -b x.qcow2 -F qcow2 x.qcow2 1M
same_rw create -z x.img 1M

# What was created must look the same to qemu-img.
for f in a.img a2.img b.img c.img d.img e.qcow2 f.qcow2 g.qcow2 h.qcow2 \
         i.qcow2 j.qcow2 k.qcow2 l.qcow2; do
    [ -e "q/$f" ] || fail "qemu-img did not create $f"
    [ -e "v/$f" ] || fail "vdisk did not create $f"
    (cd q && $QEMU_IMG info -U --output=json "$f") > qi.json
    (cd v && $QEMU_IMG info -U --output=json "$f") > vi.json
    json_equal_filtered qi.json vi.json actual-size ||
        fail "qemu-img info differs for $f"
    if [ "$f" != k.qcow2 ]; then
        assert_same_content "q/$f" "v/$f"
    fi
    case $f in
    *.qcow2)
        [ "$(size_of "q/$f")" = "$(size_of "v/$f")" ] ||
            fail "$f: file sizes differ" ;;
    esac
done
for f in x.img x.qcow2; do
    [ ! -e "v/$f" ] || [ -e "q/$f" ] || fail "vdisk created $f on an error"
done
