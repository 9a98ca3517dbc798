#!/usr/bin/env bash
# vhdx against qemu-img 7.2: creation (dynamic/fixed, log_size,
# block_size, block_state_zero) giving qemu's bytes but for the random
# GUIDs, sequence numbers and the creator; qemu-io writes read
# identically; vdisk's writes give qemu's file; info and check alike;
# measure/resize/amend refused alike; a dirty log (made here by poking a
# valid entry into a clean image) replayed as QEMU replays it, a
# read-only open of it refused with QEMU's message; a corruption corpus.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
source "$(dirname "$0")/fmt-functions.bash"
requires qemu-img qemu-io python3
tmpdir

# vhdx.py mask A B: the files are equal once the creator, the headers'
# checksums, sequence numbers and GUIDs, the page 83 GUID and the log
# region (QEMU leaves its replayed entries there) are zeroed.
# vhdx.py hdr FILE 1|2|cur OFF FMT VALUE [nofix]: a header field (its
# checksum fixed unless nofix). vhdx.py rt FILE OFF FMT VALUE [nofix]: a
# field of both region tables. vhdx.py meta FILE OFF FMT VALUE: bytes of
# the metadata region. vhdx.py bat FILE INDEX VALUE: a BAT entry.
# vhdx.py dirty FILE INDEX [ZERO_OFF] [badsum]: BAT entry INDEX is set
# back to NOT_PRESENT in the file and a log entry laid out as QEMU's
# vhdx_log_write lays them holds its 4 KiB sector as it was (and, with
# ZERO_OFF, zeroes 4 KiB of the file there); the headers get the log's
# GUID. badsum damages the entry after its checksum was computed.
# vhdx.py tail FILE VALUE: the tail field of the log's first entry.
# vhdx.py diff FILE PARENT: makes FILE a differencing image of PARENT.
cat > vhdx.py <<'EOF'
import struct, sys, uuid
T = []
for i in range(256):
    c = i
    for _ in range(8):
        c = (c >> 1) ^ 0x82f63b78 if c & 1 else c >> 1
    T.append(c)
def crc(b):
    c = 0xffffffff
    for x in b:
        c = T[(c ^ x) & 0xff] ^ (c >> 8)
    return c ^ 0xffffffff
def fix(b, base, size):
    b[base + 4:base + 8] = bytes(4)
    b[base + 4:base + 8] = struct.pack('<I', crc(bytes(b[base:base + size])))
K = 1024
def layout(b):
    regs = {}
    n = struct.unpack_from('<I', b, 192 * K + 8)[0]
    for i in range(n):
        e = 192 * K + 16 + 32 * i
        off, ln = struct.unpack_from('<QI', b, e + 16)
        regs[bytes(b[e:e + 4])] = (off, ln)
    return regs[bytes.fromhex('6677c22d')][0], regs[bytes.fromhex('06a27c8b')][0]
def cur(b):
    s1 = struct.unpack_from('<Q', b, 64 * K + 8)[0]
    s2 = struct.unpack_from('<Q', b, 128 * K + 8)[0]
    return 64 * K if s1 > s2 else 128 * K
def put(b, o, fmt, v):
    b[o:o + struct.calcsize('<' + fmt)] = struct.pack('<' + fmt, v)
cmd, f = sys.argv[1], sys.argv[2]
b = bytearray(open(f, 'rb').read())
if cmd == 'mask':
    c = bytearray(open(sys.argv[3], 'rb').read())
    if len(b) != len(c):
        sys.exit('%s and %s differ in size' % (f, sys.argv[3]))
    for x in (b, c):
        x[8:520] = bytes(512)
        for h in (64 * K, 128 * K):
            x[h + 4:h + 64] = bytes(60)
        meta = layout(x)[1]
        x[meta + 64 * K + 16:meta + 64 * K + 32] = bytes(16)
        # QEMU journals its BAT updates: stale entries stay in its log
        lo, ll = struct.unpack_from('<QI', x, cur(x) + 72)[0], \
            struct.unpack_from('<I', x, cur(x) + 68)[0]
        x[lo:lo + ll] = bytes(ll)
    if b != c:
        i = next(i for i in range(len(b)) if b[i] != c[i])
        sys.exit('%s and %s differ at %d' % (f, sys.argv[3], i))
    sys.exit(0)
if cmd == 'hdr':
    base = cur(b) if sys.argv[3] == 'cur' else int(sys.argv[3]) * 64 * K
    put(b, base + int(sys.argv[4], 0), sys.argv[5], int(sys.argv[6], 0))
    if 'nofix' not in sys.argv:
        fix(b, base, 4 * K)
elif cmd == 'rt':
    for base in (192 * K, 256 * K):
        put(b, base + int(sys.argv[3], 0), sys.argv[4], int(sys.argv[5], 0))
        if 'nofix' not in sys.argv:
            fix(b, base, 64 * K)
elif cmd == 'meta':
    put(b, layout(b)[1] + int(sys.argv[3], 0), sys.argv[4],
        int(sys.argv[5], 0))
elif cmd == 'bat':
    put(b, layout(b)[0] + 8 * int(sys.argv[3]), 'Q', int(sys.argv[4], 0))
elif cmd == 'tail':
    # the tail of the entry at the log's start, its checksum fixed
    lo = struct.unpack_from('<Q', b, cur(b) + 72)[0]
    put(b, lo + 12, 'I', int(sys.argv[3], 0))
    n = struct.unpack_from('<I', b, lo + 8)[0]
    put(b, lo + 4, 'I', 0)
    put(b, lo + 4, 'I', crc(bytes(b[lo:lo + n])))
elif cmd == 'diff':
    # diff FILE PARENT: a differencing image made of a dynamic one (8 MiB
    # blocks, block_state_zero=off): has-parent set, a VHDX parent
    # locator naming PARENT (relative_path, Windows style), block 1
    # PARTIALLY_PRESENT with a sector bitmap (at the end of the file)
    # that keeps only the sectors whose index has bit 3 set
    bat, meta = layout(b)
    put(b, meta + 64 * K + 4, 'I', 2)
    e = meta + 32 + 32 * 5
    put(b, meta + 10, 'H', 6)
    kv = [('parent_linkage', '{%s}' % uuid.uuid4()),
          ('relative_path', '.\\' + sys.argv[3]),
          ('absolute_win32_path', 'C:\\nowhere\\' + sys.argv[3])]
    loc = bytearray(uuid.UUID('b04aefb7-d19e-4a81-b789-25b8e9445913').bytes_le)
    loc += struct.pack('<HH', 0, len(kv))
    strs = bytearray()
    base = 20 + 12 * len(kv)
    for k, v in kv:
        k, v = k.encode('utf-16-le'), v.encode('utf-16-le')
        loc += struct.pack('<IIHH', base + len(strs), base + len(strs) + len(k),
                           len(k), len(v))
        strs += k + v
    loc += strs
    struct.pack_into('<16sIII', b, e,
                     uuid.UUID('a8d35f2d-b30b-454d-abf7-d3d84834ab0c').bytes_le,
                     0x10100, len(loc), 4)
    b[meta + 0x10100:meta + 0x10100 + len(loc)] = loc
    # chunk ratio 2^23 * 512 / 8 MiB = 512: entry 512 is the bitmap's
    sbm = (len(b) + 0xfffff) & ~0xfffff
    b += bytes(sbm - len(b))
    bm = bytearray(1024 * 1024)
    for sector in range(16384, 32768):
        if sector & 8:
            bm[sector // 8] |= 1 << (sector % 8)
    b += bm
    put(b, bat + 8 * 512, 'Q', sbm | 6)
    ent = struct.unpack_from('<Q', b, bat + 8)[0]
    put(b, bat + 8, 'Q', (ent & ~7) | 7)
elif cmd == 'dirty':
    eo = layout(b)[0] + 8 * int(sys.argv[3])
    zoff = int(sys.argv[4], 0) if len(sys.argv) > 4 and \
        sys.argv[4] != 'badsum' else None
    sec = eo & ~4095
    after = bytes(b[sec:sec + 4096])
    b[eo:eo + 8] = bytes(8)
    g, seq = uuid.uuid4().bytes, 10
    hdr = bytearray(4096)
    struct.pack_into('<4sIIIQII16sQQ', hdr, 0, b'loge', 0, 8192, 0, seq,
                     2 if zoff is not None else 1, 0, g, len(b), len(b))
    struct.pack_into('<4sIQQQ', hdr, 64, b'desc',
                     struct.unpack_from('<I', after, 4092)[0],
                     struct.unpack_from('<Q', after, 0)[0], sec, seq)
    if zoff is not None:
        struct.pack_into('<4sIQQQ', hdr, 96, b'zero', 0, 4096, zoff, seq)
    data = bytearray(4096)
    struct.pack_into('<4sI', data, 0, b'data', seq >> 32)
    data[8:4092] = after[8:4092]
    struct.pack_into('<I', data, 4092, seq & 0xffffffff)
    ent = hdr + data
    struct.pack_into('<I', ent, 4, crc(bytes(ent)))
    if 'badsum' in sys.argv:
        ent[5000] ^= 0xff
    lo = struct.unpack_from('<Q', b, cur(b) + 72)[0]
    b[lo:lo + 8192] = ent
    for base in (64 * K, 128 * K):
        b[base + 48:base + 64] = g
        fix(b, base, 4 * K)
open(f, 'wb').write(b)
EOF

same_bytes() { python3 vhdx.py mask "$1" "$2" || fail "$1 and $2 differ"; }
same_info()
{
    same info "$@"
    same info --output=json "$@"
}

# ---- creation: every option ----
split_dirs
n=0
for args in "1M" "100M" "1000" "0" "1100M" "-o subformat=fixed 10M" \
            "-o subformat=fixed,block_state_zero=off 10M" \
            "-o block_state_zero=off 33M" "-o log_size=3M 5M" \
            "-o log_size=1 5M" "-o block_size=1M 40M" \
            "-o block_size=300M 1M" "-o block_size=1 7M" \
            "-o subformat=fixed,block_size=32M,log_size=2M 33M" \
            "-o subformat=dynamic,block_size=256M 1G"; do
    n=$((n + 1))
    # shellcheck disable=SC2086
    same_rw create -f vhdx c$n.vhdx $args
    same_bytes q/c$n.vhdx v/c$n.vhdx
done
for n in 1 3 6 7 11 14; do
    (cd v && same_info c$n.vhdx)
done
for args in "-o subformat=foo e1.vhdx 1M" "e2.vhdx" "e3.vhdx 65T" \
            "-o log_size=0 e4.vhdx 1M" "-o block_size=3M e5.vhdx 1M" \
            "-o log_size=5G e6.vhdx 1M" "-o block_state_zero=maybe e7.vhdx 1M" \
            "-o cluster_size=64k e8.vhdx 1M"; do
    # shellcheck disable=SC2086
    same_rw create -f vhdx $args
done
for f in e1 e3 e4 e5; do
    cmp q/$f.vhdx v/$f.vhdx || fail "$f.vhdx left differently"
done
same_rw create -f vhdx -o help

# ---- data: qemu-io writes read by vdisk; vdisk's writes give qemu's file ----
writes=(-c "write -P 0xaa 0 64k" -c "write -P 0xbb 3M 1M"
        -c "write -P 0xcc 2095616 4096" -c "write -P 0xdd 31M 1536"
        -c "write -z 8M 1M" -c "write -P 0xee 17M 512")
for o in subformat=dynamic subformat=fixed \
         subformat=dynamic,block_state_zero=off \
         subformat=fixed,block_state_zero=off,block_size=1M; do
    "$QEMU_IMG" create -q -f vhdx -o $o q.vhdx 33M
    "$VDISK_QEMU_IMG" create -q -f vhdx -o $o v.vhdx 33M
    "$QEMU_IO" -f vhdx "${writes[@]}" q.vhdx >/dev/null
    "$VDISK_QEMU_IO" -f vhdx "${writes[@]}" v.vhdx >/dev/null
    same_bytes q.vhdx v.vhdx
    assert_same_content -f vhdx -F vhdx q.vhdx v.vhdx
    "$QEMU_IMG" check -f vhdx v.vhdx >/dev/null || fail "$o: qemu-img check"
    same check -f vhdx v.vhdx
    same_info -f vhdx v.vhdx
    "$QEMU_IMG" convert -f vhdx -O raw q.vhdx q.raw
    "$VDISK_QEMU_IMG" convert -f vhdx -O raw q.vhdx v.raw
    cmp q.raw v.raw || fail "$o: vdisk reads qemu's image differently"
    "$VDISK_QEMU_IO" -f vhdx -c "read -P 0xbb 3M 1M" -c "read -P 0 8M 1M" \
        -c "read -P 0xdd 31M 1536" q.vhdx > out
    grep -q "^read 1536/1536" out || fail "$o: qemu-io read-back"
    # convert -O vhdx with the same options, from the raw data.
    "$QEMU_IMG" convert -f raw -O vhdx -o $o q.raw qc.vhdx
    "$VDISK_QEMU_IMG" convert -f raw -O vhdx -o $o q.raw vc.vhdx
    assert_same_content -f vhdx -F vhdx qc.vhdx vc.vhdx
    "$QEMU_IMG" check -f vhdx vc.vhdx >/dev/null || fail "$o: convert check"
    rm -f q.vhdx v.vhdx q.raw v.raw qc.vhdx vc.vhdx
done

# Round trip through raw, and vhdx -> qcow2 -> fixed vhdx.
"$QEMU_IMG" create -q -f raw src.raw 20M
"$QEMU_IO" -f raw -c "write -P 0x11 1M 3M" -c "write -P 0x22 17M 2M" \
    src.raw >/dev/null
"$VDISK_QEMU_IMG" convert -f raw -O vhdx src.raw v.vhdx
"$VDISK_QEMU_IMG" convert -f vhdx -O qcow2 v.vhdx v.qcow2
"$VDISK_QEMU_IMG" convert -f qcow2 -O vhdx -o subformat=fixed v.qcow2 vf.vhdx
assert_same_content -f raw -F vhdx src.raw v.vhdx
assert_same_content -f raw -F vhdx src.raw vf.vhdx

# Commands QEMU's vhdx does not have: the same refusals.
"$QEMU_IMG" create -q -f vhdx r.vhdx 16M
split_dirs
cp r.vhdx q/ && cp r.vhdx v/
same check r.vhdx
same measure -O vhdx --size 1G
same measure -O vhdx -f vhdx r.vhdx
same_rw resize -f vhdx r.vhdx 32M
same_rw amend -f vhdx -o block_size=1M r.vhdx

# ---- the log ----
# A clean image with data, then a dirty copy whose log puts BAT entry 1
# back (and zeroes 4 KiB of block 0's data): both tools refuse it
# read-only in the same words, replay it alike at check -r all and at a
# writable open, and leave the same file.
"$QEMU_IMG" create -q -f vhdx clean.vhdx 20M
"$QEMU_IO" -f vhdx -c "write -P 0x11 0 1M" -c "write -P 0x22 9M 64k" \
    clean.vhdx >/dev/null
blk0=$(python3 -c "
import struct,sys
b=open('clean.vhdx','rb').read()
n=struct.unpack_from('<I',b,192*1024+8)[0]
for i in range(n):
    e=192*1024+16+32*i
    if b[e:e+4]==bytes.fromhex('6677c22d'):
        print(struct.unpack_from('<Q',b,struct.unpack_from('<Q',b,e+16)[0])[0] & ~0xfffff)")
cp clean.vhdx dirty.vhdx
python3 vhdx.py dirty dirty.vhdx 1 $((blk0 + 4096))
split_dirs
for f in dirty.vhdx; do cp $f q/ && cp $f v/; done
(cd v && cp dirty.vhdx dirty.orig && same info dirty.vhdx &&
 cmp dirty.vhdx dirty.orig) || fail "read-only open of a dirty log"
same_rw check -r all dirty.vhdx
same_bytes q/dirty.vhdx v/dirty.vhdx
"$QEMU_IMG" convert -O raw q/dirty.vhdx q.raw
"$VDISK_QEMU_IMG" convert -O raw v/dirty.vhdx v.raw
cmp q.raw v.raw || fail "replayed images read differently"
"$QEMU_IO" -c "read -P 0x22 9M 64k" -c "read -P 0 4k 4k" q/dirty.vhdx |
    grep -q "^read 4096/4096" || fail "qemu's replay lost the entry"
# A writable open (qemu-io) replays it too, before its own write.
cp dirty.vhdx q/w.vhdx && cp dirty.vhdx v/w.vhdx
"$QEMU_IO" -c "write -P 0x33 12M 4k" q/w.vhdx >/dev/null
"$VDISK_QEMU_IO" -c "write -P 0x33 12M 4k" v/w.vhdx >/dev/null
same_bytes q/w.vhdx v/w.vhdx
assert_same_content q/w.vhdx v/w.vhdx
"$QEMU_IMG" check v/w.vhdx >/dev/null || fail "replayed image: qemu check"

# A dirty log whose only entry has a bad checksum: QEMU ignores the entry
# (and so reads the block journalled there as zeros); vdisk refuses the
# image naming the entry, whether writable or not, and writes nothing.
cp clean.vhdx logsum.img
python3 vhdx.py dirty logsum.img 1 badsum
check_refused logsum "log.*invalid (bad checksum)" info
check_refused logsum "log.*invalid (bad checksum)" check -r all
# A sequence whose tail names an entry that is not there: no partial
# replay either.
cp dirty.vhdx logtail.img
python3 vhdx.py tail logtail.img 8192
check_refused logtail "active sequence is broken" check -r all

# ---- differencing images ----
# QEMU 7.2 refuses them (ENOTSUP); vdisk reads them over their parent
# (relative_path of the parent locator), block by block and, in a
# partially present block, sector by sector as its bitmap says.
"$QEMU_IMG" create -q -f vhdx par.vhdx 20M
"$QEMU_IO" -c "write -P 0x51 0 20M" par.vhdx >/dev/null
"$QEMU_IMG" create -q -f vhdx -o block_state_zero=off,block_size=8M \
    child.vhdx 20M
"$QEMU_IO" -c "write -P 0x62 1M 2M" -c "write -P 0x63 8M 8M" \
    child.vhdx >/dev/null
"$QEMU_IMG" convert -O raw par.vhdx par.raw
"$QEMU_IMG" convert -O raw child.vhdx child.raw
python3 vhdx.py diff child.vhdx par.vhdx
expect_status 1 "$QEMU_IMG" info child.vhdx
"$VDISK_QEMU_IMG" info child.vhdx > out
grep -q "^backing file: par.vhdx" out || fail "no backing file: $(cat out)"
grep -q "^backing file format: vhdx" out || fail "no backing format"
"$VDISK_QEMU_IMG" convert -O raw child.vhdx diff.raw
python3 - <<'EOF'
p, c, d = (open(f, 'rb').read() for f in ('par.raw', 'child.raw', 'diff.raw'))
M = 1 << 20
want = bytearray(c[:8 * M])                  # block 0: fully present
for s in range(16384, 32768):                # block 1: by the bitmap
    src = c if s & 8 else p
    want += src[s * 512:(s + 1) * 512]
want += p[16 * M:]                           # block 2: not present
assert len(want) == len(d), (len(want), len(d))
assert want == d, 'differencing image read wrongly'
EOF
"$VDISK_QEMU_IMG" map --output=json child.vhdx > out
grep -q '"depth": 1' out || fail "map: nothing from the parent"
expect_status 1 "$VDISK_QEMU_IO" -c "write 0 512" child.vhdx

# ---- corruption corpus ----
"$QEMU_IMG" create -q -f vhdx good.vhdx 24M
"$QEMU_IO" -f vhdx -c "write -P 0x33 0 4M" -c "write -P 0x44 16M 1M" \
    good.vhdx >/dev/null
bad() {   # bad NAME EDIT-ARGS...: a copy of good.vhdx with one edit
    local name=$1
    shift
    cp good.vhdx "$name"
    python3 vhdx.py "$1" "$name" "${@:2}"
}
# One header damaged: the other one is used, as QEMU does.
bad h1.vhdx hdr 1 16 B 0x55 nofix
bad h2.vhdx hdr 2 0 I 0 nofix
for f in h1 h2; do
    same info $f.vhdx
    read_like_qemu $f.vhdx
done
# Refused by both (same error text where QEMU gives one of its own, else
# vdisk names the file and the fault); never a change to the file.
bad hboth.vhdx hdr cur 4 I 1 nofix
python3 vhdx.py hdr hboth.vhdx 1 4 I 1 nofix
python3 vhdx.py hdr hboth.vhdx 2 4 I 1 nofix
bad hver.vhdx hdr 1 66 H 2
python3 vhdx.py hdr hver.vhdx 2 66 H 2
bad logoff.vhdx hdr cur 72 Q 0x12345
bad rtsum.vhdx rt 16 B 0x55 nofix
bad rtcount.vhdx rt 8 I 5000
bad rtmetaovl.vhdx rt 64 Q 0x200000
bad rtlog.vhdx rt 32 Q 0x100000
bad metasig.vhdx meta 0 B 0x4e
bad metacount.vhdx meta 10 H 3000
bad metaoff.vhdx meta 48 I 0x7fff0000
bad bsize.vhdx meta 0x10000 I 0x300000
bad lsector.vhdx meta 0x10020 I 1024
bad vsize.vhdx meta 0x10008 Q 0x7fffffffffffffff
bad hasparent.vhdx meta 0x10004 I 2
bad batpast.vhdx bat 0 0x40000006
bad batend.vhdx bat 2 0x1600006
bad batovl.vhdx bat 0 0x200006
bad batstate.vhdx bat 1 0x4
bad batpartial.vhdx bat 1 0x1000007
for f in hboth hver logoff rtsum rtcount rtmetaovl rtlog metasig \
         metacount metaoff bsize lsector vsize hasparent batpast batend \
         batovl batstate batpartial; do
    cp $f.vhdx $f.orig
    read_like_qemu $f.vhdx
    expect_status 1 "$VDISK_QEMU_IO" -c "write 0 512" $f.vhdx
    cmp $f.vhdx $f.orig || fail "$f.vhdx changed"
done
# vdisk's stricter refusals of what QEMU reads (a BAT past the end of the
# file reads as zeros there; regions off the 1 MiB grid the specification
# requires).
bad rtbatpast.img rt 32 Q 0x10000000000
check_refused rtbatpast "BAT at 0x10000000000.*past the end of the file" info
bad rtalign.img rt 32 Q 0x280000
check_refused rtalign "BAT at 0x280000.*not 1 MiB aligned" info
# check on BAT faults: the same report as qemu-img's.
for f in batpast batovl; do
    same check $f.vhdx
done
# Two BAT entries on the same block: QEMU opens it and its writes would
# mix the two; vdisk refuses to open it.
bad batdup.img bat 1 "$(python3 -c "
import struct
b=open('good.vhdx','rb').read()
n=struct.unpack_from('<I',b,192*1024+8)[0]
for i in range(n):
    e=192*1024+16+32*i
    if b[e:e+4]==bytes.fromhex('6677c22d'):
        print(struct.unpack_from('<Q',b,struct.unpack_from('<Q',b,e+16)[0])[0])")"
check_refused batdup "BAT entries 0 and 1 overlap" info
