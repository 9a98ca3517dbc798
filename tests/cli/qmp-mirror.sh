#!/usr/bin/env bash
# blockdev-mirror and active commit under `vdisk serve` and
# qemu-storage-daemon, one QMP script sent to both on twin chains
# (base <- mid <- top, top exported over NBD in most scenarios): replies,
# event sequences (READY, COMPLETED or CANCELLED with len and offset)
# and job queries compared with qemu-storage-daemon's, and the images
# checked afterwards: the target shows what the source showed (qemu-img
# compare with a copy made before, plus the guest's writes), the pivot
# sends the export's later writes to the target and never to the source,
# a soft cancel of a READY mirror completes without the pivot, a forced
# one cancels, sync top and none copy what they should, and an active
# commit moves the export to the base. Also: QEMU's refusals (granularity,
# buf-size, sync modes, nodes not found, into itself, a target someone
# else reads).
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-storage-daemon python3 timeout
source "$(dirname "$0")/qmp-functions.bash"
tmpdir
qmp_lib

timeout 400 python3 - "$PWD" "$VDISK" "$QEMU_IMG" <<'PYEOF' || fail "mirror differs from qemu-storage-daemon"
import os, subprocess, sys, time
from qmplib import *

top, vdisk, qemu_img = sys.argv[1], sys.argv[2], sys.argv[3]

def run(*a):
    subprocess.run(a, check=True, stdout=subprocess.DEVNULL)

def target(m, d, backing=None):
    args = [qemu_img, "create", "-q", "-f", "qcow2", d + "/tgt.qcow2", "4M"]
    if backing:
        args[5:5] = ["-b", backing, "-F", "qcow2"]
    run(*args)
    a = {"driver": "qcow2", "node-name": "tgt",
         "file": {"driver": "file", "filename": "@D@/tgt.qcow2"}}
    if backing:
        a["backing"] = "mid"
    return m.cmd({"execute": "blockdev-add", "arguments": a})

def export(m, log):
    log.append(m.cmd({"execute": "nbd-server-start", "arguments": {
        "addr": {"type": "unix", "data": {"path": "@D@/nbd.sock"}}}}))
    log.append(m.cmd({"execute": "block-export-add", "arguments": {
        "type": "nbd", "id": "e", "node-name": "top", "writable": True}}))

def guest_writes(d, first, model):
    cmds = []
    for i in range(8):
        off = ((first + i) * 337 * 1024) % (4 * 1024 * 1024 - 65536)
        cmds += ["-c", "write -P 0x%02x %d 65536" % (0x40 + first + i, off)]
    run("qemu-io", "-f", "raw", *cmds, "nbd+unix:///top?socket=" + d + "/nbd.sock")
    run("qemu-io", "-f", "raw", *cmds, model)

def same(d, a, b, fa="raw", fb="qcow2"):
    return subprocess.run([qemu_img, "compare", "-U", "-f", fa, "-F", fb,
                           d + "/" + a, d + "/" + b],
                          capture_output=True, text=True).returncode

def wait_ready(m, job):
    for _ in range(3000):
        if any(e["event"] == "BLOCK_JOB_READY" for e in m.events):
            return True
        m.cmd({"execute": "query-jobs"})
        time.sleep(0.01)
    raise SystemExit("%s never became ready" % job)

def M(m, log, **a):
    log.append(m.cmd({"execute": "blockdev-mirror", "arguments": a}))

def refusals(m, d, log):
    add_chain(m)
    log.append(target(m, d))
    M(m, log, device="nope", target="tgt", sync="full", **{"job-id": "j"})
    M(m, log, device="mid", target="tgt", sync="full", **{"job-id": "j"})
    M(m, log, device="top", target="nope", sync="full", **{"job-id": "j"})
    M(m, log, device="top", target="top", sync="full", **{"job-id": "j"})
    M(m, log, device="top", target="tgt", sync="full", granularity=1000, **{"job-id": "j"})
    M(m, log, device="top", target="tgt", sync="full", granularity=256, **{"job-id": "j"})
    M(m, log, device="top", target="tgt", sync="full", granularity=128 << 20, **{"job-id": "j"})
    M(m, log, device="top", target="tgt", sync="full", **{"job-id": "j", "buf-size": -1})
    M(m, log, device="top", target="tgt", sync="bitmap", **{"job-id": "j"})
    M(m, log, device="top", target="tgt", sync="sometimes", **{"job-id": "j"})
    M(m, log, device="top", target="tgt", sync="full")
    M(m, log, device="top", target="tgt", sync="full", **{"job-id": "j", "speed": -1})
    # Someone reads the target: the mirror writes it alone.
    log.append(m.cmd({"execute": "nbd-server-start", "arguments": {
        "addr": {"type": "unix", "data": {"path": "@D@/nbd.sock"}}}}))
    log.append(m.cmd({"execute": "block-export-add", "arguments": {
        "type": "nbd", "id": "t", "node-name": "tgt"}}))
    M(m, log, device="top", target="tgt", sync="full", **{"job-id": "j"})
    log.append(m.cmd({"execute": "query-jobs"}))

def pivot(m, d, log):
    add_chain(m)
    export(m, log)
    log.append(target(m, d))
    M(m, log, device="top", target="tgt", sync="full", **{"job-id": "m"})
    wait_ready(m, "m")
    log.append(m.cmd({"execute": "query-block-jobs"}))
    log.append(m.cmd({"execute": "blockdev-del", "arguments": {"node-name": "tgt"}}))
    log.append(m.cmd({"execute": "job-complete", "arguments": {"id": "m"}}))
    wait_status(m, "m", (None,))
    # The export now serves the target: these writes must land there
    # and the source must stay as it was.
    run("cp", d + "/before.raw", d + "/model.raw")
    guest_writes(d, 0, d + "/model.raw")
    log.append(("target is the model", same(d, "model.raw", "tgt.qcow2")))
    log.append(m.cmd({"execute": "block-export-del", "arguments": {"id": "e"}}))

def soft_cancel(m, d, log):
    add_chain(m)
    log.append(target(m, d))
    M(m, log, device="top", target="tgt", sync="full", **{"job-id": "m"})
    wait_ready(m, "m")
    log.append(m.cmd({"execute": "job-complete", "arguments": {"id": "nope"}}))
    log.append(m.cmd({"execute": "block-job-cancel", "arguments": {"device": "m"}}))
    wait_status(m, "m", (None,))
    log.append(("target is the source", same(d, "before.raw", "tgt.qcow2")))

def force_cancel(m, d, log):
    add_chain(m)
    log.append(target(m, d))
    M(m, log, device="top", target="tgt", sync="full", **{"job-id": "m",
      "auto-dismiss": False})
    wait_ready(m, "m")
    log.append(m.cmd({"execute": "block-job-cancel", "arguments": {"device": "m", "force": True}}))
    wait_status(m, "m", ("concluded",))
    log.append(m.cmd({"execute": "query-jobs"}))
    log.append(m.cmd({"execute": "job-dismiss", "arguments": {"id": "m"}}))

def sync_top(m, d, log):
    add_chain(m)
    log.append(target(m, d, backing="mid.qcow2"))
    M(m, log, device="top", target="tgt", sync="top", **{"job-id": "m"})
    wait_ready(m, "m")
    log.append(m.cmd({"execute": "job-complete", "arguments": {"id": "m"}}))
    wait_status(m, "m", (None,))
    log.append(("target is the source", same(d, "before.raw", "tgt.qcow2")))

def sync_none(m, d, log):
    add_chain(m)
    export(m, log)
    log.append(target(m, d, backing="mid.qcow2"))
    M(m, log, device="top", target="tgt", sync="none", **{"job-id": "m"})
    wait_ready(m, "m")
    run("cp", d + "/before.raw", d + "/model.raw")
    guest_writes(d, 0, d + "/model.raw")
    log.append(m.cmd({"execute": "job-complete", "arguments": {"id": "m"}}))
    wait_status(m, "m", (None,))
    # tgt's own layer got only the guest's writes: over mid it shows
    # them, and mid where the top had data the mirror never copied.
    log.append(("writes in target", same(d, "model.raw", "tgt.qcow2") != 0))
    log.append(m.cmd({"execute": "block-export-del", "arguments": {"id": "e"}}))
    run("cp", d + "/before.raw", d + "/top-model.raw")

def live(m, d, log):
    add_chain(m)
    export(m, log)
    log.append(target(m, d))
    M(m, log, device="top", target="tgt", sync="full", speed=2 << 20,
      **{"job-id": "m"})
    run("cp", d + "/before.raw", d + "/model.raw")
    guest_writes(d, 0, d + "/model.raw")
    wait_ready(m, "m")
    guest_writes(d, 8, d + "/model.raw")
    log.append(m.cmd({"execute": "job-complete", "arguments": {"id": "m"}}))
    wait_status(m, "m", (None,))
    guest_writes(d, 16, d + "/model.raw")
    log.append(("target is the model", same(d, "model.raw", "tgt.qcow2")))
    log.append(m.cmd({"execute": "block-export-del", "arguments": {"id": "e"}}))
    # The source got the first writes (before the pivot) only.
    run("cp", d + "/before.raw", d + "/before-writes.raw")

def active_commit(m, d, log):
    add_chain(m)
    export(m, log)
    log.append(m.cmd({"execute": "block-commit", "arguments": {
        "device": "top", "job-id": "c", "base-node": "base"}}))
    wait_ready(m, "c")
    log.append(m.cmd({"execute": "query-block-jobs"}))
    log.append(m.cmd({"execute": "job-complete", "arguments": {"id": "c"}}))
    wait_status(m, "c", (None,))
    run("cp", d + "/before.raw", d + "/model.raw")
    guest_writes(d, 0, d + "/model.raw")
    log.append(("base is the model", same(d, "model.raw", "base.qcow2")))
    log.append(m.cmd({"execute": "block-export-del", "arguments": {"id": "e"}}))

# Writes reach the top (sync none, before the pivot) or its base (active
# commit): the top shows them.
sync_none.top_changes = active_commit.top_changes = True
failed = compare_jobs([refusals, pivot, soft_cancel, force_cancel, sync_top,
                       sync_none, active_commit], top, vdisk, qemu_img)
# Guest writes during the copy, after READY and after the pivot: the
# progress figures depend on timing, so only what the images hold is
# checked, in both daemons.
for name, argv in (("qemu", ["qemu-storage-daemon"]), ("vdisk", [vdisk, "serve"])):
    d = os.path.join(top, "live-" + name)
    make_chain(d, qemu_img)
    m = Monitor(argv, d)
    log = []
    live(m, d, log)
    m.cmd({"execute": "quit"})
    m.proc.wait(timeout=60)
    m.close()
    got = [x for x in log if isinstance(x, tuple)]
    print("live %-6s %s" % (name, got))
    if got != [("target is the model", 0)]:
        failed.append("live in %s: %s" % (name, got))
    if same(d, "before.raw", "top.qcow2") == 0:
        failed.append("live in %s: the source got none of the writes" % name)

for f in failed:
    print(f)
sys.exit(1 if failed else 0)
PYEOF
