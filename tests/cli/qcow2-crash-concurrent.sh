#!/usr/bin/env bash
# qcow2 crash points with concurrent allocating writers: each cycle puts
# four 4 KiB writes to empty clusters in flight at once (`vdisk io`
# aio_write, one thread each; 96 clusters, past the 64 after which the
# file is grown ahead), so their refcount and L2 updates share the
# metadata caches and their data go to new clusters past the end of the
# file, which the write path neither zeroes nor extends cluster by
# cluster (it grows the file ahead, see docs/qcow2.md); then aio_flush
# (which only waits for them) and flush.
# The power is cut after the N-th write to the file (blkdebug), the
# unflushed writes kept, lost or randomly lost. Afterwards `qemu-img
# check` may find leaks but no corruption, every cycle acknowledged by
# its flush reads back, and every cluster never written reads as zeros.
source "$(dirname "$0")/../functions.sh"
requires qemu-img python3
tmpdir

SIZE=$((64 * 1024 * 1024))
CYCLES=24

py()
{
    python3 - "$@" <<'PY'
import random, sys

SLOTS, PER = 96, 4
STRIDE = 640 << 10          # several L2 tables with 4k clusters

def ops(seed):
    r = random.Random(seed)
    slots = list(range(SLOTS))
    r.shuffle(slots)
    cycles = []
    for c in range(len(slots) // PER):
        cyc = []
        for s in slots[c * PER:(c + 1) * PER]:
            off = s * STRIDE + r.randrange(16) * 4096
            cyc.append((s, off, r.randrange(1, 256)))
        cycles.append(cyc)
    return cycles

if sys.argv[1] == "gen":
    for cyc in ops(int(sys.argv[2])):
        for s, off, pat in cyc:
            print("aio_write -P 0x%02x %d 4096" % (pat, off))
        print("aio_flush")      # waits for the writes (qemu-io's)
        print("flush")
        print("length")
    sys.exit(0)

seed, out_name, raw_name = int(sys.argv[2]), sys.argv[3], sys.argv[4]
cycles = ops(seed)
n = 0
with open(out_name, errors="replace") as f:
    for line in f:
        line = line.strip()
        if line.endswith(" MiB") and line[0].isdigit():
            n += 1
        elif "fail" in line or "rror" in line or line.startswith("vdisk:"):
            break
want = {}
for cyc in cycles[:n]:
    for s, off, pat in cyc:
        want[off] = pat
torn = set(off for s, off, pat in cycles[n]) if n < len(cycles) else set()
data = open(raw_name, "rb").read()
for cyc in cycles:
    for s, off, pat in cyc:
        if off in torn:
            continue
        got = data[off:off + 4096]
        exp = bytes([want.get(off, 0)]) * 4096
        if got != exp:
            sys.exit("offset %d: want 0x%02x, got 0x%02x (acknowledged cycles: %d)"
                     % (off, want.get(off, 0), got[0] if got else -1, n))
# Outside the written 4 KiB blocks everything reads as zeros.
written = set(off for cyc in cycles for s, off, pat in cyc)
for blk in range(0, len(data), 4096):
    if blk not in written and data[blk:blk + 4096].count(0) != 4096:
        sys.exit("offset %d: never written, reads non-zero" % blk)
print("acknowledged cycles: %d of %d" % (n, len(cycles)))
PY
}

for opts in cluster_size=64k cluster_size=4k; do
    seed=${#opts}
    py gen "$seed" >cmds
    args=()
    while IFS= read -r line; do
        args+=(-c "$line")
    done <cmds

    rm -f img.qcow2
    "$VDISK" create -q -f qcow2 -o "$opts" img.qcow2 "$SIZE"
    "$VDISK" io --image-opts "${args[@]}" \
        "driver=qcow2,file.driver=blkdebug,file.filename=img.qcow2,file.stats=on" \
        >out 2>&1 || fail "workload failed ($opts): $(cat out)"
    writes=$(sed -n 's/^blkdebug: \([0-9]*\) writes.*/\1/p' out)
    [ -n "$writes" ] && [ "$writes" -gt 10 ] || fail "no write count from blkdebug"
    "$QEMU_IMG" convert -f qcow2 -O raw img.qcow2 full.raw
    py verify "$seed" out full.raw >/dev/null ||
        fail "uncrashed run ($opts) does not read back"
    grep -q "acknowledged cycles: $CYCLES of" <(py verify "$seed" out full.raw) ||
        fail "uncrashed run ($opts): not every cycle acknowledged"

    step=$(( (writes + 5) / 6 ))
    modes=(keep drop random)
    for ((n = 1; n <= writes; n += step)); do
        mode=${modes[n % 3]}
        rm -f img.qcow2
        "$VDISK" create -q -f qcow2 -o "$opts" img.qcow2 "$SIZE"
        "$VDISK" io --image-opts "${args[@]}" \
            "driver=qcow2,file.driver=blkdebug,file.filename=img.qcow2,file.crash-write=$n,file.crash-action=fail,file.crash-unflushed=$mode,file.crash-seed=$n" \
            >out 2>&1 || true
        st=0
        "$QEMU_IMG" check -f qcow2 img.qcow2 >check.out 2>&1 || st=$?
        if [ "$st" != 0 ] && [ "$st" != 3 ]; then
            cat check.out
            fail "crash after write $n ($mode, $opts): qemu-img check status $st"
        fi
        "$QEMU_IMG" convert -U -f qcow2 -O raw img.qcow2 crash.raw
        py verify "$seed" out crash.raw >verify.out 2>&1 ||
            fail "crash after write $n ($mode, $opts): $(cat verify.out)"
    done
    echo "$opts: $writes writes, crash points every $step: ok"
done
