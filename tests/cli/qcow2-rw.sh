#!/usr/bin/env bash
# qcow2 read/write against QEMU as referee: random writes, zero writes
# and discards applied by `vdisk io` to qcow2 images of many shapes
# (cluster sizes 512..2M, refcount widths 1/16/64, v2/v3, extended L2,
# with and without a backing file) must give what qemu-io gives on a raw
# copy, and pass `qemu-img check`; images QEMU wrote must read back
# identically through vdisk.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io python3 cmp
tmpdir

SIZE=$((8 * 1024 * 1024 + 12345 * 512))

# gen SEED CLUSTER DISCARD: qemu-io commands, one per line.
gen()
{
    python3 - "$@" <<'PY'
import random, sys
seed, cluster, discard = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
size = int(sys.argv[4])
r = random.Random(seed)
for i in range(60):
    k = r.random()
    if k < 0.5:
        off = r.randrange(0, size // 512) * 512
        ln = r.choice([512, 1024, 4096, 65536, 3 * cluster, 200 * 512])
        ln = min(ln, size - off)
        if r.random() < 0.5:
            off2 = r.randrange(0, size - 1); ln2 = min(r.randrange(1, 70000), size - off2)
            off, ln = off2, ln2
        print("write -P 0x%02x %d %d" % (r.randrange(1, 256), off, ln))
    elif k < 0.75:
        off = r.randrange(0, size // 512) * 512
        ln = min(r.choice([512, cluster, 4 * cluster, 100000 // 512 * 512]), size - off)
        print("write -z %s%d %d" % ("-u " if r.random() < 0.5 else "", off, ln))
    elif discard:
        c = r.randrange(0, size // cluster)
        n = min(r.randrange(1, 5), size // cluster - c)
        print("discard %d %d" % (c * cluster, n * cluster))
PY
}

# run NAME CREATE-OPTS BACKING(0/1) DISCARD(0/1) CLUSTER
run()
{
    local name=$1 opts=$2 backing=$3 discard=$4 cluster=$5
    rm -f base.qcow2 img.qcow2 qimg.qcow2 ref.raw out.raw
    local bopt=()
    if [ "$backing" = 1 ]; then
        "$QEMU_IMG" create -q -f qcow2 base.qcow2 "$SIZE"
        "$QEMU_IO" -f qcow2 -c "write -P 0x11 0 3M" -c "write -P 0x22 5M 1234567" \
            base.qcow2 >/dev/null
        "$QEMU_IMG" convert -O raw base.qcow2 ref.raw
        bopt=(-b base.qcow2 -F qcow2)
    else
        "$QEMU_IMG" create -q -f raw ref.raw "$SIZE"
    fi
    # vdisk creates one image, qemu-img the other.
    "$VDISK" create -q -f qcow2 -o "$opts" "${bopt[@]}" img.qcow2 "$SIZE"
    "$QEMU_IMG" create -q -f qcow2 -o "$opts" "${bopt[@]}" qimg.qcow2 "$SIZE"

    local cmds=() line
    while IFS= read -r line; do
        cmds+=(-c "$line")
    done < <(gen "$RANDOM" "$cluster" "$discard" "$SIZE")

    "$QEMU_IO" -f raw "${cmds[@]}" ref.raw >/dev/null
    "$VDISK" io -f qcow2 "${cmds[@]}" img.qcow2 >/dev/null
    "$QEMU_IO" -f qcow2 "${cmds[@]}" qimg.qcow2 >/dev/null

    "$QEMU_IMG" check -q img.qcow2 || fail "$name: qemu-img check failed"
    "$QEMU_IMG" compare -q -f raw -F qcow2 ref.raw img.qcow2 ||
        fail "$name: vdisk-written image differs from the model"
    "$VDISK" convert -O raw img.qcow2 out.raw
    cmp ref.raw out.raw || fail "$name: vdisk reads its own image wrongly"
    rm -f out.raw
    "$VDISK" convert -O raw qimg.qcow2 out.raw
    cmp ref.raw out.raw || fail "$name: vdisk reads the QEMU-written image wrongly"
}

run v3-64k        "cluster_size=64k"                      0 1 65536
run v3-64k-back   "cluster_size=64k"                      1 1 65536
run v3-512        "cluster_size=512"                      0 1 512
run v3-512-back   "cluster_size=512"                      1 1 512
run v3-4k-rc1     "cluster_size=4k,refcount_bits=1"       0 1 4096
run v3-4k-rc64    "cluster_size=4k,refcount_bits=64"      1 1 4096
run v3-2M         "cluster_size=2M"                       1 1 2097152
run v2-64k        "compat=0.10"                           0 1 65536
run v2-64k-back   "compat=0.10"                           1 0 65536
run v3-extl2      "extended_l2=on,cluster_size=64k"       0 1 65536
run v3-extl2-back "extended_l2=on,cluster_size=64k"       1 1 65536
run v3-extl2-16k  "extended_l2=on,cluster_size=16k"       1 1 16384
run v3-lazy       "lazy_refcounts=on"                     1 1 65536
run v3-prealloc   "preallocation=metadata,cluster_size=4k" 0 1 4096
