#!/usr/bin/env bash
# The nbd client driver against qemu-nbd and vdisk serve: every filename
# form QEMU 7.2 takes (nbd://, nbd+tcp://, nbd+unix://, nbd:HOST:PORT,
# nbd:unix:PATH, exportname=) and the blockdev options; info, map
# --output=json, convert and compare give what qemu-img gives on the same
# URI; writes, zero writes (allocated or not), discards and flushes from
# vdisk land as qemu-img then reads them; a read-only export refuses a
# writer; a server with a small maximum block size gets split requests.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/nbd-servers.bash"
requires qemu-img qemu-io qemu-nbd python3 timeout
tmpdir

T="timeout 60"
nbds_requires_client

$QEMU_IMG create -q -f qcow2 img.qcow2 64M
$QEMU_IO -c 'write -P 0xab 1M 2M' -c 'write -z 8M 1M' \
    -c 'write -P 0x11 20M 64k' -c 'write -P 0x22 63M 1M' img.qcow2 >/dev/null

nbds_qemu_nbd pid1 - -f qcow2 -x exp img.qcow2 || fail "qemu-nbd"
P=$NBDS_PORT
cp img.qcow2 img2.qcow2
nbds_qemu_nbd pid2 '' -f qcow2 -x exp -k "$PWD/sock" img2.qcow2 ||
    fail "qemu-nbd on a socket"

# Same answers as qemu-img for every spelling of the server.
# (info names the server as QEMU rebuilds it: the legacy forms are
# checked by info alone.)
for uri in "nbd:127.0.0.1:$P:exportname=exp" \
    "nbd:unix:$PWD/sock:exportname=exp" "nbd+tcp://127.0.0.1:$P/exp" \
    "nbd+unix:///exp?socket=$PWD/sock" "nbd://127.0.0.1:$P/exp"; do
    $T "$VDISK" info "$uri" > v.info || fail "vdisk info $uri"
    $T $QEMU_IMG info "$uri" > q.info
    diff -u q.info v.info || fail "info differs from qemu-img's for $uri"
    case $uri in nbd:1*|nbd:unix*) continue;; esac
    $T "$VDISK" info --output=json "$uri" > v.json
    $T $QEMU_IMG info --output=json "$uri" > q.json
    json_equal_filtered q.json v.json || fail "info --output=json differs for $uri"
    $T "$VDISK" map --output=json "$uri" > v.map || fail "vdisk map $uri"
    $T $QEMU_IMG map --output=json "$uri" > q.map
    diff -u q.map v.map || fail "map differs from qemu-img's for $uri"
done
# The holes and zeroes are seen (else map would be one data extent).
grep -q '"data": false' v.map || fail "block status not used: $(cat v.map)"

# Blockdev options, as --image-opts and json:.
$T "$VDISK" map --output=json --image-opts \
    "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=$P,export=exp" \
    > o.map || fail "map --image-opts server.*"
diff -u q.map o.map || fail "map through server.* options differs"
$T "$VDISK" info "json:{\"driver\":\"raw\",\"file\":{\"driver\":\"nbd\",\"server\":{\"type\":\"unix\",\"path\":\"$PWD/sock\"},\"export\":\"exp\"}}" \
    > j.info || fail "info json: with server.path"
grep -q 'virtual size: 64 MiB' j.info || fail "json: open: $(cat j.info)"

# x-dirty-bitmap: another meta context read as base:allocation (dirty
# shows as "data": false), as QEMU does; a missing one is refused.
$QEMU_IMG create -q -f qcow2 bm.qcow2 16M
$QEMU_IMG bitmap --add bm.qcow2 b0
$QEMU_IO -c 'write -P 1 1M 64k' -c 'write -P 2 5M 1M' bm.qcow2 >/dev/null
nbds_qemu_nbd pid5 - -r -A -B b0 -f qcow2 -x bm bm.qcow2 || fail "qemu-nbd -B"
for ctx in qemu:dirty-bitmap:b0 qemu:allocation-depth; do
    O="driver=nbd,server.type=inet,server.host=127.0.0.1"
    O="$O,server.port=$NBDS_PORT,export=bm,x-dirty-bitmap=$ctx"
    $T "$VDISK" map --output=json --image-opts "$O" > xv.map ||
        fail "map with x-dirty-bitmap=$ctx"
    $T $QEMU_IMG map --output=json --image-opts "$O" > xq.map
    diff -u xq.map xv.map || fail "map with x-dirty-bitmap=$ctx differs"
done
grep -q '"data": false' xv.map || fail "x-dirty-bitmap not used"
expect_status 1 $T "$VDISK" info --image-opts "${O%,x-*},x-dirty-bitmap=qemu:dirty-bitmap:nosuch" \
    2> xn.err
# (QEMU 7.2 loses its own message here: "Could not open image: Invalid
# argument"; vdisk says which context is missing.)
grep -q 'requested x-dirty-bitmap qemu:dirty-bitmap:nosuch not found' xn.err ||
    fail "missing x-dirty-bitmap: $(cat xn.err)"
nbds_stop pid5

# convert and compare skip what block status says is zero.
$T "$VDISK" convert -O qcow2 "nbd://127.0.0.1:$P/exp" v.qcow2 ||
    fail "vdisk convert from nbd"
$T $QEMU_IMG convert -O qcow2 "nbd://127.0.0.1:$P/exp" q.qcow2
$QEMU_IMG compare -U v.qcow2 img.qcow2 || fail "converted image differs"
$QEMU_IMG map --output=json v.qcow2 > vm.json
$QEMU_IMG map --output=json q.qcow2 > qm.json
diff -u qm.json vm.json || fail "vdisk convert allocated otherwise than qemu-img"
$T "$VDISK" compare "nbd://127.0.0.1:$P/exp" v.qcow2 ||
    fail "vdisk compare nbd vs copy"
$QEMU_IO -c 'write -P 0x33 5M 512' v.qcow2 >/dev/null
expect_status 1 $T "$VDISK" compare "nbd://127.0.0.1:$P/exp" v.qcow2 > c.out
$T $QEMU_IMG compare "nbd://127.0.0.1:$P/exp" v.qcow2 > qc.out || true
diff -u qc.out c.out || fail "compare output differs"

# Writes through vdisk: data, zeros that stay allocated (no unmap),
# zeros that may be holes, discard, flush; then qemu-img reads the same.
$T "$VDISK" io -f raw -c 'write -P 0x44 4M 1M' -c 'write -z 1M 64k' \
    -c 'write -z -u 2M 64k' -c 'discard 20M 64k' -c 'flush' \
    -c 'read -P 0x44 4M 1M' "nbd://127.0.0.1:$P/exp" > io.out ||
    fail "vdisk io through nbd"
grep -qi 'fail\|error' io.out && fail "vdisk io: $(cat io.out)"
$T $QEMU_IO -f raw -c 'read -P 0x44 4M 1M' -c 'read -P 0 1M 64k' \
    -c 'read -P 0 2M 64k' \
    "nbd://127.0.0.1:$P/exp" > qio.out
grep -qi 'fail\|error\|mismatch' qio.out && fail "qemu-io: $(cat qio.out)"
# The zero write without -u stayed allocated (NO_HOLE), the one with -u
# left a hole: qemu-img map of the qcow2 behind the server tells.
$QEMU_IMG map -U --output=json img.qcow2 > after.map
python3 - after.map <<'EOF' || fail "zero write allocation: $(cat after.map)"
import json, sys
m = json.load(open(sys.argv[1]))
def at(off):
    return next(e for e in m if e["start"] <= off < e["start"] + e["length"])
a, b = at(1 << 20), at(2 << 20)
assert a["zero"] and a["present"], a
assert b["zero"], b
EOF

# Copy a local image into the export (vdisk as the writer).
$QEMU_IMG create -q -f raw local.raw 64M
$QEMU_IO -f raw -c 'write -P 0x5a 0 3M' -c 'write -P 0x6b 40M 5M' local.raw \
    >/dev/null
$T "$VDISK" convert -n -O raw local.raw "nbd://127.0.0.1:$P/exp" ||
    fail "vdisk convert into nbd"
$T $QEMU_IMG compare -f raw -F raw local.raw "nbd://127.0.0.1:$P/exp" ||
    fail "export differs from what vdisk wrote"

# A read-only export refuses a writer, as QEMU.
cp img2.qcow2 img3.qcow2
nbds_qemu_nbd pid3 - -r -f qcow2 -x ro img3.qcow2 || fail "qemu-nbd -r"
expect_status 1 $T "$VDISK" io -f raw -c 'write 0 512' \
    "nbd://127.0.0.1:$NBDS_PORT/ro" 2> ro.err
grep -q 'read-only' ro.err || fail "read-only export: $(cat ro.err)"

# vdisk serve as the server; an export name that does not exist.
cp local.raw served.raw
nbds_vdisk_serve pid4 - -f raw -x vx served.raw || fail "vdisk serve"
$T "$VDISK" compare -f raw "nbd://127.0.0.1:$NBDS_PORT/vx" local.raw ||
    fail "compare through vdisk serve"
$T "$VDISK" map --output=json "nbd://127.0.0.1:$NBDS_PORT/vx" > s.map
$T $QEMU_IMG map --output=json "nbd://127.0.0.1:$NBDS_PORT/vx" > sq.map
diff -u sq.map s.map || fail "map through vdisk serve differs"
expect_status 1 $T "$VDISK" info "nbd://127.0.0.1:$NBDS_PORT/nosuch" \
    2> nx.err
grep -q "nbd://127.0.0.1:$NBDS_PORT/nosuch\|127.0.0.1" nx.err ||
    fail "unknown export: $(cat nx.err)"

# vdisk serve exporting an nbd node (qemu-nbd's export, again).
nbds_vdisk_serve pid6 - -r -f raw -x relay "nbd://127.0.0.1:$P/exp" ||
    fail "vdisk serve of an nbd:// image"
# (qemu-nbd takes one client at a time: compare with what vdisk copied
# into its export above.)
$T $QEMU_IMG compare -f raw -F raw local.raw \
    "nbd://127.0.0.1:$NBDS_PORT/relay" || fail "relayed export differs"
nbds_stop pid6

# Bad filenames are refused with a message, never a crash.
for bad in "nbd://" "nbd+unix:///x" "nbd+unix:///x?sock=a" \
    "nbd://h:notaport/x" "nbd://h/x?socket=a" "nbd:onlyhost" \
    "nbd+rdma://h/x"; do
    st=0
    $T "$VDISK" info "$bad" > bad.out 2>&1 || st=$?
    [ "$st" = 1 ] || fail "'$bad': exit $st: $(cat bad.out)"
    # QEMU's words (it has no nbd+rdma driver to say it by name).
    [ "$bad" = "nbd+rdma://h/x" ] && continue
    $T $QEMU_IMG info "$bad" 2>&1 | sed 's/^qemu-img:/vdisk:/' > qbad.out || true
    diff -u qbad.out bad.out || fail "'$bad': message differs from QEMU's"
done
# Nothing listening: a clear error, not a hang.
expect_status 1 $T "$VDISK" info "nbd://127.0.0.1:$(nbds_free_port)/x" \
    2> down.err
grep -qi 'connect\|refused' down.err || fail "no server: $(cat down.err)"
exit 0
