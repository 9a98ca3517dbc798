#!/usr/bin/env bash
# vdisk du: space per snapshot, layer, bitmap and for metadata, from
# metadata alone. The referees, all computed at test time:
#  - the clusters in use: refcounts read straight from the file by the
#    parser below (header, refcount table, refcount blocks: qcow2.txt),
#    with qemu-img check confirming there are no leaks or corruptions,
#    so that "refcount > 0" is exactly "referenced" (and the clusters of
#    the file with refcount 0 are the unused ones);
#  - a snapshot's exclusive bytes: what `qemu-img snapshot -d` of it
#    gives back on a copy (clusters in use before minus after); a
#    bitmap's: what `qemu-img bitmap --remove` gives back;
#  - the active layer's mapped bytes: qemu-img check's allocated-clusters
#    and the clusters qemu-img map shows at depth 0 with an offset;
#  - leaks: qemu-img check's leaks; raw: st_blocks and qemu-img map.
# Images are randomized (the seed is printed); each run checks the sums.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io python3
tmpdir

seed=${DU_SEED:-$RANDOM}
echo "du.sh: seed $seed"
RANDOM=$seed

# refcounts IMG: bytes of the clusters whose refcount is not 0, then
# bytes of the clusters inside the file whose refcount is 0.
refcounts()
{
    python3 - "$1" <<'EOF'
import struct, sys
f = open(sys.argv[1], "rb")
h = f.read(112)
(magic, ver, _, _, cbits, _, _, _, _, rto, rtc, _, _) = \
    struct.unpack(">IIQIIQIIQQIIQ", h[:72])
assert magic == 0x514649fb
order = struct.unpack(">I", h[96:100])[0] if ver >= 3 else 4
cs, bits = 1 << cbits, 1 << order
f.seek(rto)
raw = f.read(rtc * cs).ljust(rtc * cs, b"\0")
f.seek(0, 2)
fc = (f.tell() + cs - 1) // cs
n = inside = 0
per_block = cs * 8 // bits
for b, e in enumerate(struct.unpack(">%dQ" % (rtc * cs // 8), raw)):
    off = e & ~0x1ff
    if not off:
        continue
    f.seek(off)
    blk = f.read(cs).ljust(cs, b"\0")
    if bits >= 8:
        w = bits // 8
        used = [i // w for i in range(0, cs, w) if any(blk[i:i + w])]
    else:
        v = int.from_bytes(blk, "little")
        used = [i for i in range(per_block) if (v >> (i * bits)) &
                ((1 << bits) - 1)]
    n += len(used)
    inside += sum(1 for i in used if b * per_block + i < fc)
print(n * cs, (fc - inside) * cs)
EOF
}
used_bytes() { refcounts "$1" | cut -d' ' -f1; }

# jq-less JSON access: field EXPR of the JSON file (python expression
# over j, the parsed file).
jget()
{
    python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"
}

# check_sums DU.json IMG: the rows add up to the clusters in use.
check_sums()
{
    local du=$1 img=$2 used free
    read -r used free < <(refcounts "$img")
    $QEMU_IMG check --output=json "$img" > check.json ||
        fail "qemu-img check of $img: $(cat check.json)"
    test "$(jget check.json 'j.get("leaks", 0) + j.get("corruptions", 0)')" = 0 ||
        fail "$img is not clean: $(cat check.json)"
    python3 - "$du" "$used" check.json "$free" <<'EOF' || fail "sums of $img"
import json, sys
d = json.load(open(sys.argv[1])); used = int(sys.argv[2])
c = json.load(open(sys.argv[3])); free = int(sys.argv[4])
cs = d["cluster-size"]
excl = sum(r["exclusive"] for r in d["rows"])
if excl + d["shared"] != d["allocated"] + d["leaked"]:
    sys.exit("rows: exclusive %d + shared %d != allocated %d" %
             (excl, d["shared"], d["allocated"]))
if d["allocated"] != used:
    sys.exit("allocated %d, clusters with a refcount %d" % (d["allocated"], used))
if d["unused"] != free:
    sys.exit("unused %d, clusters in the file without a refcount %d" %
             (d["unused"], free))
for r in d["rows"]:
    if r["used"] != r["exclusive"] + r["shared"]:
        sys.exit("row %r: used != exclusive + shared" % r)
act = [r for r in d["rows"] if r["type"] == "active"][0]
if act["mapped"] != c["allocated-clusters"] * cs:
    sys.exit("active mapped %d, qemu-img check allocated-clusters %d * %d"
             % (act["mapped"], c["allocated-clusters"], cs))
EOF
}

# check_freed DU.json IMG SNAP...: each snapshot's exclusive bytes are
# what `qemu-img snapshot -d` of it frees on a copy (left in copy.qcow2
# for the last one).
check_freed()
{
    local du=$1 img=$2 s before freed excl
    shift 2
    before=$(used_bytes "$img")
    for s in "$@"; do
        cp "$img" copy.qcow2
        $QEMU_IMG snapshot -d "$s" copy.qcow2
        freed=$(( before - $(used_bytes copy.qcow2) ))
        excl=$(jget "$du" "[r['exclusive'] for r in j['rows'] if r.get('name') == '$s'][0]")
        test "$freed" = "$excl" ||
            fail "$img, snapshot $s: exclusive $excl, snapshot -d frees $freed"
    done
}

# map_bytes IMG: the clusters qemu-img map shows in IMG's own layer with
# a host offset, times the cluster size.
map_bytes()
{
    $QEMU_IMG map --output=json "$1" > map.json
    python3 - map.json "$2" <<'EOF'
import json, sys
cs = int(sys.argv[2]); cl = set()
for e in json.load(open(sys.argv[1])):
    if e["depth"] == 0 and "offset" in e:
        cl.update(range(e["start"] // cs, (e["start"] + e["length"] - 1) // cs + 1))
print(len(cl) * cs)
EOF
}

# random_io IMG SIZE_MB N: N random writes, overwrites, zero writes and
# discards of up to 256k.
random_io()
{
    local img=$1 mb=$2 n=$3 cmds=() i off len op
    for ((i = 0; i < n; i++)); do
        off=$(( (RANDOM % (mb * 64)) * 16384 ))
        len=$(( (RANDOM % 16 + 1) * 16384 ))
        if [ $((off + len)) -gt $((mb << 20)) ]; then
            len=$(( (mb << 20) - off ))
        fi
        op=$((RANDOM % 8))
        case $op in
        0) cmds+=(-c "discard $off $len") ;;
        1) cmds+=(-c "write -z $off $len") ;;
        *) cmds+=(-c "write -P $((RANDOM % 255 + 1)) $off $len") ;;
        esac
    done
    $QEMU_IO "${cmds[@]}" "$img" > /dev/null
}

# ---- snapshots and bitmaps, randomized ----
$QEMU_IMG create -q -f qcow2 img.qcow2 32M
random_io img.qcow2 32 12
for s in 1 2 3 4; do
    $QEMU_IMG snapshot -c "s$s" img.qcow2
    random_io img.qcow2 32 10
done
$QEMU_IMG bitmap --add img.qcow2 b0
random_io img.qcow2 32 6
$QEMU_IMG bitmap --add -g 128k img.qcow2 b1
random_io img.qcow2 32 6
sha=$(sha256sum < img.qcow2)
$VDISK du --output=json img.qcow2 > du.json
test "$(sha256sum < img.qcow2)" = "$sha" || fail "du changed the image"
check_sums du.json img.qcow2
cs=$(jget du.json 'j["cluster-size"]')
test "$(jget du.json '[r["type"] for r in j["rows"]]')" = \
    "['active', 'snapshot', 'snapshot', 'snapshot', 'snapshot', 'bitmap', 'bitmap', 'metadata']" ||
    fail "rows: $(cat du.json)"
act=$(jget du.json '[r["used"] - r["tables"] for r in j["rows"] if r["type"] == "active"][0]')
want=$(map_bytes img.qcow2 "$cs")
test "$act" = "$want" || fail "active data $act, qemu-img map $want"

# Each snapshot's exclusive bytes are what deleting it gives back.
check_freed du.json img.qcow2 s1 s2 s3 s4
# ... and then the accounting of what is left still adds up.
$VDISK du --output=json copy.qcow2 > du2.json
check_sums du2.json copy.qcow2
# A bitmap's exclusive bytes: its clusters, which removing it gives back,
# and its directory entry (the directory, rewritten, keeps its size).
before=$(used_bytes img.qcow2)
for b in b0 b1; do
    cp img.qcow2 copy.qcow2
    $QEMU_IMG bitmap --remove copy.qcow2 "$b"
    freed=$(( before - $(used_bytes copy.qcow2) ))
    excl=$(jget du.json "[r['exclusive'] - r['exclusive'] % $cs for r in j['rows'] if r.get('name') == '$b'][0]")
    test "$freed" = "$excl" ||
        fail "bitmap $b: exclusive clusters $excl, --remove frees $freed"
done

# The human table: rbd du's columns and a total.
$VDISK du img.qcow2 > human
head -n 1 human | grep -q '^NAME  *PROVISIONED  *USED  *EXCLUSIVE  *SHARED$' ||
    fail "human header: $(head -n 1 human)"
grep -q '^img.qcow2@s3 ' human || fail "no snapshot row: $(cat human)"
grep -q '^<bitmap b1> ' human || fail "no bitmap row: $(cat human)"
grep -q '^<TOTAL> ' human || fail "no total: $(cat human)"

# ---- compressed clusters (packed, several to a host cluster) ----
$QEMU_IMG create -q -f raw src.raw 16M
random_io src.raw 16 20
$QEMU_IMG convert -c -O qcow2 -o cluster_size=4k src.raw comp.qcow2
$QEMU_IMG snapshot -c c1 comp.qcow2
random_io comp.qcow2 16 8
$QEMU_IMG snapshot -c c2 comp.qcow2
random_io comp.qcow2 16 4
$VDISK du --output=json comp.qcow2 > du.json
check_sums du.json comp.qcow2
check_freed du.json comp.qcow2 c1 c2

# ---- a chain of three layers: each accounted in its own file ----
$QEMU_IMG create -q -f qcow2 base.qcow2 16M
random_io base.qcow2 16 10
$QEMU_IMG create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2
random_io mid.qcow2 16 6
$QEMU_IMG snapshot -c m1 mid.qcow2
random_io mid.qcow2 16 4
$QEMU_IMG create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
random_io top.qcow2 16 6
$VDISK du --backing-chain --output=json top.qcow2 > chain.json
test "$(jget chain.json '[x["filename"] for x in j]')" = \
    "['top.qcow2', 'mid.qcow2', 'base.qcow2']" || fail "layers: $(cat chain.json)"
i=0
for layer in top mid base; do
    jget chain.json "json.dumps(j[$i])" > layer.json
    check_sums layer.json $layer.qcow2
    act=$(jget layer.json '[r["used"] - r["tables"] for r in j["rows"] if r["type"] == "active"][0]')
    want=$(map_bytes $layer.qcow2 65536)
    test "$act" = "$want" || fail "$layer: active data $act, qemu-img map $want"
    i=$((i + 1))
done
# Without --backing-chain: the top alone (one object).
test "$($VDISK du --output=json top.qcow2 | jget /dev/stdin 'j["filename"]')" = \
    top.qcow2 || fail "du without --backing-chain"
$VDISK du --backing-chain top.qcow2 > human
grep -q '^LAYER  *PROVISIONED  *USED$' human || fail "no layer table: $(cat human)"
test "$(sed -n '/^LAYER/,$p' human | wc -l)" = 5 || fail "layer rows: $(cat human)"

# ---- leaked clusters: a cluster past the data given a refcount ----
$QEMU_IMG create -q -f qcow2 leak.qcow2 4M
$QEMU_IO -c 'write 0 256k' leak.qcow2 > /dev/null
python3 - leak.qcow2 <<'EOF'
import struct, sys
f = open(sys.argv[1], "r+b")
h = f.read(104)
cbits = struct.unpack(">I", h[20:24])[0]; cs = 1 << cbits
rto = struct.unpack(">Q", h[48:56])[0]
f.seek(0, 2); end = f.tell(); end = (end + cs - 1) // cs * cs
f.truncate(end + 2 * cs)                # two clusters nothing uses
f.seek(rto); rb = struct.unpack(">Q", f.read(8))[0]
for k in (end // cs, end // cs + 1):
    f.seek(rb + 2 * k); f.write(struct.pack(">H", 1))
EOF
$VDISK du --output=json leak.qcow2 > du.json
$QEMU_IMG check --output=json leak.qcow2 > check.json || true
want=$(( $(jget check.json 'j["leaks"]') * $(jget du.json 'j["cluster-size"]') ))
test "$(jget du.json 'j["leaked"]')" = "$want" || fail "leaked: $(cat du.json)"
test "$(jget du.json '[r["exclusive"] for r in j["rows"] if r["type"] == "leaked"]')" = \
    "[$want]" || fail "leaked row: $(cat du.json)"

# ---- an encrypted image: the LUKS header is metadata; no key needed ----
$QEMU_IMG create -q --object secret,id=k,data=pw -f qcow2 \
    -o encrypt.format=luks,encrypt.key-secret=k,encrypt.iter-time=10 enc.qcow2 4M
$QEMU_IO --object secret,id=k,data=pw --image-opts -c 'write 0 256k' \
    driver=qcow2,file.filename=enc.qcow2,encrypt.key-secret=k > /dev/null
$VDISK du --output=json enc.qcow2 > du.json
test "$(jget du.json 'j["allocated"]')" = "$(used_bytes enc.qcow2)" ||
    fail "encrypted: $(cat du.json)"

# ---- raw: one row, the file's allocation and block status ----
$QEMU_IMG create -q -f raw r.raw 8M
$QEMU_IO -f raw -c 'write 1M 300k' -c 'write 6M 64k' r.raw > /dev/null
$VDISK du --output=json -f raw r.raw > du.json
test "$(jget du.json '[r["type"] for r in j["rows"]]')" = "['image']" ||
    fail "raw rows: $(cat du.json)"
test "$(jget du.json 'j["rows"][0]["used"]')" = "$(( $(stat -c %b r.raw) * $(stat -c %B r.raw) ))" ||
    fail "raw used vs st_blocks: $(cat du.json)"
$QEMU_IMG map -f raw --output=json r.raw > map.json
want=$(jget map.json 'sum(e["length"] for e in j if e["data"])')
test "$(jget du.json 'j["rows"][0]["mapped"]')" = "$want" ||
    fail "raw mapped, qemu-img map says $want: $(cat du.json)"

# ---- errors: exit 1, the file and the fault named, nothing written ----
expect_status 1 $VDISK du nosuch.qcow2 2> err
grep -q "nosuch.qcow2" err || fail "message: $(cat err)"
# An L2 table past the end of the file.
cp img.qcow2 bad.qcow2
python3 - bad.qcow2 <<'EOF'
import struct, sys
f = open(sys.argv[1], "r+b")
h = f.read(104)
l1o = struct.unpack(">Q", h[40:48])[0]
f.seek(l1o); f.write(struct.pack(">Q", (1 << 63) | (1 << 40)))
EOF
sha=$(sha256sum < bad.qcow2)
expect_status 1 $VDISK du bad.qcow2 2> err
grep -q "bad.qcow2: L2 table at offset 0x10000000000 .*past the end of the file" err ||
    fail "message: $(cat err)"
test "$(sha256sum < bad.qcow2)" = "$sha" || fail "du changed a damaged image"
# A misaligned refcount block.
cp leak.qcow2 bad.qcow2
python3 - bad.qcow2 <<'EOF'
import struct, sys
f = open(sys.argv[1], "r+b")
h = f.read(104)
rto = struct.unpack(">Q", h[48:56])[0]
f.seek(rto); rb = struct.unpack(">Q", f.read(8))[0]
f.seek(rto); f.write(struct.pack(">Q", rb + 512))
EOF
sha=$(sha256sum < bad.qcow2)
expect_status 1 $VDISK du bad.qcow2 2> err
grep -q "bad.qcow2" err || fail "message: $(cat err)"
test "$(sha256sum < bad.qcow2)" = "$sha" || fail "du changed a damaged image"
expect_status 1 $VDISK du 2> err
expect_status 1 $VDISK du --output=xml img.qcow2 2> err
exit 0
