#!/usr/bin/env bash
# query-blockstats after a known I/O pattern through an NBD export (N
# reads of M bytes, W writes, a flush, sent by qemu-io), the same
# pattern against qemu-storage-daemon and `vdisk serve`: every node's
# BlockDeviceStats has QEMU's members and types, and wr_highest_offset
# (the one figure qemu-storage-daemon keeps for a node) is the same on
# both. qemu-storage-daemon leaves the other counters at 0, as its
# accounting belongs to device models it does not have; vdisk counts
# every request of every node, so its counters must equal the pattern.
# Then the timed statistics (x-vdisk-block-stats-set, QEMU's -drive
# stats-intervals) and a latency histogram (block-latency-histogram-set,
# which qemu-storage-daemon does not have) must account the same reads.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-storage-daemon python3 timeout
source "$(dirname "$0")/qmp-functions.bash"
tmpdir
qmp_lib

for d in qemu vdisk; do
    mkdir $d
    # Allocated, so that the NBD servers read it rather than answer
    # holes from block status.
    $QEMU_IMG create -q -f raw -o preallocation=full $d/r.raw 4M
done

timeout 120 python3 - "$PWD" "$VDISK" "$QEMU_IO" <<'PYEOF' || fail "statistics differ"
import json, subprocess, sys
from qmplib import *

top, vdisk, qemu_io = sys.argv[1], sys.argv[2], sys.argv[3]
N, M, W = 7, 4096, 3

def pattern(d):
    cmds = []
    for i in range(N):
        cmds += ["-c", "read %d %d" % (i * 65536, M)]
    for i in range(W):
        cmds += ["-c", "write -P 0x5a %d 512" % (1048576 + i * 4096)]
    cmds += ["-c", "flush"]
    subprocess.run([qemu_io, "-f", "raw"] + cmds +
                   ["nbd+unix:///r?socket=%s/nbd.sock" % d],
                   check=True, stdout=subprocess.DEVNULL)

def setup(m):
    for req in (
        {"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r", "file": {"driver": "file", "node-name": "rf", "filename": "@D@/r.raw"}}},
        {"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "@D@/nbd.sock"}}}},
        {"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e", "node-name": "r", "writable": True}},
    ):
        r = m.cmd(req)
        assert "return" in r, (req, r)

def stats(m):
    r = m.cmd({"execute": "query-blockstats", "arguments": {"query-nodes": True}})
    return {s["node-name"]: s for s in r["return"]}

q = Monitor(["qemu-storage-daemon"], top + "/qemu")
v = Monitor([vdisk, "serve"], top + "/vdisk")
setup(q)
setup(v)
# Timed statistics over 60 s on vdisk's raw node, and a read histogram.
print(v.cmd({"execute": "x-vdisk-block-stats-set", "arguments": {"node-name": "r", "stats-intervals": [60, 3600]}}))
print(v.cmd({"execute": "block-latency-histogram-set", "arguments": {"id": "r", "boundaries-read": [1000, 1000000000]}}))
hq = q.cmd({"execute": "block-latency-histogram-set", "arguments": {"id": "r", "boundaries": [1000]}})
print("qemu-storage-daemon on block-latency-histogram-set:", hq)
pattern(q.d)
pattern(v.d)
sq, sv = stats(q), stats(v)
bad = []

# Members and types: QEMU's, apart from what vdisk has that
# qemu-storage-daemon's never-used counters lack (idle_time_ns appears
# after the first request; the histogram and timed stats once set).
EXTRA = ("idle_time_ns", "rd_latency_histogram", "timed_stats")
for name in ("r", "rf"):
    bad += ["%s: %s" % (name, p) for p in diff(shape(sq[name]), shape(sv[name]), EXTRA)]
    a, b = sq[name]["stats"], sv[name]["stats"]
    if a["wr_highest_offset"] != b["wr_highest_offset"]:
        bad.append("%s: wr_highest_offset %d vs %d" % (name, a["wr_highest_offset"], b["wr_highest_offset"]))
    print(name, "wr_highest_offset", a["wr_highest_offset"], b["wr_highest_offset"])
    want = {"rd_operations": N, "rd_bytes": N * M, "wr_operations": W,
            "wr_bytes": W * 512, "failed_rd_operations": 0,
            "failed_wr_operations": 0, "invalid_rd_operations": 0}
    for k, w in want.items():
        if b[k] != w:
            bad.append("%s: %s is %d, the pattern made %d" % (name, k, b[k], w))
    if b["flush_operations"] < 1:
        bad.append("%s: no flush counted" % name)
    if not b["rd_total_time_ns"] > 0 or "idle_time_ns" not in b:
        bad.append("%s: no read latency or idle time" % name)
    for k in ("rd_operations", "rd_bytes", "wr_operations", "wr_bytes"):
        if a[k] != 0:
            print("note: qemu-storage-daemon counted %s=%d on %s" % (k, a[k], name))

s = sv["r"]["stats"]
ts = s["timed_stats"]
if [t["interval_length"] for t in ts] != [60, 3600]:
    bad.append("timed_stats intervals: %s" % [t["interval_length"] for t in ts])
TIMED = {"interval_length", "min_rd_latency_ns", "max_rd_latency_ns",
         "avg_rd_latency_ns", "min_wr_latency_ns", "max_wr_latency_ns",
         "avg_wr_latency_ns", "min_flush_latency_ns", "max_flush_latency_ns",
         "avg_flush_latency_ns", "avg_rd_queue_depth", "avg_wr_queue_depth"}
for t in ts:
    if set(t) != TIMED:
        bad.append("timed_stats members: %s" % sorted(set(t) ^ TIMED))
    elif not 0 < t["min_rd_latency_ns"] <= t["avg_rd_latency_ns"] <= t["max_rd_latency_ns"]:
        bad.append("timed_stats read latencies: %s" % t)
    elif not t["avg_rd_queue_depth"] > 0:
        bad.append("timed_stats read queue depth: %s" % t)
h = s.get("rd_latency_histogram")
if not h or h["boundaries"] != [1000, 1000000000] or sum(h["bins"]) != N or len(h["bins"]) != 3:
    bad.append("read histogram: %s" % h)
if "wr_latency_histogram" in s:
    bad.append("a write histogram nobody set")
# Removing every histogram.
v.cmd({"execute": "block-latency-histogram-set", "arguments": {"id": "r"}})
if "rd_latency_histogram" in stats(v)["r"]["stats"]:
    bad.append("histogram still there after removal")
# Bad input, with QEMU's words where QEMU has them.
for req, want in (
    ({"execute": "block-latency-histogram-set", "arguments": {"id": "nope"}}, ("error", "DeviceNotFound", "Device 'nope' not found")),
    ({"execute": "block-latency-histogram-set", "arguments": {"id": "r", "boundaries": [10, 5]}}, ("error", "GenericError", "Device 'r' set read boundaries fail")),
    ({"execute": "block-latency-histogram-set", "arguments": {"id": "r", "boundaries-write": []}}, ("error", "GenericError", "Device 'r' set write boundaries fail")),
    ({"execute": "x-vdisk-block-stats-set", "arguments": {"node-name": "r", "stats-intervals": [0]}}, ("error", "GenericError", "Invalid interval length: 0")),
):
    got = outcome(v.cmd(req), v.d)
    print(json.dumps(req), got)
    if got != want:
        bad.append("%s: %s, QEMU says %s" % (json.dumps(req), got, want))
q.close()
v.close()
for b in bad:
    print(b)
sys.exit(1 if bad else 0)
PYEOF
exit 0
