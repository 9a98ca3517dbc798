#!/usr/bin/env bash
# blockdev-backup under `vdisk serve` and qemu-storage-daemon, one QMP
# script sent to both on twin chains (base <- mid <- top): replies,
# event sequences and job queries compared with qemu-storage-daemon's,
# and the point in time checked: the target equals the top as it was
# when the job started (qemu-img compare with a copy made before) even
# when the guest writes to the top through an NBD export during the
# copy; sync top onto a target over the same backing; sync none as a
# fleecing target whose backing file is the source, cancelled at the end.
# Also QEMU's refusals (same node, sizes, bitmaps, nodes not found).
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-storage-daemon python3 timeout
source "$(dirname "$0")/qmp-functions.bash"
tmpdir
qmp_lib

timeout 400 python3 - "$PWD" "$VDISK" "$QEMU_IMG" <<'PYEOF' || fail "backup differs from qemu-storage-daemon"
import os, subprocess, sys
from qmplib import *

top, vdisk, qemu_img = sys.argv[1], sys.argv[2], sys.argv[3]

def run(*a):
    subprocess.run(a, check=True, stdout=subprocess.DEVNULL)

def target(m, d, size="4M", backing=None, fmt="qcow2"):
    args = [qemu_img, "create", "-q", "-f", fmt, d + "/tgt." + fmt, size]
    if backing:
        args[5:5] = ["-b", backing, "-F", "qcow2"]
    run(*args)
    a = {"driver": fmt, "node-name": "tgt",
         "file": {"driver": "file", "filename": "@D@/tgt." + fmt}}
    if backing:
        a["backing"] = backing.replace(".qcow2", "")
    return m.cmd({"execute": "blockdev-add", "arguments": a})

def B(m, log, **a):
    log.append(m.cmd({"execute": "blockdev-backup", "arguments": a}))

def same(d, a, b):
    return subprocess.run([qemu_img, "compare", "-U", "-f", "raw", "-F",
                           "qcow2", d + "/" + a, d + "/" + b],
                          capture_output=True, text=True).returncode

def guest_writes(d):
    cmds = []
    for i in range(12):
        off = (i * 337 * 1024) % (4 * 1024 * 1024 - 65536)
        cmds += ["-c", "write -P 0x%02x %d 65536" % (0x40 + i, off)]
    run("qemu-io", "-f", "raw", *cmds, "nbd+unix:///top?socket=" + d + "/nbd.sock")

def export(m, log):
    log.append(m.cmd({"execute": "nbd-server-start", "arguments": {
        "addr": {"type": "unix", "data": {"path": "@D@/nbd.sock"}}}}))
    log.append(m.cmd({"execute": "block-export-add", "arguments": {
        "type": "nbd", "id": "e", "node-name": "top", "writable": True}}))

def refusals(m, d, log):
    add_chain(m)
    log.append(target(m, d, size="8M"))
    B(m, log, device="top", target="top", sync="full", **{"job-id": "j"})
    B(m, log, device="nope", target="tgt", sync="full", **{"job-id": "j"})
    B(m, log, device="top", target="nope", sync="full", **{"job-id": "j"})
    B(m, log, device="top", target="tgt", sync="full", **{"job-id": "j"})
    B(m, log, device="top", target="tgt", sync="bitmap", **{"job-id": "j"})
    B(m, log, device="top", target="tgt", sync="incremental", **{"job-id": "j"})
    B(m, log, device="top", target="tgt", sync="full", bitmap="b", **{"job-id": "j"})
    B(m, log, device="top", target="tgt", sync="full", **{"job-id": "j", "bitmap-mode": "never"})
    B(m, log, device="top", target="tgt", sync="sometimes", **{"job-id": "j"})
    log.append(m.cmd({"execute": "query-jobs"}))

def full(m, d, log):
    add_chain(m)
    log.append(target(m, d))
    B(m, log, device="top", target="tgt", sync="full", **{"job-id": "b"})
    wait_status(m, "b", (None,))

def target_is_start(d):
    return [("target is the start", same(d, "before.raw", "tgt.qcow2"))]

def point_in_time(m, d, log):
    add_chain(m)
    export(m, log)
    log.append(target(m, d))
    B(m, log, device="top", target="tgt", sync="full", speed=1 << 20,
      **{"job-id": "b", "auto-dismiss": False})
    guest_writes(d)
    log.append(m.cmd({"execute": "blockdev-del", "arguments": {"node-name": "tgt"}}))
    wait_status(m, "b", ("concluded",))
    log.append(m.cmd({"execute": "query-jobs"}))
    log.append(m.cmd({"execute": "job-dismiss", "arguments": {"id": "b"}}))
    log.append(m.cmd({"execute": "block-export-del", "arguments": {"id": "e"}}))

def sync_top(m, d, log):
    add_chain(m)
    log.append(target(m, d, backing="mid.qcow2"))
    B(m, log, device="top", target="tgt", sync="top", **{"job-id": "b"})
    wait_status(m, "b", (None,))

def fleecing(m, d, log):
    add_chain(m)
    export(m, log)
    log.append(target(m, d, backing="top.qcow2"))
    B(m, log, device="top", target="tgt", sync="none", **{"job-id": "f"})
    guest_writes(d)
    log.append(m.cmd({"execute": "job-cancel", "arguments": {"id": "f"}}))
    wait_status(m, "f", (None,))
    log.append(m.cmd({"execute": "block-export-del", "arguments": {"id": "e"}}))

# The targets are compared once the daemons have exited (QEMU keeps the
# last metadata of a backup target in its cache until then).
for sc in (full, point_in_time, sync_top, fleecing):
    sc.post = target_is_start
point_in_time.top_changes = fleecing.top_changes = True
failed = compare_jobs([refusals, full, point_in_time, sync_top, fleecing],
                      top, vdisk, qemu_img)
# A target in the source's backing chain would change what the source
# shows: refused (QEMU refuses it through its filter's permissions, in
# words that name the filter's generated node name).
d = os.path.join(top, "chain-vdisk")
make_chain(d, qemu_img)
m = Monitor([vdisk, "serve"], d)
add_chain(m)
r = m.cmd({"execute": "blockdev-backup", "arguments": {
    "device": "top", "target": "mid", "sync": "full", "job-id": "j"}})
m.cmd({"execute": "quit"})
m.close()
print("backup into the source's chain:", outcome(r, d))
if "error" not in r or "Permission conflict on node 'mid'" not in r["error"]["desc"]:
    failed.append("backup into the source's backing chain: %s" % r)

for f in failed:
    print(f)
sys.exit(1 if failed else 0)
PYEOF
