#!/usr/bin/env bash
# vmdk seSparse extents (ESXi's snapshot format), read only, against
# qemu-img/qemu-io 7.2 at test time. qemu-img cannot create them, so
# fmt-functions.bash's sesparsegen writes them from the layout QEMU's
# block/vmdk.c reads (a descriptor naming NAME-sesparse.vmdk; data, zero,
# unmapped and unallocated grains over several grain tables, a grain
# index above 4095 so that both halves of its split encoding count, the
# areas where ESXi puts them or packed); qemu-img is the referee of every
# read: convert to raw, info (human and JSON), map, compare and check
# equal; a snapshot over a vmdk parent; writers refused in QEMU's words;
# a corruption corpus of the headers and tables, the files unchanged.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
source "$(dirname "$0")/fmt-functions.bash"
source "$(dirname "$0")/fmt-foreign.bash"
requires qemu-img qemu-io python3
tmpdir

sesparsegen
"$QEMU_IMG" create -q -f vmdk parent.vmdk 64M
"$QEMU_IO" -f vmdk -c 'write -P 7 0 1M' -c 'write -P 8 20M 64k' \
    -c 'write -P 9 60M 8k' parent.vmdk > /dev/null
pcid=$("$QEMU_IMG" info --output=json parent.vmdk |
       python3 -c 'import json, sys
print(json.load(sys.stdin)["format-specific"]["data"]["cid"])')
python3 - "$pcid" <<'PYEOF'
import sys
from sesparse import *
g = grain_bytes
# 100 MiB as in ESXi's example, four grain tables (placed in reverse), a
# grain stored at index 4100 and data out of guest order.
sesparse('esx', 204800,
         data={0: g(1), 1: g(2), 5000: g(3), 4096 * 5 + 7: g(4),
               8192: g(5), 204800 // 8 - 1: g(6)},
         zero=[2, 4096 * 5 + 8], unmapped=[3, 8193],
         slots={0: 4100, 1: 0, 5000: 1, 4096 * 5 + 7: 2, 8192: 3,
                204800 // 8 - 1: 4})
# Packed, a size that ends inside a grain (the last grain read in part).
sesparse('packed', 20005, data={0: g(9), 2500: g(8), 2499: g(7)},
         zero=[1], layout='compact')
sesparse('empty', 2048, layout='compact')
# A snapshot of parent.vmdk: unallocated grains read the parent, zero and
# unmapped grains hide it.
sesparse('snap', 131072, parent='parent.vmdk', parent_cid=int(sys.argv[1]),
         data={0: g(11), 5121: g(12), 15360: g(13)},
         zero=[1, 5120], unmapped=[2, 15361])
PYEOF

# ---- reads: qemu-img is the referee ------------------------------------

reads_like_qemu esx.vmdk packed.vmdk empty.vmdk snap.vmdk
for img in esx packed snap; do
    same check "$img.vmdk"
    same check --output=json "$img.vmdk"
    "$VDISK" convert -O raw "$img.vmdk" "$img.raw"
    same compare "$img.vmdk" "$img.raw"
    same compare -f vmdk -F raw "$img.vmdk" "$img.raw"
done
same compare esx.vmdk packed.vmdk
same measure -O qcow2 esx.vmdk
same measure -O qcow2 snap.vmdk
same map snap.vmdk
"$VDISK" io -r -c 'read -P 7 12k 4k' -c 'read -P 0 8k 4k' \
    -c 'read -P 0 20M 4k' -c 'read -P 8 20979712 4k' snap.vmdk > out ||
    fail "io reads of snap.vmdk: $(cat out)"
[ "$(grep -c '^read 4096/4096' out)" = 4 ] || fail "io: $(cat out)"
# To other formats and back (through qcow2, vdisk's own).
"$VDISK" convert -O qcow2 esx.vmdk esx.qcow2
"$QEMU_IMG" compare -q esx.vmdk esx.qcow2 || fail "esx.qcow2 differs"

# ---- writers: refused at open, in QEMU's words -------------------------

cp esx-sesparse.vmdk esx.orig
cp esx.vmdk esx-desc.orig
for args in "resize esx.vmdk 200M" "amend -o zeroed_grain=on esx.vmdk" \
            "commit esx.vmdk" "check -r all esx.vmdk" \
            "snapshot -c s esx.vmdk"; do
    # shellcheck disable=SC2086
    same $args
done
for io in "$QEMU_IO" "$VDISK_QEMU_IO"; do
    st=0
    "$io" -c 'write 0 4k' esx.vmdk > "io.out" 2>&1 || st=$?
    [ "$st" = 1 ] || fail "$io: write exit $st"
    sed 's/^[^:]*://' io.out > "io.$([ "$io" = "$QEMU_IO" ] && echo q || echo v)"
done
cmp io.q io.v || fail "qemu-io write: $(cat io.q) / $(cat io.v)"
grep -q "No write support for seSparse images available" io.v ||
    fail "qemu-io write: $(cat io.v)"
cmp esx-sesparse.vmdk esx.orig || fail "esx-sesparse.vmdk changed"
cmp esx.vmdk esx-desc.orig || fail "esx.vmdk changed"

# ---- bad input ---------------------------------------------------------

python3 - <<'PYEOF'
import struct
from sesparse import *
g = grain_bytes
def bad(name, fn=None, sectors=65539, **kw):
    o = sesparse('bad-' + name, sectors, data={0: g(1), 4097: g(2),
                 8191: g(3)}, zero=[1], unmapped=[4098], layout='compact',
                 **kw)
    d = bytearray(open('bad-%s-sesparse.vmdk' % name, 'rb').read())
    if fn:
        fn(d, o)
    open('bad-%s-sesparse.vmdk' % name, 'wb').write(d)
def put(off, v, fmt='<Q'):
    return lambda d, o: struct.pack_into(fmt, d, off(o) if callable(off)
                                         else off, v)
gd = lambda o: o['gd']
gt0 = lambda o: o['gt'][0]
vh = lambda o: o['vh']
# Refused by both at open, in the same words.
bad('magic', put(0, 0xcafebabf))
bad('version', put(8, 0x0000000200000002))
bad('grain16', put(24, 16))
bad('grain1', put(24, 1))
bad('gtsize', put(32, 128))
bad('flags', put(40, 1))
bad('reserved', put(64, 5))
bad('cpad', put(300, 1, '<B'))
bad('vmagic', put(vh, 0xcafebabe))
bad('dirty', put(lambda o: o['vh'] + 24, 1))
bad('vpad', put(lambda o: o['vh'] + 100, 1, '<B'))
bad('vfar', put(80, 0x7fffffff))
bad('gdhuge', put(136, 0x80001))
bad('cap', put(16, 0x7fffffffffffffff))
bad('short', lambda d, o: d.__delitem__(slice(100, None)))
bad('nofile')
# Fail reads in both (QEMU's VMDK_ERROR).
bad('gde', put(gd, 0x2000000000000000))
bad('gdidx', put(gd, 0x10000000ffffffff))
bad('gtkind', put(gt0, 0x4000000000000000))
bad('gtfree', put(gt0, 5))
bad('gtsoff', put(144, 0x100000000))
bad('grainsoff', put(192, 0xffffffffffffff))
bad('uncovered', put(136, 1), sectors=4 << 21)
# Refused by vdisk where QEMU reads zeros or wraps around.
bad('vhoff', put(80, 0xffffffffffffffff))
bad('gdwrap', put(136, 1 << 26))
bad('gdeof', put(128, 0x7fffffff))
bad('gteof', put(144, 0x7ffffff0))
bad('grainfar', put(gt0, 0x3000000000ffffff))
bad('grainhuge', put(gt0, 0x3fffffffffffffff))
bad('grainpart', lambda d, o: d.__delitem__(slice(o['grain'][8191] + 100,
                                                  None)))
PYEOF
rm bad-nofile-sesparse.vmdk

# snapshot FILE...: copies to compare with after the run
keep() { for f in "$@"; do [ ! -e "$f" ] || cp "$f" "$f.orig"; done; }
unchanged()
{
    for f in "$@"; do
        [ ! -e "$f.orig" ] || cmp -s "$f" "$f.orig" || fail "$f was modified"
    done
}
# every writer refused, the files unchanged
no_writes()
{
    expect_status 1 "$VDISK_QEMU_IO" -c 'write 0 512' "$1.vmdk" 2> /dev/null
}

# Refused by both at open, in the same words.
for n in magic version grain16 grain1 gtsize flags reserved cpad vmagic \
         dirty vpad vfar gdhuge short nofile; do
    keep bad-$n.vmdk bad-$n-sesparse.vmdk
    same info bad-$n.vmdk
    same info --output=json bad-$n.vmdk
    same convert -O raw bad-$n.vmdk out.raw
    no_writes bad-$n
    unchanged bad-$n.vmdk bad-$n-sesparse.vmdk
done
# Opened alike; reads fail in both (qemu-img's words for convert; vdisk's
# io names the extent file and the fault, where qemu-io reads zeros).
for c in gde:0:"names no grain table" gdidx:0:"names no grain table" \
         gtkind:0:"of no known kind" gtfree:0:"of no known kind" \
         gtsoff:0:"names no grain table" grainsoff:0:"is out of range" \
         uncovered:1G:"past the grain directory"; do
    IFS=: read -r n at pattern <<< "$c"
    keep bad-$n.vmdk bad-$n-sesparse.vmdk
    same info bad-$n.vmdk
    # (QEMU's check takes the wrapped offset of grainsoff for one past EOF)
    [ $n = grainsoff ] || same check bad-$n.vmdk
    expect_status 1 "$QEMU_IMG" convert -O raw bad-$n.vmdk out.raw 2> q.err
    expect_status 1 "$VDISK" convert -O raw bad-$n.vmdk out.raw 2> v.err
    expect_status 1 "$VDISK" io -r -c "read $at 4k" bad-$n.vmdk > out 2>&1
    grep -qF "bad-$n-sesparse.vmdk: " out && grep -q "$pattern" out ||
        fail "bad-$n: io read: $(cat out)"
    no_writes bad-$n
    unchanged bad-$n.vmdk bad-$n-sesparse.vmdk
done
# Refused by vdisk beyond QEMU: at open, or at the read of the grain.
for c in vhoff:"volatile header offset" cap:"extents add up" gdwrap:"L1 size too big" \
         gdeof:"grain directory at 0x" gteof:"grain table 0 of the grain" \
         grainfar:"past the end of the file" grainhuge:"is out of range" \
         grainpart:"past the end of the file"; do
    IFS=: read -r n pattern <<< "$c"
    keep bad-$n.vmdk bad-$n-sesparse.vmdk
    st=0
    "$VDISK" io -r -c 'read 0 32M' bad-$n.vmdk > out 2>&1 || st=$?
    [ "$st" = 1 ] || fail "bad-$n: io exit $st: $(cat out)"
    grep -q "$pattern" out || fail "bad-$n: $(cat out)"
    grep -qF "bad-$n" out || fail "bad-$n: no file named: $(cat out)"
    expect_status 1 "$VDISK" convert -O raw bad-$n.vmdk out.raw 2> v.err
    no_writes bad-$n
    unchanged bad-$n.vmdk bad-$n-sesparse.vmdk
done
