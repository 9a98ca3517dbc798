#!/usr/bin/env bash
# Backing-chain operations against qemu-img as the referee: the same
# three-layer chain (base 8M < mid 8M < top 10M, with data, zero clusters,
# sub-cluster writes and a discard) is processed by qemu-img in q/ and by
# vdisk in v/ (create -b, commit, commit -d, commit -b, rebase safe, rebase
# -u, rebase -b "", convert, convert -B, info --backing-chain, map); then
# every layer must read the same (qemu-img compare), pass qemu-img check,
# and qemu-img info --backing-chain must read both chains alike.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
requires qemu-img qemu-io python3
tmpdir

mkchain()
{
    $QEMU_IMG create -q -f qcow2 base.qcow2 8M
    $QEMU_IO -c 'write -P 1 0 4M' -c 'write -P 7 6M 1M' base.qcow2 >/dev/null
    $1 create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2
    $QEMU_IO -c 'write -P 2 1M 1M' -c 'write -z 3M 64k' \
        -c 'write -P 9 5000 1000' mid.qcow2 >/dev/null
    $1 create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 10M
    $QEMU_IO -c 'write -P 3 1536k 1M' -c 'write -P 4 9M 512k' \
        -c 'write -P 5 100k 3k' -c 'discard 0 64k' top.qcow2 >/dev/null
}

# info --backing-chain of both, with what may legitimately differ
# (host sizes, the directory) filtered out.
same_chain_info()
{
    $QEMU_IMG info --backing-chain --output=json q/top.qcow2 > qi.json
    $QEMU_IMG info --backing-chain --output=json v/top.qcow2 > vi.json
    sed -i 's#"q/#"X/#g' qi.json
    sed -i 's#"v/#"X/#g' vi.json
    json_equal_filtered qi.json vi.json actual-size dirty-flag ||
        fail "info --backing-chain differs after: $*"
}

# qemu-img map --output=json of @1 without host offsets, adjacent extents
# with equal flags merged: the allocation layout may legitimately differ,
# the depth and kind of every byte may not.
norm_map()
{
    $QEMU_IMG map --output=json "$1" | python3 -c '
import json, sys
out = []
for e in json.load(sys.stdin):
    e.pop("offset", None)
    if out and all(out[-1][k] == e[k] for k in e if k not in ("start", "length")) \
            and out[-1]["start"] + out[-1]["length"] == e["start"]:
        out[-1]["length"] += e["length"]
    else:
        out.append(e)
for e in out:
    print(json.dumps(e, sort_keys=True))
'
}

# Runs "vdisk ARGS" in v/ and "qemu-img ARGS" in q/ on fresh chains (each
# made by its own tool's create -b) and compares everything.
check_op()
{
    rm -rf q v
    mkdir q v
    (cd q && mkchain "$QEMU_IMG")
    (cd v && mkchain "$VDISK")
    same_rw "$@"
    for f in base mid top; do
        assert_same_content q/$f.qcow2 v/$f.qcow2
        $QEMU_IMG check -q v/$f.qcow2 || fail "check v/$f.qcow2 after: $*"
    done
    same_chain_info "$@"
    norm_map q/top.qcow2 > qm
    norm_map v/top.qcow2 > vm
    diff -u qm vm || fail "map differs after: $*"
}

# Creating the chain itself.
check_op info --backing-chain top.qcow2
check_op commit top.qcow2
check_op commit -d top.qcow2
check_op commit -q top.qcow2
check_op commit -b base.qcow2 top.qcow2
check_op commit -b mid.qcow2 top.qcow2
check_op commit -b nonexist top.qcow2
check_op commit base.qcow2
check_op commit -r 1x top.qcow2
check_op rebase -b base.qcow2 -F qcow2 top.qcow2
check_op rebase -b "" top.qcow2
check_op rebase -u -b base.qcow2 -F qcow2 top.qcow2
check_op rebase -u -b "" top.qcow2
check_op rebase -b nonexist -F qcow2 top.qcow2
check_op rebase top.qcow2
check_op convert -O qcow2 top.qcow2 flat.qcow2
assert_same_content q/flat.qcow2 v/top.qcow2
check_op convert -O qcow2 -B mid.qcow2 -F qcow2 top.qcow2 conv.qcow2
assert_same_content q/conv.qcow2 v/conv.qcow2
norm_map q/conv.qcow2 > qm
norm_map v/conv.qcow2 > vm
diff -u qm vm || fail "map of convert -B target differs"
check_op convert -O qcow2 -B mid.qcow2 top.qcow2 conv.qcow2

# vdisk's map and info through the chain print what qemu-img prints.
rm -rf q v; mkdir q v; (cd q && mkchain "$QEMU_IMG"); (cd v && mkchain "$VDISK")
cd v
same map top.qcow2
same map --output=json top.qcow2
same map --output=json mid.qcow2
same info --backing-chain top.qcow2
same info --backing-chain --output=json top.qcow2
same compare top.qcow2 ../q/top.qcow2
same compare -s mid.qcow2 ../q/mid.qcow2
same check top.qcow2
same check --output=json mid.qcow2
# Progress output is not compared byte for byte, only that it ends at 100.
$VDISK rebase -p -b "" top.qcow2 > progress.out
grep -q '100.00/100%' progress.out || fail "no final progress line"
assert_same_content top.qcow2 ../q/top.qcow2
cd ..

# convert -B naming a deeper layer: vdisk keeps the middle layer's data
# (qemu-img would drop it), so the content must equal the source.
cd v
$VDISK convert -O qcow2 -B base.qcow2 -F qcow2 top.qcow2 deep.qcow2
assert_same_content top.qcow2 deep.qcow2
$QEMU_IMG check -q deep.qcow2
cd ..
