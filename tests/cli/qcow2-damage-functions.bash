# Damaged qcow2 images for the tests of validation before writes
# (src/drivers/qcow2/validate.c): qemu-img made base images, and a
# generator that patches one metadata structure of a copy. Sourced by
# qcow2-damaged-*.sh after ../functions.sh (and inside tmpdir).
#
#   damage_bases            make back.qcow2 (a backing file), new.qcow2 (a
#                           second one, for rebase) and the bases:
#                           main.qcow2 (64k clusters, backing file, data,
#                           a compressed and a zero cluster, snapshot s1,
#                           then a write that gave the active tree its own
#                           L2 table), ext.qcow2 (the same with
#                           extended_l2=on and a 2k subcluster write) and
#                           bm.qcow2 (no backing file, two persistent
#                           bitmaps, snapshot s1)
#   damage_list BASE        print the names of the damages BASE allows
#   damage_make DIR NAME=BASE:DAMAGE...
#                           write DIR/NAME.qcow2: a copy of BASE with
#                           DAMAGE applied
#   patch FILE OFF FMT VAL  write VAL (python struct FMT, big endian) at OFF

patch()
{
    python3 - "$@" <<'EOF'
import struct, sys
f, off, fmt = sys.argv[1], int(sys.argv[2], 0), sys.argv[3]
vals = [int(v, 0) for v in sys.argv[4:]]
with open(f, "r+b") as fh:
    fh.seek(off)
    fh.write(struct.pack(">" + fmt, *vals))
EOF
}

damage_bases()
{
    $QEMU_IMG create -q -f qcow2 back.qcow2 4M
    $QEMU_IO -c 'write -q -P 0x99 0 4M' back.qcow2 >/dev/null
    $QEMU_IMG create -q -f qcow2 new.qcow2 4M
    $QEMU_IO -c 'write -q -P 0x77 0 2M' new.qcow2 >/dev/null

    $QEMU_IMG create -q -f qcow2 -b back.qcow2 -F qcow2 main.qcow2 4M
    $QEMU_IO -c 'write -q -P 0x11 0 128k' -c 'write -q -P 0x22 1M 64k' \
        -c 'write -q -c -P 0x33 2M 64k' -c 'write -q -z 3M 64k' main.qcow2
    $QEMU_IMG snapshot -c s1 main.qcow2
    $QEMU_IO -c 'write -q -P 0x44 64k 64k' main.qcow2

    $QEMU_IMG create -q -f qcow2 -o extended_l2=on -b back.qcow2 -F qcow2 \
        ext.qcow2 4M
    $QEMU_IO -c 'write -q -P 0x11 0 128k' -c 'write -q -P 0x22 512k 2k' \
        -c 'write -q -c -P 0x33 2M 64k' ext.qcow2
    $QEMU_IMG snapshot -c s1 ext.qcow2
    $QEMU_IO -c 'write -q -P 0x44 64k 64k' ext.qcow2

    $QEMU_IMG create -q -f qcow2 bm.qcow2 4M
    $QEMU_IO -c 'write -q -P 0x11 0 128k' -c 'write -q -c -P 0x33 2M 64k' \
        bm.qcow2
    $QEMU_IMG bitmap --add bm.qcow2 b0
    $QEMU_IMG bitmap --add -g 128k bm.qcow2 b1
    $QEMU_IMG snapshot -c s1 bm.qcow2
    $QEMU_IO -c 'write -q -P 0x44 64k 64k' bm.qcow2
}

_damage_py()
{
    cat > damage.py <<'EOF'
# Reads a base image's layout and applies one damage to a copy; every
# offset is found in the image itself, none is assumed.
import os, shutil, struct, sys

MASK = 0x00fffffffffffe00
COPIED, COMPRESSED = 1 << 63, 1 << 62

def u32(d, o): return struct.unpack(">I", d[o:o + 4])[0]
def u64(d, o): return struct.unpack(">Q", d[o:o + 8])[0]

class Layout:
    def __init__(self, path):
        d = self.d = open(path, "rb").read()
        cs = self.cs = 1 << u32(d, 20)
        self.bits = u32(d, 20)
        v3 = u32(d, 4) >= 3
        self.l1, self.rt = u64(d, 40), u64(d, 48)
        self.nsn, self.snoff = u32(d, 60), u64(d, 64)
        self.esize = 16 if v3 and u64(d, 72) & 16 else 8
        self.l2 = u64(d, self.l1) & MASK
        self.rb = u64(d, self.rt) & ~0x1ff
        if self.nsn:
            self.sn_l1 = u64(d, self.snoff)
        # past the end: just beyond (inside the refcount block's reach)
        # and far beyond (1 TiB)
        self.near = (len(d) + cs - 1) // cs * cs + 16 * cs
        self.far = 1 << 40
        self.bm = None
        p = u32(d, 100) if v3 else 72
        while p + 8 <= cs:
            t, n = struct.unpack(">II", d[p:p + 8])
            if t == 0:
                break
            if t == 0x23852875:
                self.bm = p + 8
            p += 8 + ((n + 7) & ~7)

    def l2e(self, i): return self.l2 + i * self.esize
    def entry(self, i): return u64(self.d, self.l2e(i))
    def rc(self, off): return self.rb + 2 * (off // self.cs)  # 16 bits

def damages(L):
    cs, d0 = L.cs, L.entry(0) & MASK
    ci = (2 << 20) // cs                    # the compressed cluster
    comp = L.entry(ci)
    shift = 62 - (L.bits - 8)
    csize = comp & ~((1 << shift) - 1) & ~COMPRESSED
    d = {
        "none": [],
        "rt-zero": [(L.rt, "Q", 0)],
        "rt-unal": [(L.rt, "Q", 0x200)],
        "rt-l1": [(L.rt, "Q", L.l1)],
        "rt-l2": [(L.rt, "Q", L.l2)],
        "rt-near": [(L.rt, "Q", L.near)],
        "rt-far": [(L.rt, "Q", L.far)],
        "rb-zero": [(L.rb, "zero", cs)],
        "rc-hdr": [(L.rc(0), "H", 0)],
        "rc-l1": [(L.rc(L.l1), "H", 0)],
        "rc-rt": [(L.rc(L.rt), "H", 0)],
        "rc-l2": [(L.rc(L.l2), "H", 0)],
        "rc-data": [(L.rc(d0), "H", 0)],
        "rc-l2-max": [(L.rc(L.l2), "H", 0xffff)],
        "l1-unal": [(L.l1, "Q", COPIED | (L.l2 + 0x200))],
        "l1-rt": [(L.l1, "Q", COPIED | L.rt)],
        "l1-rb": [(L.l1, "Q", COPIED | L.rb)],
        "l1-l1": [(L.l1, "Q", COPIED | L.l1)],
        "l1-near": [(L.l1, "Q", COPIED | L.near)],
        "l1-far": [(L.l1, "Q", COPIED | L.far)],
        "l2-unal": [(L.l2e(0), "Q", COPIED | (d0 + 0x200))],
        "l2-l1": [(L.l2e(0), "Q", COPIED | L.l1)],
        "l2-rt": [(L.l2e(0), "Q", COPIED | L.rt)],
        "l2-self": [(L.l2e(0), "Q", COPIED | L.l2)],
        "l2-near": [(L.l2e(0), "Q", COPIED | L.near)],
        "l2-far": [(L.l2e(0), "Q", COPIED | L.far)],
        "l2-dup": [(L.l2e(5), "Q", L.entry(0))],
        "hdr-l1-rt": [(40, "Q", L.rt)],
        "hdr-rt-l1": [(48, "Q", L.l1)],
    }
    if comp & COMPRESSED:
        d["comp-near"] = [(L.l2e(ci), "Q", COMPRESSED | csize | L.near)]
        d["comp-far"] = [(L.l2e(ci), "Q", COMPRESSED | csize | L.far)]
        d["comp-long"] = [(L.l2e(ci), "Q",
                           comp | (((1 << (62 - shift)) - 1) << shift))]
    if L.nsn:
        d.update({
            "rc-sntab": [(L.rc(L.snoff), "H", 0)],
            "rc-snl1": [(L.rc(L.sn_l1), "H", 0)],
            "sn-eof": [(64, "Q", L.near)],
            "sn-l1-active": [(L.snoff, "Q", L.l1)],
            "sn-l1-near": [(L.snoff, "Q", L.near)],
            "snl1-l1": [(L.sn_l1, "Q", L.l1)],
            "snl1-rt": [(L.sn_l1, "Q", L.rt)],
            "snl1-far": [(L.sn_l1, "Q", L.far)],
            "l1-sntab": [(L.l1, "Q", COPIED | L.snoff)],
            "l1-snl1": [(L.l1, "Q", COPIED | L.sn_l1)],
            "hdr-l1-sntab": [(40, "Q", L.snoff)],
        })
    if L.esize == 16:
        # extended L2: entry 8 (guest 512k) has one subcluster of data
        d.update({
            "ext-nohost": [(L.l2e(8), "Q", 0), (L.l2e(8) + 8, "Q", 3)],
            "ext-both": [(L.l2e(0) + 8, "Q", 0x0000000100000001)],
            "ext-unal": [(L.l2e(0), "Q", COPIED | (d0 + 0x200))],
        })
    if L.bm:
        e = L.bm
        dr = u64(L.d, e + 16)               # bitmap directory
        tb = u64(L.d, dr)                   # first bitmap's table
        te = u64(L.d, tb)
        d.update({
            "bm-nb-huge": [(e, "I", 70000)],
            "bm-nb-zero": [(e, "I", 0)],
            "bm-nb-more": [(e, "I", 3)],
            "bm-nb-less": [(e, "I", 1)],
            "bm-reserved": [(e + 4, "I", 1)],
            "bm-dir-unal": [(e + 16, "Q", dr + 0x200)],
            "bm-dir-huge": [(e + 8, "Q", 0x8000000)],
            "bm-dir-zero": [(e + 8, "Q", 0)],
            "bm-dir-short": [(e + 8, "Q", 40)],
            "bm-dir-eof": [(e + 16, "Q", L.near)],
            "bm-tsize0": [(dr + 8, "I", 0)],
            "bm-tsize2": [(dr + 8, "I", 2)],
            "bm-toff-unal": [(dr, "Q", tb + 0x200)],
            "bm-flags": [(dr + 12, "I", 6)],
            "bm-gran": [(dr + 17, "B", 8)],
            "bm-type": [(dr + 16, "B", 2)],
            "bm-name-long": [(dr + 18, "H", 1024)],
            "bm-extra": [(dr + 20, "I", 8)],
            "bm-dupname": [(dr + 32 + 25, "B", 0x30)],
            "bm-entry-res": [(tb, "Q", te | 2)],
            "bm-entry-unal": [(tb, "Q", te | 0x200)],
            "bm-inuse": [(dr + 12, "I", 3)],
            "bm-inuse-bad": [(dr + 12, "I", 3), (tb, "Q", te | 2)],
        })
    return d

if sys.argv[1] == "--list":
    print(" ".join(sorted(damages(Layout(sys.argv[2])))))
    sys.exit(0)
layouts = {}
for arg in sys.argv[2:]:
    name, rest = arg.split("=", 1)
    base, spec = rest.split(":", 1)
    L = layouts.setdefault(base, Layout(base))
    dst = os.path.join(sys.argv[1], name + ".qcow2")
    shutil.copyfile(base, dst)
    with open(dst, "r+b") as f:
        for off, fmt, val in damages(L)[spec]:
            f.seek(off)
            f.write(b"\0" * val if fmt == "zero" else
                    struct.pack(">" + fmt, val))
EOF
}

damage_list()
{
    [ -f damage.py ] || _damage_py
    python3 damage.py --list "$1"
}

damage_make()
{
    [ -f damage.py ] || _damage_py
    python3 damage.py "$@"
}
