#!/usr/bin/env bash
# Cancelling each job at random points (two per job: soon after the
# start, and mid-copy or late): the job ends with BLOCK_JOB_CANCELLED (or
# COMPLETED when it was done already), the source stays intact and usable
# (the exported disk shows the copy made before plus the guest's writes,
# one of them made after the cancel), and every image, a cancelled
# mirror's or backup's target included, checks clean.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io python3 timeout
source "$(dirname "$0")/qmp-functions.bash"
tmpdir
qmp_lib

timeout 300 python3 - "$PWD" "$VDISK" "$QEMU_IMG" <<'PYEOF' || fail "a cancelled job left a damaged or unusable disk"
import os, random, subprocess, sys, time
from qmplib import *

top, vdisk, qemu_img = sys.argv[1], sys.argv[2], sys.argv[3]
seed = int(os.environ.get("VDISK_TEST_SEED", str(random.randrange(1 << 30))))
rnd = random.Random(seed)
print("seed", seed)

def run(*a):
    subprocess.run(a, check=True, stdout=subprocess.DEVNULL)

JOBS = [
    ("stream", "block-stream", {"device": "top"}),
    ("commit", "block-commit", {"device": "top", "top-node": "mid"}),
    ("active-commit", "block-commit", {"device": "top"}),
    ("mirror", "blockdev-mirror", {"device": "top", "target": "tgt", "sync": "full"}),
    ("backup", "blockdev-backup", {"device": "top", "target": "tgt", "sync": "full"}),
]

def write(d, off, byte, model=True):
    cmd = ["-c", "write -P 0x%02x %d 65536" % (byte, off), "-c", "flush"]
    run("qemu-io", "-f", "raw", *cmd, "nbd+unix:///top?socket=" + d + "/nbd.sock")
    run("qemu-io", "-f", "raw", *cmd, d + "/before.raw")

failed = []
for name, cmd, args in JOBS:
    for k, delay in enumerate((rnd.uniform(0, 0.3), rnd.uniform(0.3, 6))):
        d = os.path.join(top, "%s-%d" % (name, k))
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
        r = m.cmd({"execute": cmd, "arguments": dict(args, **{"job-id": "j", "speed": 524288})})
        write(d, rnd.randrange(0, 60) * 65536, 0x70 + k)
        time.sleep(delay)
        m.cmd({"execute": "job-cancel", "arguments": {"id": "j"}})
        wait_status(m, "j", (None,))
        write(d, rnd.randrange(0, 60) * 65536, 0x80 + k)
        ends = [e["event"] for e in m.events if e["event"] in
                ("BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED")]
        m.cmd({"execute": "block-export-del", "arguments": {"id": "e"}})
        m.cmd({"execute": "quit"})
        m.proc.wait(timeout=60)
        m.close()
        problems = []
        if "error" in r:
            problems.append(r["error"]["desc"])
        if len(ends) != 1:
            problems.append("end events %s" % ends)
        for img in ("base", "mid", "top", "tgt"):
            c = subprocess.run([qemu_img, "check", d + "/%s.qcow2" % img],
                               capture_output=True, text=True)
            if c.returncode != 0:
                problems.append("check %s: %s" % (img, c.stdout[-200:]))
        c = subprocess.run([qemu_img, "compare", "-f", "raw", "-F", "qcow2",
                            d + "/before.raw", d + "/top.qcow2"], capture_output=True, text=True)
        if c.returncode:
            problems.append("disk: " + c.stdout.strip())
        print("%-14s cancel after %.2fs: %s" % (name, delay, "; ".join(problems) or
              "%s, disk intact" % (ends[0] if ends else "-")))
        failed += ["%s/%d: %s" % (name, k, p) for p in problems]
for f in failed:
    print(f)
sys.exit(1 if failed else 0)
PYEOF
