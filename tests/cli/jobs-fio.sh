#!/usr/bin/env bash
# Each job under load: fio (nbd engine, two jobs at QD16 writing 4 KiB
# blocks at random at 500 IOPS each, each in its own half of the disk,
# with crc32c
# headers verified as it goes, verify_backlog) writes the exported top of
# a chain for 7 s (VDISK_JOBS_FIO_SECS) while `vdisk serve` streams, commits, mirrors or backs
# it up. Mirror and active commit must reach READY during the writes and
# are completed while fio still writes, so the pivot happens under load.
# fio must finish without a verify error (every block it reads back is the
# one it wrote last, whichever node serves it by then), every job must
# end with BLOCK_JOB_COMPLETED, and every image must check clean.
source "$(dirname "$0")/../functions.sh"
requires qemu-img fio python3 timeout
fio --enghelp 2>/dev/null | grep -qw nbd || { echo "fio has no nbd engine"; exit 77; }
source "$(dirname "$0")/qmp-functions.bash"
tmpdir
qmp_lib

timeout 600 python3 - "$PWD" "$VDISK" "$QEMU_IMG" <<'PYEOF' || fail "a job under fio's writes failed"
import os, subprocess, sys, time
from qmplib import *

top, vdisk, qemu_img = sys.argv[1], sys.argv[2], sys.argv[3]
SECS = int(os.environ.get("VDISK_JOBS_FIO_SECS", "7"))

def run(*a):
    subprocess.run(a, check=True, stdout=subprocess.DEVNULL)

def chain(d):
    os.makedirs(d)
    run(qemu_img, "create", "-q", "-f", "qcow2", d + "/base.qcow2", "64M")
    run("qemu-io", "-c", "write -P 0x11 0 32M", d + "/base.qcow2")
    run(qemu_img, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", d + "/mid.qcow2")
    run("qemu-io", "-c", "write -P 0x22 16M 16M", d + "/mid.qcow2")
    run(qemu_img, "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", d + "/top.qcow2")
    run(qemu_img, "create", "-q", "-f", "qcow2", d + "/tgt.qcow2", "64M")

JOBS = [
    ("stream", "block-stream", {"device": "top"}, False),
    ("commit", "block-commit", {"device": "top", "top-node": "mid"}, False),
    ("active-commit", "block-commit", {"device": "top"}, True),
    ("mirror", "blockdev-mirror", {"device": "top", "target": "tgt", "sync": "full"}, True),
    ("backup", "blockdev-backup", {"device": "top", "target": "tgt", "sync": "full"}, False),
]

failed = []
for name, cmd, args, completes in JOBS:
    d = os.path.join(top, name)
    chain(d)
    m = Monitor([vdisk, "serve"], d)
    add_chain(m)
    m.cmd({"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "tgt",
           "file": {"driver": "file", "filename": "@D@/tgt.qcow2"}}})
    m.cmd({"execute": "nbd-server-start", "arguments": {
        "addr": {"type": "unix", "data": {"path": "@D@/nbd.sock"}}}})
    m.cmd({"execute": "block-export-add", "arguments": {
        "type": "nbd", "id": "e", "node-name": "top", "writable": True}})
    fio = subprocess.Popen(["fio", "--name=w", "--ioengine=nbd",
        "--uri=nbd+unix:///top?socket=%s/nbd.sock" % d, "--rw=randwrite",
        "--bs=4k", "--iodepth=16", "--numjobs=2", "--size=32M",
        "--offset_increment=32M", "--time_based", "--runtime=%d" % SECS,
        # A steady guest (2 x 500 IOPS): background mirroring converges
        # under it even in the sanitizer builds.
        "--rate_iops=500",
        "--verify=crc32c", "--verify_backlog=256", "--verify_fatal=1",
        "--group_reporting"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    time.sleep(2)
    # The others slow enough to last through a good part of the writes;
    # mirror and active commit at full speed, to converge under them.
    r = m.cmd({"execute": cmd, "arguments": dict(args, **{"job-id": "j",
              "speed": 0 if completes else 8 << 20})})
    if "error" in r:
        failed.append("%s: %s" % (name, r["error"]["desc"]))
    ready_during = None
    if completes and "error" not in r:
        for _ in range(int(SECS * 50)):
            if any(e["event"] == "BLOCK_JOB_READY" for e in m.events):
                break
            m.cmd({"execute": "query-jobs"})
            time.sleep(0.02)
        ready_during = fio.poll() is None
        if not ready_during:
            wait_status(m, "j", ("ready",), secs=120)
        m.cmd({"execute": "job-complete", "arguments": {"id": "j"}})
    out, _ = fio.communicate(timeout=SECS + 120)
    if "error" not in r:
        wait_status(m, "j", (None,), secs=120)
    events = [e["event"] for e in m.events if e["event"].startswith("BLOCK_JOB")]
    m.cmd({"execute": "quit"})
    m.proc.wait(timeout=60)
    m.close()
    problems = []
    if fio.returncode != 0:
        problems.append("fio failed:\n" + out[-1500:])
    if completes and not ready_during:
        problems.append("READY came after fio's writes ended")
    if "BLOCK_JOB_COMPLETED" not in events:
        problems.append("events: %s" % events)
    for img in ("base", "mid", "top", "tgt"):
        c = subprocess.run([qemu_img, "check", d + "/%s.qcow2" % img],
                           capture_output=True, text=True)
        if c.returncode != 0:
            problems.append("check %s: %s" % (img, c.stdout[-300:]))
    iops = [l.strip() for l in out.splitlines() if "write: IOPS=" in l][:1]
    print("%-14s %s %s" % (name, "; ".join(problems) or "fio verified, images clean",
                           iops[0] if iops else ""))
    failed += ["%s: %s" % (name, p) for p in problems]
for f in failed:
    print(f)
sys.exit(1 if failed else 0)
PYEOF
