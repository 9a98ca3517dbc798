#!/usr/bin/env bash
# kill -9 of `vdisk serve` in the middle of each job (stream, intermediate
# commit, active commit, mirror, backup) while a guest writes through an
# NBD export and flushes: afterwards every image passes `qemu-img check`
# (leaked clusters allowed, nothing else) and the exported disk, opened
# from its image, shows the copy made before plus every flushed write.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io python3 timeout
source "$(dirname "$0")/qmp-functions.bash"
tmpdir
qmp_lib

timeout 300 python3 - "$PWD" "$VDISK" "$QEMU_IMG" <<'PYEOF' || fail "a job killed mid-way lost data or left a corrupt image"
import os, subprocess, sys, time
from qmplib import *

top, vdisk, qemu_img = sys.argv[1], sys.argv[2], sys.argv[3]

def run(*a):
    subprocess.run(a, check=True, stdout=subprocess.DEVNULL)

JOBS = {
    "stream": ("block-stream", {"device": "top", "job-id": "j"}),
    "commit": ("block-commit", {"device": "top", "top-node": "mid", "job-id": "j"}),
    "active-commit": ("block-commit", {"device": "top", "job-id": "j"}),
    "mirror": ("blockdev-mirror", {"device": "top", "target": "tgt", "sync": "full", "job-id": "j"}),
    "backup": ("blockdev-backup", {"device": "top", "target": "tgt", "sync": "full", "job-id": "j"}),
}

failed = []
for name, (cmd, args) in JOBS.items():
    d = os.path.join(top, name)
    make_chain(d, qemu_img)
    run(qemu_img, "create", "-q", "-f", "qcow2", d + "/tgt.qcow2", "4M")
    m = Monitor([vdisk, "serve"], d)
    add_chain(m)
    m.cmd({"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "tgt",
           "file": {"driver": "file", "filename": "@D@/tgt.qcow2"}}})
    m.cmd({"execute": "nbd-server-start", "arguments": {
        "addr": {"type": "unix", "data": {"path": "@D@/nbd.sock"}}}})
    m.cmd({"execute": "block-export-add", "arguments": {
        "type": "nbd", "id": "e", "node-name": "top", "writable": True}})
    a = dict(args, speed=262144)
    r = m.cmd({"execute": cmd, "arguments": a})
    if "error" in r:
        failed.append("%s: %s" % (name, r["error"]["desc"]))
        m.close()
        continue
    cmds = []
    for i in range(10):
        off = (i * 397 * 1024) % (4 * 1024 * 1024 - 65536)
        cmds += ["-c", "write -P 0x%02x %d 65536" % (0x60 + i, off)]
    cmds += ["-c", "flush"]
    run("qemu-io", "-f", "raw", *cmds, "nbd+unix:///top?socket=" + d + "/nbd.sock")
    run("qemu-io", "-f", "raw", *cmds, d + "/before.raw")
    state = m.cmd({"execute": "query-jobs"})["return"]
    m.close()                               # SIGKILL, mid-job
    problems = []
    for img in ("base", "mid", "top", "tgt"):
        c = subprocess.run([qemu_img, "check", d + "/%s.qcow2" % img],
                           capture_output=True, text=True)
        if c.returncode not in (0, 3):
            problems.append("check %s: %d %s" % (img, c.returncode, c.stdout[-300:]))
    c = subprocess.run([qemu_img, "compare", "-f", "raw", "-F", "qcow2",
                        d + "/before.raw", d + "/top.qcow2"], capture_output=True, text=True)
    if c.returncode != 0:
        problems.append("the disk lost flushed writes: " + c.stdout.strip())
    print("%-14s killed in %s: %s" % (name, state[0]["status"] if state else "-",
                                      "; ".join(problems) or "images clean, writes kept"))
    failed += ["%s: %s" % (name, p) for p in problems]
for f in failed:
    print(f)
sys.exit(1 if failed else 0)
PYEOF
