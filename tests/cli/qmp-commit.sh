#!/usr/bin/env bash
# block-commit of an intermediate layer under `vdisk serve` and
# qemu-storage-daemon, one QMP script sent to both on twin chains
# (base <- mid <- top, each layer with data of its own; top is the active
# layer): every reply compared (outcome, error class and text, QEMU's
# checks in QEMU's order), the event sequences compared event by event,
# and the images afterwards: the top shows what it showed before (qemu-img
# compare with a copy made before), checks clean, and the chain is the
# same (mid dropped, the header naming the base or the backing-file
# override). Also: cancel, manual finalize, a second job on busy nodes,
# and guest writes to the active layer through an NBD export while the
# job commits below it.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-storage-daemon python3 timeout
source "$(dirname "$0")/qmp-functions.bash"
tmpdir
qmp_lib

timeout 300 python3 - "$PWD" "$VDISK" "$QEMU_IMG" <<'PYEOF' || fail "block-commit differs from qemu-storage-daemon"
import os, subprocess, sys
from qmplib import *

top, vdisk, qemu_img = sys.argv[1], sys.argv[2], sys.argv[3]

def commit(m, log, **a):
    log.append(m.cmd({"execute": "block-commit", "arguments": a}))

def refusals(m, d, log):
    add_chain(m)
    C = lambda **a: commit(m, log, **a)
    C(device="nope")
    C(device="mid", **{"job-id": "j"})
    C(device="top", **{"job-id": "j", "top": "x", "top-node": "mid"})
    C(device="top", **{"job-id": "j", "top-node": "nope"})
    C(device="top", **{"job-id": "j", "top": "@D@/nope.qcow2"})
    C(device="top", **{"job-id": "j", "top-node": "mid", "base": "x", "base-node": "base"})
    C(device="top", **{"job-id": "j", "top-node": "mid", "base-node": "nope"})
    C(device="top", **{"job-id": "j", "top-node": "mid", "base-node": "top"})
    C(device="top", **{"job-id": "j", "top-node": "mid", "base": "@D@/nope.qcow2"})
    C(device="top", **{"job-id": "j", "top-node": "base"})
    C(device="top", **{"job-id": "j", "top-node": "mid", "base-node": "mid"})
    C(device="top", **{"job-id": "j", "backing-file": "x"})
    C(device="top", **{"top-node": "mid"})
    C(device="top", **{"job-id": "1x", "top-node": "mid"})
    C(device="top", **{"job-id": "j", "top-node": "mid", "speed": -1})
    C(device="top", **{"job-id": "j", "top-node": "mid", "on-error": "x"})
    C(device="top", **{"job-id": "j", "top-node": "mid", "nope": 1})
    log.append(m.cmd({"execute": "query-jobs"}))

def intermediate(m, d, log):
    add_chain(m)
    commit(m, log, device="top", **{"job-id": "c", "top-node": "mid",
                                    "base-node": "base"})
    wait_status(m, "c", (None,))
    log.append(m.cmd({"execute": "query-named-block-nodes", "arguments": {"flat": True}})
               ["return"].__len__())

def by_filename(m, d, log):
    # The chain from the images' headers: QEMU finds layers by file name
    # only there (docs/jobs.md).
    log.append(m.cmd({"execute": "blockdev-add", "arguments": {
        "driver": "qcow2", "node-name": "top",
        "file": {"driver": "file", "filename": "@D@/top.qcow2"}}}))
    commit(m, log, device="top", **{"job-id": "c", "top": "mid.qcow2",
                                    "backing-file": "base.qcow2",
                                    "auto-finalize": False,
                                    "auto-dismiss": False})
    wait_status(m, "c", ("pending",))
    log.append(m.cmd({"execute": "query-block-jobs"}))
    log.append(m.cmd({"execute": "job-finalize", "arguments": {"id": "c"}}))
    wait_status(m, "c", ("concluded",))
    log.append(m.cmd({"execute": "query-jobs"}))
    log.append(m.cmd({"execute": "job-dismiss", "arguments": {"id": "c"}}))

def busy_and_cancel(m, d, log):
    add_chain(m)
    commit(m, log, device="top", **{"job-id": "c", "top-node": "mid",
                                    "speed": 262144})
    wait_progress(m)
    commit(m, log, device="top", **{"job-id": "d", "top-node": "mid"})
    log.append(m.cmd({"execute": "block-stream", "arguments": {"device": "top", "job-id": "s"}}))
    log.append(m.cmd({"execute": "blockdev-del", "arguments": {"node-name": "base"}}))
    log.append(m.cmd({"execute": "block_resize", "arguments": {"node-name": "base", "size": 8388608}}))
    log.append(m.cmd({"execute": "job-complete", "arguments": {"id": "c"}}))
    log.append(m.cmd({"execute": "block-job-cancel", "arguments": {"device": "c"}}))
    wait_status(m, "c", (None,))

def live(m, d, log):
    add_chain(m)
    log.append(m.cmd({"execute": "nbd-server-start", "arguments": {
        "addr": {"type": "unix", "data": {"path": "@D@/nbd.sock"}}}}))
    log.append(m.cmd({"execute": "block-export-add", "arguments": {
        "type": "nbd", "id": "e", "node-name": "top", "writable": True}}))
    commit(m, log, device="top", **{"job-id": "l", "top-node": "mid",
                                    "speed": 1048576})
    cmds = []
    for i in range(12):
        off = (i * 337 * 1024) % (4 * 1024 * 1024 - 65536)
        cmds += ["-c", "write -P 0x%02x %d 65536" % (0x40 + i, off)]
    for target in ("nbd+unix:///top?socket=" + d + "/nbd.sock",
                   d + "/before.raw"):
        subprocess.run(["qemu-io", "-f", "raw"] + cmds + [target], check=True,
                       stdout=subprocess.DEVNULL)
    wait_status(m, "l", (None,))
    log.append(m.cmd({"execute": "block-export-del", "arguments": {"id": "e"}}))

failed = compare_jobs([refusals, intermediate, by_filename, busy_and_cancel,
                       live], top, vdisk, qemu_img)
for f in failed:
    print(f)
sys.exit(1 if failed else 0)
PYEOF
