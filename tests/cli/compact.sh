#!/usr/bin/env bash
# vdisk compact: in-place compaction of randomized qcow2 images (internal
# snapshots, one deleted; a persistent bitmap filled by QEMU's writes; a
# backing file; 4 KiB clusters with lazy and 8-bit refcounts; 32 KiB
# clusters with extended L2 and compressed clusters), a LUKS image and
# one with an external data file. The referees: qemu-img check (clean), qemu-img compare of
# the active layer and qemu-img convert -l of every snapshot against
# copies taken before, qemu-img info's bitmap list; the space given back
# is printed beside qemu-img convert -O qcow2's. --dry-run and bad input
# write nothing (sha256).
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo python3
source "$(dirname "$0")/compact-functions.bash"
tmpdir

# json_get FILE KEY: a number of vdisk compact's JSON report.
json_get() { sed -n "s/^ *\"$2\": \([0-9]*\),*\$/\1/p" "$1"; }

# case NAME SEED CLUSTER [CREATE_OPTS]
run_case()
{
    local name=$1
    make_image "$name.qcow2" "$2" "$3" "${4:-}"
    check_clean "$name.qcow2" leaks-ok
    save_views "$name.qcow2" "$name.before"
    local sum before
    sum=$(sha256sum < "$name.qcow2")
    before=$(size_of "$name.qcow2")

    # --dry-run: the plan, nothing written.
    $VDISK compact --dry-run --output=json "$name.qcow2" > dry.json
    [ "$(sha256sum < "$name.qcow2")" = "$sum" ] ||
        fail "$name: --dry-run changed the file"
    $VDISK compact --dry-run "$name.qcow2" | grep -q "nothing was written" ||
        fail "$name: --dry-run text"

    $VDISK compact --output=json "$name.qcow2" > got.json
    check_clean "$name.qcow2"
    check_views "$name.qcow2" "$name.before"
    local after new moved
    after=$(size_of "$name.qcow2")
    new=$(json_get got.json new-size)
    moved=$(json_get got.json moved-clusters)
    [ "$new" = "$after" ] || fail "$name: new-size $new, file $after"
    [ "$(json_get dry.json new-size)" = "$new" ] ||
        fail "$name: --dry-run planned $(json_get dry.json new-size), got $new"
    [ "$(json_get got.json original-size)" -ge "$before" ] ||
        fail "$name: original-size"
    if [ "$moved" -gt 0 ]; then
        [ "$after" -lt "$before" ] || fail "$name: not smaller ($before -> $after)"
    fi
    # Nothing past the end: the file ends at qemu-img check's image end.
    local end
    end=$(sed -n 's/^Image end offset: //p' check.out)
    [ "$after" -le "$end" ] || fail "$name: file $after past image end $end"

    # qemu-img convert of the same image (it keeps neither snapshots nor,
    # here, the backing file's share): the figures side by side.
    $QEMU_IMG convert -O qcow2 -B "$PWD/$name.qcow2.base" -F qcow2 \
        "$name.before/image" conv.qcow2
    echo "$name: $before -> $after bytes ($moved clusters moved);" \
         "qemu-img convert -O qcow2 (no snapshots): $(size_of conv.qcow2)"

    # A second run has nothing left to move.
    $VDISK compact --output=json "$name.qcow2" > again.json
    [ "$(json_get again.json moved-clusters)" = 0 ] ||
        fail "$name: second run moved clusters"
    check_clean "$name.qcow2"
}

run_case c4k 12 4096 lazy_refcounts=on,refcount_bits=8
COMPRESS=1 run_case extl2 15 32768 extended_l2=on

# LUKS: a moved data cluster is re-encrypted for its new host offset
# (IVs by host sector). Without the key: refused, byte-identical.
sec=(--object secret,id=sec0,data=pw)
io="driver=qcow2,file.filename=luks.qcow2,encrypt.key-secret=sec0"
$QEMU_IMG create -q "${sec[@]}" -f qcow2 \
    -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10 \
    luks.qcow2 16M
$QEMU_IO "${sec[@]}" --image-opts -c "write -P 1 0 8M" \
    -c "write -P 2 8M 8M" "$io" >/dev/null
$QEMU_IMG snapshot "${sec[@]}" --image-opts -c s1 "$io"
$QEMU_IO "${sec[@]}" --image-opts -c "write -P 5 0 4M" \
    -c "discard 12M 1M" "$io" >/dev/null
$QEMU_IMG snapshot "${sec[@]}" --image-opts -c s2 "$io"
$QEMU_IO "${sec[@]}" --image-opts -c "write -P 6 2M 4M" "$io" >/dev/null
$QEMU_IMG snapshot "${sec[@]}" --image-opts -d s1 "$io"
$QEMU_IMG convert "${sec[@]}" --image-opts -O raw "$io" luks-act.raw
$QEMU_IMG convert "${sec[@]}" --image-opts -l s2 -O raw "$io" luks-s2.raw
sum=$(sha256sum < luks.qcow2)
before=$(size_of luks.qcow2)
expect_status 1 $VDISK compact luks.qcow2 2> err
grep -q "luks.qcow2" err || fail "luks without key: $(cat err)"
[ "$(sha256sum < luks.qcow2)" = "$sum" ] || fail "luks refusal changed the file"
$VDISK compact "${sec[@]}" --image-opts "$io"
[ "$(size_of luks.qcow2)" -lt "$before" ] || fail "luks: not smaller"
$QEMU_IMG check "${sec[@]}" --image-opts "$io"
$QEMU_IMG convert "${sec[@]}" --image-opts -O raw "$io" view.raw
cmp view.raw luks-act.raw || fail "luks: active layer changed"
$QEMU_IMG convert "${sec[@]}" --image-opts -l s2 -O raw "$io" view.raw
cmp view.raw luks-s2.raw || fail "luks: snapshot s2 changed"

# An external data file: only metadata moves.
$QEMU_IMG create -q -f qcow2 -o data_file=df.data,cluster_size=4096 df.qcow2 16M
$QEMU_IO -c "write -P 1 0 8M" df.qcow2 >/dev/null
$QEMU_IMG bitmap --add df.qcow2 b1
$QEMU_IO -c "write -P 2 1M 3M" -c "discard 4M 2M" df.qcow2 >/dev/null
$QEMU_IMG convert -O raw df.qcow2 df-act.raw
bitmap_list df.qcow2 > df.bitmaps
before=$(size_of df.qcow2)
$VDISK compact df.qcow2
check_clean df.qcow2
assert_same_content df-act.raw df.qcow2
[ "$(size_of df.qcow2)" -lt "$before" ] || fail "df: not smaller"
[ "$(bitmap_list df.qcow2)" = "$(cat df.bitmaps)" ] || fail "df: bitmaps"

# -q prints nothing; the human report names the figures.
$QEMU_IMG create -q -f qcow2 q.qcow2 16M
qio q.qcow2 "write -P 1 0 4M" "discard 0 2M"
out=$($VDISK compact -q q.qcow2)
[ -z "$out" ] || fail "-q printed: $out"
check_clean q.qcow2

# ---- bad input: clear error, exit 1, file byte-identical ----
$QEMU_IMG create -q -f qcow2 bad.qcow2 16M
qio bad.qcow2 "write -P 1 0 4M" "discard 0 2M"
sum=$(sha256sum < bad.qcow2)
expect_status 1 $VDISK compact -f nosuchfmt bad.qcow2 2> err
grep -q "nosuchfmt" err || fail "unknown format: $(cat err)"
expect_status 1 $VDISK compact --image-opts \
    "driver=qcow2,read-only=on,file.filename=bad.qcow2" 2> err
grep -q "read-only" err || fail "read-only: $(cat err)"
[ "$(sha256sum < bad.qcow2)" = "$sum" ] || fail "a refusal changed the file"

# An image in use: another process holds the write lock.
sock=$PWD/nbd.sock
qemu-nbd -t -f qcow2 -k "$sock" bad.qcow2 &
nbd_pid=$!
cleanup_fn kill "$nbd_pid"
# qemu-nbd listens before it opens (and locks) the image: wait until a
# client gets through the handshake, which it serves only once open.
for _ in $(seq 100); do
    nbdinfo --size "nbd+unix:///?socket=$sock" >/dev/null 2>&1 && break
    sleep 0.1
done
expect_status 1 $VDISK compact bad.qcow2 2> err
grep -qi "lock" err || fail "locked image: $(cat err)"
kill $nbd_pid; wait $nbd_pid || true
sum=$(sha256sum < bad.qcow2)

# Not qcow2.
$QEMU_IMG create -q -f raw r.raw 1M
rsum=$(sha256sum < r.raw)
expect_status 1 $VDISK compact r.raw 2> err
grep -q "r.raw: Format 'raw' does not support compaction" err ||
    fail "raw: $(cat err)"
[ "$(sha256sum < r.raw)" = "$rsum" ] || fail "raw image changed"

# Corrupt: the active L1 table's first entry names an L2 table at an
# unaligned offset.
l1=$(python3 -c "import struct; d=open('bad.qcow2','rb').read(48); print(struct.unpack('>Q', d[40:48])[0])")
python3 - bad.qcow2 "$l1" <<'PY'
import struct, sys
f = open(sys.argv[1], 'r+b'); off = int(sys.argv[2])
f.seek(off); e = struct.unpack('>Q', f.read(8))[0]
f.seek(off); f.write(struct.pack('>Q', (e & (1 << 63)) | 0x50200))
PY
sum=$(sha256sum < bad.qcow2)
expect_status 1 $VDISK compact bad.qcow2 2> err
grep -q "bad.qcow2" err || fail "corrupt: $(cat err)"
[ "$(sha256sum < bad.qcow2)" = "$sum" ] || fail "corrupt image changed"
cat err
