#!/usr/bin/env bash
# qemu-img convert --salvage: read errors injected with blkdebug (QEMU's
# inject-error rules, the same json: filename for both tools) and a
# damaged qcow2 whose block status fails; the targets must read the
# same (unreadable sectors as zeros), the warnings must be qemu-img's
# (none with -q), and without --salvage both fail the same way.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io python3 sort
tmpdir

$QEMU_IMG create -q -f raw s.raw 1M
$QEMU_IO -f raw -c 'write -q -P 7 0 1M' s.raw
$QEMU_IMG create -q -f qcow2 s.qcow2 1M
$QEMU_IO -c 'write -q -P 8 0 1M' s.qcow2

rules='[{"event":"read_aio","iotype":"read","sector":100},
        {"event":"read_aio","iotype":"read","sector":1000,"once":true}]'
raw_src="json:{\"driver\":\"raw\",\"file\":{\"driver\":\"blkdebug\",\"image\":{\"driver\":\"file\",\"filename\":\"s.raw\"},\"inject-error\":$rules}}"
qcow2_src="json:{\"driver\":\"qcow2\",\"file\":{\"driver\":\"blkdebug\",\"image\":{\"driver\":\"file\",\"filename\":\"s.qcow2\"},\"inject-error\":[{\"event\":\"read_aio\",\"iotype\":\"read\",\"sector\":700}]}}"

# run ARGS...: both tools convert to q.t / v.t; their exit statuses and
# stderr (program name normalised, lines sorted: vdisk reads in
# parallel threads) must be equal, and so must the targets.
run()
{
    local qs=0 vs=0
    rm -f q.t v.t
    $QEMU_IMG convert "$@" q.t 2>q.err || qs=$?
    "$VDISK" convert "$@" v.t 2>v.err || vs=$?
    [ "$qs" = "$vs" ] || { cat q.err v.err; fail "status $vs, qemu-img's $qs: $*"; }
    diff -u <(sed 's/^qemu-img: //' q.err | grep -v '^qcow2: ' | sort) \
            <(sed 's/^vdisk: //' v.err | sort) || fail "messages differ: $*"
    if [ -e q.t ]; then
        $QEMU_IMG compare -q q.t v.t || fail "targets differ: $*"
    else
        [ ! -e v.t ] || fail "vdisk left a target where qemu-img did not: $*"
    fi
}

run --salvage -O raw "$raw_src"
grep -q 'warning: error while reading offset 51200' v.err ||
    fail "no warning for the unreadable sector"
$QEMU_IO -f raw -r -c 'read -q -P 0 51200 512' -c 'read -q -P 0 512000 512' \
    -c 'read -q -P 7 0 51200' v.t || fail "salvaged data"
run --salvage -q -O qcow2 "$raw_src"
[ ! -s v.err ] || fail "-q printed warnings"
run --salvage -O raw "$qcow2_src"
run -O raw "$raw_src"
run -O qcow2 "$qcow2_src"

# A qcow2 data cluster whose offset is not aligned: block status fails
# there (and the image is corrupt for qemu-img too).
cp s.qcow2 bad.qcow2
python3 - <<'PY'
import struct
with open("bad.qcow2", "r+b") as f:
    d = f.read()
    l1 = struct.unpack(">Q", d[40:48])[0]
    l2 = struct.unpack(">Q", d[l1:l1 + 8])[0] & 0x00fffffffffffe00
    e = struct.unpack(">Q", d[l2 + 24:l2 + 32])[0]
    f.seek(l2 + 24)
    f.write(struct.pack(">Q", e | 0x200))
PY
run --salvage -O raw bad.qcow2
grep -q 'warning: error while reading block status at offset 196608' v.err ||
    fail "no block status warning"
run -O raw bad.qcow2
