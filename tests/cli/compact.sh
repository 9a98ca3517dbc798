#!/usr/bin/env bash
# vdisk compact: in-place compaction of randomized qcow2 images (internal
# snapshots, one deleted; a persistent bitmap filled by QEMU's writes; a
# backing file; compressed clusters; extended L2; 512-byte and 64 KiB
# clusters). The referees: qemu-img check (clean), qemu-img compare of
# the active layer and qemu-img convert -l of every snapshot against
# copies taken before, qemu-img info's bitmap list; the space given back
# is printed beside qemu-img convert -O qcow2's. --dry-run and bad input
# write nothing (sha256).
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-nbd python3
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
    end=$($QEMU_IMG check "$name.qcow2" | sed -n 's/^Image end offset: //p')
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
    check_views "$name.qcow2" "$name.before"
}

run_case c64k 11 65536
run_case c4k 12 4096 lazy_refcounts=on,refcount_bits=8
COMPRESS=1 run_case comp 14 65536
run_case extl2 15 32768 extended_l2=on

# -q prints nothing; the human report names the figures.
make_image q.qcow2 21 65536
out=$($VDISK compact -q q.qcow2)
[ -z "$out" ] || fail "-q printed: $out"
check_clean q.qcow2

# ---- bad input: clear error, exit 1, file byte-identical ----
make_image bad.qcow2 31 65536
sum=$(sha256sum < bad.qcow2)
expect_status 1 $VDISK compact -f nosuchfmt bad.qcow2 2> err
grep -q "nosuchfmt" err || fail "unknown format: $(cat err)"
expect_status 1 $VDISK compact --image-opts \
    "driver=qcow2,read-only=on,file.filename=bad.qcow2" 2> err
grep -q "read-only" err || fail "read-only: $(cat err)"
[ "$(sha256sum < bad.qcow2)" = "$sum" ] || fail "a refusal changed the file"

# An image in use: another process holds the write lock.
sock=$PWD/nbd.sock
qemu-nbd -f qcow2 -k "$sock" bad.qcow2 &
nbd_pid=$!
cleanup_fn kill "$nbd_pid"
for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
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
