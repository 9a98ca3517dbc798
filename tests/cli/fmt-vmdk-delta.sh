#!/usr/bin/env bash
# vmdk deltas against qemu-img/qemu-io 7.2: VMDK3 ("COWD", ESX's
# vmfsSparse redo logs: qemu-img cannot create them, so they are written
# here from the layout QEMU's vmdk_open_vmfs_sparse reads) read, written
# and over a parent; a split image over a parent written in its second
# extent (the parent read at the guest offset, not the extent's); a
# parent whose CID no longer matches parentCID (reads fail as QEMU's).
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
source "$(dirname "$0")/fmt-functions.bash"
source "$(dirname "$0")/fmt-foreign.bash"
requires qemu-img qemu-io python3
tmpdir

# cowd.py: cowd(NAME, SECTORS, grain=, data={GRAIN: BYTES}, l1=,
# parent=, parent_cid=) writes NAME.vmdk (a vmfsSparse descriptor) and
# NAME-delta.vmdk: the 2 KiB header, the grain directory (l1 entries),
# 4096-entry grain tables for the grains used, the grains stored in the
# reverse of their guest order.
cat > cowd.py <<'PYEOF'
import struct

def cowd(name, sectors, grain=1, data=None, l1=None, parent=None,
         parent_cid=0xffffffff):
    data = data or {}
    cover = 4096 * grain
    n_l1 = l1 if l1 is not None else -(-sectors // cover)
    gd, gd_sectors = 4, max(1, -(-n_l1 * 4 // 512))
    used = sorted({g * grain // cover for g in data})
    gt_at = {l: gd + gd_sectors + 32 * i for i, l in enumerate(used)}
    first = gd + gd_sectors + 32 * len(used)
    h = bytearray(2048)
    h[0:4] = b'COWD'
    struct.pack_into('<7I', h, 4, 1, 3, sectors, grain, gd, n_l1, 0)
    gdb = bytearray(gd_sectors * 512)
    gts = {l: bytearray(16384) for l in used}
    for l in used:
        struct.pack_into('<I', gdb, 4 * l, gt_at[l])
    grains = {}
    for i, g in enumerate(sorted(data, reverse=True)):
        at = first + i * grain
        struct.pack_into('<I', gts[g * grain // cover], 4 * (g % 4096), at)
        grains[at] = data[g].ljust(grain * 512, b'\0')
    with open(name + '-delta.vmdk', 'wb') as f:
        for off, b in [(0, h), (gd * 512, gdb)] + \
                [(gt_at[l] * 512, t) for l, t in gts.items()] + \
                [(at * 512, b) for at, b in grains.items()]:
            f.seek(off)
            f.write(b)
    hint = 'parentFileNameHint="%s"\n' % parent if parent else ''
    with open(name + '.vmdk', 'w') as f:
        f.write('# Disk DescriptorFile\nversion=1\nCID=fffffffe\n'
                'parentCID=%08x\ncreateType="vmfsSparse"\n%s\n'
                '# Extent description\nRW %d VMFSSPARSE "%s-delta.vmdk"\n\n'
                '# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = "4"\n'
                % (parent_cid, hint, sectors, name))

def pat(b, n):
    return bytes((b * 13 + i // 97) & 0xff for i in range(n))
PYEOF

"$QEMU_IMG" create -q -f vmdk parent.vmdk 100M
"$QEMU_IO" -f vmdk -c 'write -P 7 0 1M' -c 'write -P 8 40M 64k' \
    parent.vmdk > /dev/null
pcid=$("$QEMU_IMG" info --output=json parent.vmdk |
       python3 -c 'import json, sys
print(json.load(sys.stdin)["format-specific"]["data"]["cid"])')

# ---- VMDK3 ---------------------------------------------------------------

# vdisk read VMDK3 extents with 64-entry directories and 512-entry grain
# tables (QEMU: the header's directory size, 4096 entries): every grain
# past the first table came from the wrong place.
python3 - "$pcid" <<'PYEOF'
import sys
from cowd import *
cowd('g1', 20000, data={0: pat(1, 512), 4095: pat(2, 512),
                        4096: pat(3, 512), 5000: pat(4, 512),
                        19999: pat(5, 512)})
cowd('g16', 204800, grain=16, data={0: pat(6, 8192), 12: pat(7, 8192),
                                    4097: pat(8, 8192)})
cowd('g8', 204800, grain=8, l1=9, data={1: pat(9, 4096),
                                        8191: pat(10, 4096)})
cowd('kid', 204800, grain=8, parent='parent.vmdk',
     parent_cid=int(sys.argv[1]),
     data={2: pat(11, 4096), 10241: pat(12, 4096)})
PYEOF
reads_like_qemu g1.vmdk g16.vmdk g8.vmdk kid.vmdk
same check g16.vmdk
"$VDISK" io -r -c 'read -P 7 0 8k' -c 'read -P 8 40M 4k' kid.vmdk > out ||
    fail "kid.vmdk: $(cat out)"
# The same qemu-io writes (new grains, one over the parent) give the same
# extent files.
split_dirs
for d in q v; do
    cp g16.vmdk g16-delta.vmdk kid.vmdk kid-delta.vmdk parent.vmdk $d/
done
w=(-c 'write -P 5 1M 4k' -c 'write -P 6 300k 512' -c 'write -P 4 40M 1k')
(cd q && "$QEMU_IO" "${w[@]}" g16.vmdk > /dev/null &&
 "$QEMU_IO" "${w[@]}" kid.vmdk > /dev/null)
(cd v && "$VDISK_QEMU_IO" "${w[@]}" g16.vmdk > /dev/null &&
 "$VDISK_QEMU_IO" "${w[@]}" kid.vmdk > /dev/null)
cmp q/g16-delta.vmdk v/g16-delta.vmdk || fail "g16 written differently"
cmp q/kid-delta.vmdk v/kid-delta.vmdk || fail "kid written differently"
(cd q && read_like_qemu kid.vmdk)
assert_same_content q/kid.vmdk v/kid.vmdk
# A granularity of 0 (QEMU's reads divide by it and crash) and a header
# cut short (vdisk read past its buffer): refused, named.
python3 - <<'PYEOF'
from cowd import *
cowd('zero', 2048, data={0: pat(1, 512)})
d = bytearray(open('zero-delta.vmdk', 'rb').read())
d[16:20] = bytes(4)
open('zero-delta.vmdk', 'wb').write(d)
cowd('short', 2048)
open('short-delta.vmdk', 'wb').write(b'COWD\1\0\0\0')
PYEOF
for n in zero short; do
    cp $n-delta.vmdk $n.orig
    expect_status 1 "$VDISK" info $n.vmdk > out 2>&1
    grep -q "$n-delta.vmdk: VMDK3 granularity 0" out || fail "$n: $(cat out)"
    cmp $n-delta.vmdk $n.orig || fail "$n changed"
done

# ---- a split image over a parent: the second extent ----------------------

# QEMU 7.2 fills a new grain of any extent but the first from the parent
# at the offset inside the extent, not in the disk (get_whole_cluster is
# given the extent-relative offset): the rest of the grain gets the
# parent's bytes from 2 GiB earlier, here zeros. vdisk copies the right
# bytes, so its files differ from qemu's; what they hold is checked
# against the parent with the same writes applied, read by qemu-img.
rm -rf q v
"$QEMU_IMG" create -q -f vmdk big.vmdk 2200M
"$QEMU_IO" -f vmdk -c 'write -P 3 2047M 2M' -c 'write -P 4 2100M 128k' \
    big.vmdk > /dev/null
mkdir v && cp big.vmdk v/
(cd v && "$VDISK_QEMU_IMG" create -q -f vmdk \
    -o subformat=twoGbMaxExtentSparse -b big.vmdk -F vmdk top.vmdk)
# (2100M+4k; 2048M-32k, across the two extents)
w=(-c 'write -P 9 2048M 512' -c 'write -P 10 2202013696 1k'
   -c 'write -P 11 2147450880 64k')
(cd v && "$VDISK_QEMU_IO" -f vmdk "${w[@]}" top.vmdk > /dev/null)
"$QEMU_IMG" convert -O raw big.vmdk want.raw
"$QEMU_IO" -f raw "${w[@]}" want.raw > /dev/null
"$QEMU_IMG" compare -q -f raw want.raw v/top.vmdk ||
    fail "top.vmdk: the parent's data around the writes is lost"
"$QEMU_IMG" check v/top.vmdk > /dev/null || fail "qemu-img check v/top.vmdk"
rm -f want.raw

# ---- a parent changed after the snapshot ---------------------------------

# vdisk read the unallocated grains of an image from a parent whose CID
# was no longer its parentCID (the parent written since): data that QEMU
# refuses to give.
rm -rf q v
"$QEMU_IMG" create -q -f vmdk -b parent.vmdk -F vmdk child.vmdk
"$QEMU_IO" -f vmdk -c 'write -P 1 64k 64k' child.vmdk > /dev/null
"$QEMU_IO" -f vmdk -c 'write -P 2 1M 4k' parent.vmdk > /dev/null
cp child.vmdk child.orig
cp parent.vmdk parent.orig
same compare child.vmdk parent.vmdk
expect_status 1 "$QEMU_IMG" convert -O raw child.vmdk out.raw 2> q.err
expect_status 1 "$VDISK" convert -O raw child.vmdk out.raw 2> v.err
[ "$(sed 's/^qemu-img:/vdisk:/' q.err | head -1)" = "$(head -1 v.err)" ] ||
    fail "convert: $(cat q.err) / $(cat v.err)"
expect_status 1 "$VDISK" io -r -c 'read 0 4k' child.vmdk > out 2>&1
grep -q "child.vmdk: the backing file's CID is not the image's parentCID" \
    out || fail "io: $(cat out)"
# (allocated grains still read)
"$VDISK" io -r -c 'read -P 1 64k 64k' child.vmdk > out ||
    fail "io: $(cat out)"
cmp child.vmdk child.orig || fail "child.vmdk changed"
cmp parent.vmdk parent.orig || fail "parent.vmdk changed"
