#!/usr/bin/env bash
# The qcow2 metadata cache in query-blockstats: vdisk reports its size and
# hit counts as x-vdisk members of driver-specific (QEMU has none there),
# with everything else of the node's entry shaped as qemu-storage-daemon's.
# The L2 cache covers the whole image by default (an image of 32 L2 tables
# gets 32 slots), reading through two L2 tables counts two misses, and
# reading them again counts hits, not misses.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-storage-daemon python3 timeout
source "$(dirname "$0")/qmp-functions.bash"
tmpdir
qmp_lib

for d in qemu vdisk; do
    mkdir $d
    # 4 KiB clusters: one L2 table maps 2 MiB, 64 MiB need 32 of them.
    $QEMU_IMG create -q -f qcow2 -o cluster_size=4k $d/c.qcow2 64M
    $QEMU_IO -c 'write -P 1 0 4k' -c 'write -P 2 40M 4k' $d/c.qcow2 >/dev/null
done

timeout 120 python3 - "$PWD" "$VDISK" "$QEMU_IO" <<'PYEOF' || fail "cache statistics wrong"
import json, subprocess, sys
from qmplib import *

top, vdisk, qemu_io = sys.argv[1], sys.argv[2], sys.argv[3]

def setup(m):
    for req in (
        {"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "c", "file": {"driver": "file", "node-name": "cf", "filename": "@D@/c.qcow2"}}},
        {"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "@D@/nbd.sock"}}}},
        {"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e", "node-name": "c"}},
    ):
        r = m.cmd(req)
        assert "return" in r, (req, r)

def read(m, offsets):
    cmds = []
    for o in offsets:
        cmds += ["-c", "read %d 4096" % o]
    subprocess.run([qemu_io, "-r", "-f", "raw"] + cmds +
                   ["nbd+unix:///c?socket=%s/nbd.sock" % m.d],
                   check=True, stdout=subprocess.DEVNULL)

def node(m):
    r = m.cmd({"execute": "query-blockstats", "arguments": {"query-nodes": True}})
    return {s["node-name"]: s for s in r["return"]}["c"]

q = Monitor(["qemu-storage-daemon"], top + "/qemu")
v = Monitor([vdisk, "serve"], top + "/vdisk")
setup(q)
setup(v)
bad = []
before = node(v)["driver-specific"]
read(q, [0, 40 << 20])
read(v, [0, 40 << 20])
mid = node(v)["driver-specific"]
read(v, [0, 40 << 20, 4096])
sq, sv = node(q), node(v)
after = sv["driver-specific"]
print("qemu-storage-daemon:", json.dumps(sq.get("driver-specific")))
print("vdisk:", json.dumps(before), json.dumps(mid), json.dumps(after))

# Outside driver-specific, the entry has QEMU's shape; inside it, QEMU's
# members (only the discriminator for qcow2, if anything) and x- ones.
EXTRA = ("idle_time_ns", "driver-specific")
bad += diff(shape(sq), shape(sv), EXTRA)
qds = sq.get("driver-specific", {"driver": "qcow2"})
if {k: w for k, w in after.items() if not k.startswith("x-vdisk-")} != qds:
    bad.append("driver-specific %s, QEMU has %s" % (after, qds))
X = ("l2-cache-size", "l2-cache-hits", "l2-cache-misses",
     "refcount-cache-size", "refcount-cache-hits", "refcount-cache-misses")
if sorted(k for k in after if k.startswith("x-")) != sorted("x-vdisk-" + k for k in X):
    bad.append("x-vdisk members: %s" % sorted(after))
elif not all(isinstance(after["x-vdisk-" + k], int) for k in X):
    bad.append("x-vdisk members not integers: %s" % after)
else:
    g = lambda d, k: d["x-vdisk-" + k]
    if g(after, "l2-cache-size") != 32 * 4096:
        bad.append("L2 cache of %d bytes, the image has 32 L2 tables of 4 KiB" % g(after, "l2-cache-size"))
    if g(mid, "l2-cache-misses") - g(before, "l2-cache-misses") != 2:
        bad.append("reading through 2 L2 tables: %d misses" % (g(mid, "l2-cache-misses") - g(before, "l2-cache-misses")))
    if g(after, "l2-cache-misses") != g(mid, "l2-cache-misses"):
        bad.append("cached L2 tables read again: %d misses" % (g(after, "l2-cache-misses") - g(mid, "l2-cache-misses")))
    if g(after, "l2-cache-hits") - g(mid, "l2-cache-hits") < 3:
        bad.append("3 reads through cached L2 tables: %d hits" % (g(after, "l2-cache-hits") - g(mid, "l2-cache-hits")))
q.close()
v.close()
for b in bad:
    print(b)
sys.exit(1 if bad else 0)
PYEOF
exit 0
