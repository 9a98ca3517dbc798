#!/usr/bin/env bash
# blockdev-mirror copy-mode=write-blocking (QEMU's active mirror) under
# `vdisk serve` and qemu-storage-daemon, the same QMP script sent to
# both. First without load: replies, events and the images compared with
# qemu-storage-daemon's, and guest writes made after READY land on the
# target (it shows them after the pivot). Then under a heavy guest: fio
# (nbd engine, two jobs at QD16 writing 4 KiB blocks at random as fast
# as they can, crc32c headers verified as it goes) writes the exported
# source while a speed-limited write-blocking mirror runs: it must reach
# READY while fio writes (every write goes to the target too, so the
# dirty bitmap only shrinks); in one run the target must then hold what
# the guest saw once fio is over (qemu-img compare after the pivot), in
# another the pivot happens under fio, which verifies every block it
# reads back, whichever node serves it.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-storage-daemon python3 timeout fio
fio --enghelp 2>/dev/null | grep -qw nbd || { echo "fio has no nbd engine"; exit 77; }
source "$(dirname "$0")/qmp-functions.bash"
tmpdir
qmp_lib

timeout 500 python3 - "$PWD" "$VDISK" "$QEMU_IMG" <<'PYEOF' || fail "write-blocking mirror failed or differs from qemu-storage-daemon"
import os, subprocess, sys, time
from qmplib import *

top, vdisk, qemu_img = sys.argv[1], sys.argv[2], sys.argv[3]
SECS = int(os.environ.get("VDISK_WB_FIO_SECS", "6"))

def run(*a):
    subprocess.run(a, check=True, stdout=subprocess.DEVNULL)

def add_target(m, d, size):
    run(qemu_img, "create", "-q", "-f", "qcow2", d + "/tgt.qcow2", size)
    return m.cmd({"execute": "blockdev-add", "arguments": {
        "driver": "qcow2", "node-name": "tgt",
        "file": {"driver": "file", "filename": "@D@/tgt.qcow2"}}})

def export(m, log):
    log.append(m.cmd({"execute": "nbd-server-start", "arguments": {
        "addr": {"type": "unix", "data": {"path": "@D@/nbd.sock"}}}}))
    log.append(m.cmd({"execute": "block-export-add", "arguments": {
        "type": "nbd", "id": "e", "node-name": "top", "writable": True}}))

def same(a, b, fa="qcow2", fb="qcow2"):
    return subprocess.run([qemu_img, "compare", "-U", "-f", fa, "-F", fb, a, b],
                          capture_output=True, text=True).returncode

def ready(m):
    return any(e["event"] == "BLOCK_JOB_READY" for e in m.events)

def wait_ready(m, secs=60):
    end = time.time() + secs
    while time.time() < end and not ready(m):
        m.cmd({"execute": "query-jobs"})
        time.sleep(0.02)
    return ready(m)

def guest_writes(d, first, model):
    cmds = []
    for i in range(8):
        off = ((first + i) * 337 * 1024) % (4 * 1024 * 1024 - 65536)
        cmds += ["-c", "write -P 0x%02x %d 65536" % (0x40 + first + i, off)]
    run("qemu-io", "-f", "raw", *cmds, "nbd+unix:///top?socket=" + d + "/nbd.sock")
    run("qemu-io", "-f", "raw", *cmds, model)

def M(m, log, **a):
    log.append(m.cmd({"execute": "blockdev-mirror", "arguments": a}))

# Without load: the same replies and events as QEMU's; writes after
# READY go through to the target, which shows them after the pivot.
def wb_pivot(m, d, log):
    add_chain(m)
    export(m, log)
    log.append(add_target(m, d, "4M"))
    M(m, log, device="top", target="tgt", sync="full",
      **{"job-id": "m", "copy-mode": "sometimes"})
    M(m, log, device="top", target="tgt", sync="full",
      **{"job-id": "m", "copy-mode": "write-blocking"})
    if not wait_ready(m):
        raise SystemExit("the mirror never became ready")
    log.append(m.cmd({"execute": "query-block-jobs"}))
    run("cp", d + "/before.raw", d + "/model.raw")
    guest_writes(d, 0, d + "/model.raw")
    log.append(("target is the model before the pivot",
                same(d + "/model.raw", d + "/tgt.qcow2", fa="raw")))
    log.append(m.cmd({"execute": "job-complete", "arguments": {"id": "m"}}))
    wait_status(m, "m", (None,))
    guest_writes(d, 8, d + "/model.raw")
    log.append(("target is the model", same(d + "/model.raw", d + "/tgt.qcow2", fa="raw")))
    log.append(m.cmd({"execute": "block-export-del", "arguments": {"id": "e"}}))

wb_pivot.top_changes = True
failed = compare_jobs([wb_pivot], top, vdisk, qemu_img)

# Under a heavy guest, in both daemons.
def fio(d, secs):
    return subprocess.Popen(["fio", "--name=w", "--ioengine=nbd",
        "--uri=nbd+unix:///top?socket=%s/nbd.sock" % d, "--rw=randwrite",
        "--bs=4k", "--iodepth=16", "--numjobs=2", "--size=32M",
        "--offset_increment=32M", "--time_based", "--runtime=%d" % secs,
        "--verify=crc32c", "--verify_backlog=256", "--verify_fatal=1",
        "--group_reporting"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)

def load(name, argv, pivot_under_load):
    d = os.path.join(top, "load-%s-%s" % (name, pivot_under_load))
    os.makedirs(d)
    run(qemu_img, "create", "-q", "-f", "qcow2", d + "/base.qcow2", "64M")
    run("qemu-io", "-c", "write -P 0x11 0 32M", d + "/base.qcow2")
    run(qemu_img, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F",
        "qcow2", d + "/top.qcow2")
    m = Monitor(argv, d)
    for n, b in (("base", None), ("top", "base")):
        a = {"driver": "qcow2", "node-name": n,
             "file": {"driver": "file", "filename": "@D@/%s.qcow2" % n}}
        if b:
            a["backing"] = b
        m.cmd({"execute": "blockdev-add", "arguments": a})
    add_target(m, d, "64M")
    export(m, [])
    problems = []
    f = fio(d, SECS)
    time.sleep(1)
    r = m.cmd({"execute": "blockdev-mirror", "arguments": {
        "job-id": "m", "device": "top", "target": "tgt", "sync": "full",
        "copy-mode": "write-blocking", "speed": 32 << 20}})
    if "error" in r:
        problems.append("mirror: %s" % r["error"]["desc"])
    elif not wait_ready(m, SECS + 60) or f.poll() is not None:
        problems.append("READY came after fio's writes ended")
    if pivot_under_load and "error" not in r:
        time.sleep(1)
        m.cmd({"execute": "job-complete", "arguments": {"id": "m"}})
        wait_status(m, "m", (None,), secs=120)
        if f.poll() is not None:
            problems.append("the pivot came after fio's writes ended")
    out, _ = f.communicate(timeout=SECS + 120)
    if f.returncode != 0:
        problems.append("fio failed:\n" + out[-1500:])
    iops = [l.strip() for l in out.splitlines() if "write: IOPS=" in l][:1]
    if not pivot_under_load and "error" not in r:
        # What the guest sees now; then the pivot, no write in between.
        run(qemu_img, "convert", "-O", "raw", "-f", "raw",
            "nbd+unix:///top?socket=%s/nbd.sock" % d, d + "/guest.raw")
        m.cmd({"execute": "job-complete", "arguments": {"id": "m"}})
        wait_status(m, "m", (None,), secs=120)
    evs = [e["event"] for e in m.events if e["event"].startswith("BLOCK_JOB")]
    if "error" not in r and "BLOCK_JOB_COMPLETED" not in evs:
        problems.append("events: %s" % evs)
    m.cmd({"execute": "quit"})
    m.proc.wait(timeout=60)
    m.close()
    if not pivot_under_load and "error" not in r and \
            same(d + "/guest.raw", d + "/tgt.qcow2", fa="raw") != 0:
        problems.append("the target is not what the guest wrote")
    for img in ("base", "top", "tgt"):
        c = subprocess.run([qemu_img, "check", d + "/%s.qcow2" % img],
                           capture_output=True, text=True)
        if c.returncode != 0:
            problems.append("check %s: %s" % (img, c.stdout[-300:]))
    print("load %-6s %-12s %s %s" % (name, "pivot" if pivot_under_load else "then pivot",
          "; ".join(problems) or "READY under fio, %s" % (
              "pivot under fio verified" if pivot_under_load else "target equal"),
          iops[0] if iops else ""))
    return ["%s: %s" % (name, p) for p in problems]

for name, argv in (("qemu", ["qemu-storage-daemon"]), ("vdisk", [vdisk, "serve"])):
    failed += load(name, argv, False)
    failed += load(name, argv, True)

for x in failed:
    print(x)
sys.exit(1 if failed else 0)
PYEOF
