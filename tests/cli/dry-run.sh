#!/usr/bin/env bash
# --dry-run of commit, rebase (safe and -u), amend, resize, snapshot -d/-a:
# the figures a dry run prints agree with what the real run then does,
# measured by QEMU's tools (qemu-img map, info, and the refcounts of the
# file after qemu-img's own snapshot -d/-a), and a dry run leaves every
# file of the chain byte-identical. Bad input fails as the real command
# fails, writing nothing; under qemu-img's name --dry-run is unknown.
# (amend: the options that change equal qemu-img info's before/after.)
# Images get randomized content (cluster-aligned writes of random
# patterns at random offsets; the seed is printed).
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io python3
tmpdir

SEED=${DRY_RUN_SEED:-$RANDOM}
echo "seed $SEED"
RANDOM=$SEED
CL=65536

# vsize FILE: the virtual size qemu-img info reports.
vsize()
{
    $QEMU_IMG info --output=json "$1" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])'
}

# sums FILE...: their sha256 sums, one line.
sums() { sha256sum "$@" | tr '\n' ' '; }

# unchanged BEFORE FILE...: fails when a file's sha256 changed.
unchanged()
{
    local before=$1
    shift
    [ "$(sums "$@")" = "$before" ] ||
        fail "a dry run changed a file: $before / $(sums "$@")"
}

# jget FILE KEY: a top-level member of a JSON object.
jget()
{
    python3 -c 'import json,sys
v = json.load(open(sys.argv[1]))[sys.argv[2]]
print(json.dumps(v) if isinstance(v, (dict, list, bool)) or v is None else v)' "$1" "$2"
}

# used FILE: bytes of the clusters whose refcount is not 0 (qcow2),
# read from the file's refcount table and blocks.
used()
{
    python3 - "$1" <<'EOF'
import struct, sys
f = open(sys.argv[1], "rb")
h = f.read(104)
version = struct.unpack(">I", h[4:8])[0]
cs = 1 << struct.unpack(">I", h[20:24])[0]
rt_off, rt_clusters = struct.unpack(">QI", h[48:60])
order = struct.unpack(">I", h[96:100])[0] if version >= 3 else 4
bits = 1 << order
f.seek(rt_off)
table = struct.unpack(">%dQ" % (rt_clusters * cs // 8), f.read(rt_clusters * cs))
n = 0
for e in table:
    e &= 0x00fffffffffffe00
    if not e:
        continue
    f.seek(e)
    blk = f.read(cs)
    if bits >= 8:
        fmt = {8: "B", 16: "H", 32: "I", 64: "Q"}[bits]
        n += sum(1 for r in struct.unpack(">%d%s" % (cs * 8 // bits, fmt), blk) if r)
    else:
        for byte in blk:
            for k in range(8 // bits):
                if (byte >> (8 - (k + 1) * bits)) & ((1 << bits) - 1):
                    n += 1
print(n * cs)
EOF
}

# map_bytes FILE MAXDEPTH [START]: bytes qemu-img map says are present at
# a depth below MAXDEPTH (from START on).
map_bytes()
{
    $QEMU_IMG map --output=json ${3:+--start-offset=$3} "$1" |
        python3 -c 'import json,sys
d = int(sys.argv[1])
print(sum(e["length"] for e in json.load(sys.stdin)
          if e["depth"] < d and e["present"]))' "$2"
}

# map_data FILE START: bytes with "data": true at depth 0 from START on.
map_data()
{
    $QEMU_IMG map --output=json --start-offset="$2" "$1" |
        python3 -c 'import json,sys
print(sum(e["length"] for e in json.load(sys.stdin)
          if e["depth"] == 0 and e["data"]))'
}

# scribble FILE COUNT LOW HIGH: COUNT random cluster writes of random
# patterns (LOW..HIGH) at random cluster offsets of the first 64 MiB.
# Prints the cluster indexes written.
scribble()
{
    local f=$1 n=$2 lo=$3 hi=$4 args=() i c len
    for ((i = 0; i < n; i++)); do
        c=$((RANDOM % 1000))
        len=$((1 + RANDOM % 3))
        [ $((c + len)) -le 1024 ] || len=1
        args+=(-c "write -P $((lo + RANDOM % (hi - lo + 1))) $((c * CL)) $((len * CL))")
        seq "$c" $((c + len - 1))
    done
    $QEMU_IO "${args[@]}" "$f" >/dev/null
}

# make_chain BASE MID TOP N1 N2 N3: a 64 MiB qcow2 chain, each layer
# scribbled on N times with patterns of its own.
make_chain()
{
    $QEMU_IMG create -q -f qcow2 "$1" 64M
    scribble "$1" "$4" 1 60 >/dev/null
    $QEMU_IMG create -q -f qcow2 -b "$1" -F qcow2 "$2"
    scribble "$2" "$5" 61 120 >/dev/null
    $QEMU_IMG create -q -f qcow2 -b "$2" -F qcow2 "$3"
    scribble "$3" "$6" 121 180 >/dev/null
}

# same_error NAME VDISK-ARGS -- QEMU-ARGS: both fail with status 1 and the
# same message (program names aside).
same_error()
{
    local name=$1
    shift
    local v=() q=()
    while [ "$1" != -- ]; do v+=("$1"); shift; done
    shift
    q=("$@")
    expect_status 1 $VDISK "${v[@]}" 2>"$name.v" >/dev/null
    expect_status 1 $QEMU_IMG "${q[@]}" 2>"$name.q" >/dev/null
    sed -i "s/^vdisk: /qemu-img: /; s/'vdisk /'qemu-img /" "$name.v"
    diff -u "$name.q" "$name.v" || fail "$name: messages differ"
}

# ---- commit ----
make_chain base.qcow2 mid.qcow2 top.qcow2 20 15 15
$QEMU_IO -c "write -z $(((RANDOM % 1000) * CL)) $CL" top.qcow2 >/dev/null
chain=(base.qcow2 mid.qcow2 top.qcow2)
before=$(sums "${chain[@]}")

$VDISK commit --dry-run --output=json top.qcow2 >c1.json
unchanged "$before" "${chain[@]}"
[ "$(jget c1.json bytes)" = "$(map_bytes top.qcow2 1)" ] ||
    fail "commit: bytes $(jget c1.json bytes) != qemu-img map's $(map_bytes top.qcow2 1)"
[ "$(jget c1.json base)" = mid.qcow2 ] || fail "commit: base $(jget c1.json base)"
[ "$(jget c1.json top-emptied)" = true ] || fail "commit: top not emptied"
[ "$(jget c1.json base-grows)" = false ] || fail "commit: base grows"
$VDISK commit --dry-run top.qcow2 >c1.txt
grep -q "^Would copy: .*($(jget c1.json bytes) bytes) in $(jget c1.json extent-count) extent" c1.txt ||
    fail "commit: human output: $(cat c1.txt)"
grep -q "^Top: would be emptied" c1.txt || fail "commit: $(cat c1.txt)"

$VDISK commit --dry-run -b base.qcow2 --output=json top.qcow2 >c2.json
unchanged "$before" "${chain[@]}"
[ "$(jget c2.json bytes)" = "$(map_bytes top.qcow2 2)" ] ||
    fail "commit -b: bytes $(jget c2.json bytes) != qemu-img map's $(map_bytes top.qcow2 2)"
[ "$(jget c2.json top-emptied)" = false ] || fail "commit -b: top emptied"
$VDISK commit --dry-run -d --output=json top.qcow2 >c3.json
[ "$(jget c3.json top-emptied)" = false ] || fail "commit -d: top emptied"
unchanged "$before" "${chain[@]}"

# The real commit then writes exactly the extents into the base: what
# the base holds itself afterwards (qemu-img map, depth 0) covers them.
$QEMU_IMG map --output=json mid.qcow2 >mid-before.json
$QEMU_IMG commit -q top.qcow2
$QEMU_IMG map --output=json mid.qcow2 >mid-after.json
python3 - c1.json mid-before.json mid-after.json <<'EOF' || fail "commit: the real commit wrote elsewhere"
import json, sys
plan = json.load(open(sys.argv[1]))["extents"]
after = set()
for e in json.load(open(sys.argv[3])):
    if e["depth"] == 0 and e["present"]:
        after.update(range(e["start"] // 512, (e["start"] + e["length"]) // 512))
for e in plan:
    if not set(range(e["start"] // 512, (e["start"] + e["length"]) // 512)) <= after:
        sys.exit("extent %r not in the base after the commit" % e)
EOF

# A top larger than its base: the base would grow to the top's size.
$QEMU_IMG create -q -f qcow2 -b mid.qcow2 -F qcow2 big.qcow2 96M
scribble big.qcow2 5 181 200 >/dev/null
before=$(sums base.qcow2 mid.qcow2 big.qcow2)
$VDISK commit --dry-run --output=json big.qcow2 >c4.json
unchanged "$before" base.qcow2 mid.qcow2 big.qcow2
[ "$(jget c4.json base-grows)" = true ] || fail "commit: base does not grow"
$QEMU_IMG commit -q big.qcow2
[ "$(jget c4.json base-new-size)" = "$(vsize mid.qcow2)" ] ||
    fail "commit: base-new-size $(jget c4.json base-new-size) != $(vsize mid.qcow2)"

# ---- rebase ----
make_chain rb.qcow2 rm.qcow2 rt.qcow2 20 20 10
chain=(rb.qcow2 rm.qcow2 rt.qcow2)
before=$(sums "${chain[@]}")
$VDISK rebase --dry-run --output=json -b rb.qcow2 -F qcow2 rt.qcow2 >r1.json
$VDISK rebase --dry-run -b rb.qcow2 -F qcow2 rt.qcow2 >r1.txt
unchanged "$before" "${chain[@]}"
grep -q "^Backing file: rm.qcow2 (qcow2) -> rb.qcow2 (qcow2)" r1.txt ||
    fail "rebase: $(cat r1.txt)"
# qemu-img's own rebase on a copy: what it newly allocates in the
# overlay is what the dry run said would be written.
cp rt.qcow2 rt2.qcow2
$QEMU_IMG map --output=json rt2.qcow2 >rt-before.json
$QEMU_IMG rebase -q -b rb.qcow2 -F qcow2 rt2.qcow2
$QEMU_IMG map --output=json rt2.qcow2 >rt-after.json
python3 - r1.json rt-before.json rt-after.json <<'EOF' || fail "rebase: extents differ from what qemu-img rebase wrote"
import json, sys
def owned(p):
    s = set()
    for e in json.load(open(p)):
        if e["depth"] == 0 and e["present"]:
            s.update(range(e["start"] // 512, (e["start"] + e["length"]) // 512))
    return s
new = owned(sys.argv[3]) - owned(sys.argv[2])
plan = set()
for e in json.load(open(sys.argv[1]))["extents"]:
    plan.update(range(e["start"] // 512, (e["start"] + e["length"]) // 512))
if new != plan:
    sys.exit("qemu-img wrote %d sectors, the dry run said %d" % (len(new), len(plan)))
EOF
$QEMU_IMG compare -q rt.qcow2 rt2.qcow2 || fail "rebase: the copy reads differently"

# -u: only the header, old -> new.
$VDISK rebase --dry-run -u --output=json -b other.qcow2 -F raw rt.qcow2 >r2.json
unchanged "$before" "${chain[@]}"
[ "$(jget r2.json old-backing)" = '{"filename": "rm.qcow2", "format": "qcow2"}' ] ||
    fail "rebase -u: old $(jget r2.json old-backing)"
[ "$(jget r2.json bytes)" = 0 ] || fail "rebase -u: bytes"
$QEMU_IMG rebase -u -b other.qcow2 -F raw rt2.qcow2
$QEMU_IMG info --output=json rt2.qcow2 | python3 -c 'import json,sys
i = json.load(sys.stdin)
print(json.dumps({"filename": i["backing-filename"],
                  "format": i["backing-filename-format"]}))' >info.json
[ "$(cat info.json)" = "$(jget r2.json new-backing)" ] ||
    fail "rebase -u: new $(jget r2.json new-backing) != qemu-img info's $(cat info.json)"

# ---- resize ----
$QEMU_IMG create -q -f qcow2 rs.qcow2 64M
scribble rs.qcow2 30 1 200 >/dev/null
new=$(((8 + RANDOM % 48) * 1048576))
before=$(sums rs.qcow2)
$VDISK resize --dry-run --shrink --output=json rs.qcow2 $new >z1.json
unchanged "$before" rs.qcow2
[ "$(jget z1.json old-size)" = 67108864 ] || fail "resize: old-size"
[ "$(jget z1.json data-beyond-end)" = "$(map_data rs.qcow2 $new)" ] ||
    fail "resize: data beyond $new: $(jget z1.json data-beyond-end) != qemu-img map's $(map_data rs.qcow2 $new)"
# Without --shrink: qemu-img's refusal, nothing written.
same_error shrink resize --dry-run rs.qcow2 $new -- resize rs.qcow2 $new
unchanged "$before" rs.qcow2
# The driver's refusals: qemu-img's messages.
same_error odd resize --dry-run rs.qcow2 1000 -- resize rs.qcow2 1000
$QEMU_IMG create -q -f qcow2 -o compat=0.10 v2.qcow2 1M
$QEMU_IMG snapshot -c s v2.qcow2
same_error v2 resize --dry-run v2.qcow2 2M -- resize v2.qcow2 2M
unchanged "$before" rs.qcow2
cp rs.qcow2 rs2.qcow2
$QEMU_IMG resize -q --shrink rs2.qcow2 $new
[ "$(jget z1.json new-size)" = "$(vsize rs2.qcow2)" ] || fail "resize: new-size"
$VDISK resize --dry-run --output=json rs.qcow2 +1G >z2.json
unchanged "$before" rs.qcow2
$QEMU_IMG resize -q rs2.qcow2 $((new + 1073741824))
[ "$(jget z2.json new-size)" = $((67108864 + 1073741824)) ] || fail "resize: grow"

# ---- amend ----
$QEMU_IMG create -q -f qcow2 -o compat=1.1,lazy_refcounts=on am.qcow2 64M
scribble am.qcow2 10 1 200 >/dev/null
before=$(sums am.qcow2)
# info_opts FILE: compat, lazy_refcounts, refcount_bits and size as
# qemu-img info reports them, one "name=value" a line.
info_opts()
{
    $QEMU_IMG info --output=json "$1" | python3 -c 'import json,sys
i = json.load(sys.stdin); d = i["format-specific"]["data"]
print("compat=%s" % d["compat"])
print("lazy_refcounts=%s" % ("on" if d.get("lazy-refcounts") else "off"))
print("refcount_bits=%d" % d["refcount-bits"])
print("size=%d" % i["virtual-size"])'
}
for o in "compat=0.10,lazy_refcounts=off" "refcount_bits=64,size=128M" \
        "compat=1.1"; do
    $VDISK amend --dry-run --output=json -o "$o" am.qcow2 >am.json
    unchanged "$before" am.qcow2
    cp am.qcow2 am2.qcow2
    info_opts am2.qcow2 >info-before
    $QEMU_IMG amend -o "$o" am2.qcow2
    info_opts am2.qcow2 >info-after
    # What qemu-img changed, as "name: old -> new".
    join -t= info-before info-after | awk -F= '$2 != $3 { print $1 ": " $2 " -> " $3 }' >expect
    python3 -c 'import json,sys
for c in json.load(open(sys.argv[1]))["changes"]:
    print("%s: %s -> %s" % (c["option"], c["old"], c["new"]))' am.json | sort >got
    sort expect | diff -u - got || fail "amend -o $o: changes differ from qemu-img's"
done
# Refusals: qemu-img's messages, nothing written.
same_error am1 amend --dry-run -o backing_file=x am.qcow2 -- amend -o backing_file=x am.qcow2
same_error am2 amend --dry-run -o compat=0.10,refcount_bits=8 am.qcow2 -- \
    amend -o compat=0.10,refcount_bits=8 am.qcow2
same_error am3 amend --dry-run -o nosuch=1 am.qcow2 -- amend -o nosuch=1 am.qcow2
same_error am4 amend --dry-run -o compat=0.9 am.qcow2 -- amend -o compat=0.9 am.qcow2
unchanged "$before" am.qcow2

# ---- snapshots ----
$QEMU_IMG create -q -f qcow2 sn.qcow2 64M
scribble sn.qcow2 25 1 40 >/dev/null
declare -A since
for s in 1 2 3; do
    $QEMU_IMG snapshot -c s$s sn.qcow2
    since[$s]=""
    w=$(scribble sn.qcow2 $((3 + RANDOM % 8)) $((40 * s + 1)) $((40 * s + 40)))
    for t in $(seq 1 $s); do since[$t]+=" $w"; done
done
before=$(sums sn.qcow2)
used_before=$(used sn.qcow2)
for s in 1 2 3; do
    $VDISK snapshot --dry-run --output=json -d s$s sn.qcow2 >d$s.json
    $VDISK snapshot --dry-run -d s$s sn.qcow2 >d$s.txt
    unchanged "$before" sn.qcow2
    cp sn.qcow2 sd.qcow2
    $QEMU_IMG snapshot -d s$s sd.qcow2
    freed=$(( used_before - $(used sd.qcow2) ))
    [ "$(jget d$s.json freed)" = "$freed" ] ||
        fail "snapshot -d s$s: freed $(jget d$s.json freed) != $freed"
    grep -q "would free .*($freed bytes)" d$s.txt || fail "$(cat d$s.txt)"

    $VDISK snapshot --dry-run --output=json -a s$s sn.qcow2 >a$s.json
    unchanged "$before" sn.qcow2
    changed=$(( $(echo ${since[$s]} | tr ' ' '\n' | sort -u | wc -l) * CL ))
    [ "$(jget a$s.json changed)" = "$changed" ] ||
        fail "snapshot -a s$s: changed $(jget a$s.json changed) != $changed"
    cp sn.qcow2 sa.qcow2
    $QEMU_IMG snapshot -a s$s sa.qcow2
    freed=$(( used_before - $(used sa.qcow2) ))
    [ "$(jget a$s.json freed)" = "$freed" ] ||
        fail "snapshot -a s$s: freed $(jget a$s.json freed) != $freed"
done
# Unknown snapshots: qemu-img's messages, nothing written.
same_error del snapshot --dry-run -d nope sn.qcow2 -- snapshot -d nope sn.qcow2
same_error apply snapshot --dry-run -a nope sn.qcow2 -- snapshot -a nope sn.qcow2
unchanged "$before" sn.qcow2
# A format without snapshots (read-only: no warning about probed raw).
$QEMU_IMG create -q -f raw r.raw 1M
expect_status 1 $VDISK snapshot --dry-run -d x r.raw 2>err
[ "$(cat err)" = "vdisk: Could not delete snapshot 'x': snapshot not found" ] ||
    fail "raw: $(cat err)"

# ---- bad input ----
before=$(sums top.qcow2 mid.qcow2 base.qcow2 rt.qcow2)
same_error badbase commit --dry-run -b nope.qcow2 top.qcow2 -- \
    commit -b nope.qcow2 top.qcow2
same_error badfmt rebase --dry-run -b rb.qcow2 -F nofmt rt.qcow2 -- \
    rebase -b rb.qcow2 -F nofmt rt.qcow2
expect_status 1 $VDISK commit --dry-run --output=xml top.qcow2 2>err
grep -q "output must be used with human or json" err || fail "$(cat err)"
expect_status 1 $VDISK snapshot --dry-run -c new sn.qcow2 2>/dev/null
unchanged "$before" top.qcow2 mid.qcow2 base.qcow2 rt.qcow2
# Under qemu-img's name --dry-run is an unknown option, as in QEMU.
before=$(sums sn.qcow2)
for args in "commit --dry-run sn.qcow2" "resize --shrink --dry-run sn.qcow2 1M" \
        "snapshot --dry-run -d s1 sn.qcow2" "rebase --dry-run -u -b x sn.qcow2" \
        "amend --dry-run -o compat=1.1 sn.qcow2"; do
    expect_status 1 $VDISK_QEMU_IMG $args 2>err.v >/dev/null
    expect_status 1 $QEMU_IMG $args 2>err.q >/dev/null
    diff -u err.q err.v || fail "qemu-img $args: messages differ"
done
unchanged "$before" sn.qcow2
echo ok
