#!/usr/bin/env bash
# Bad arguments to the job commands under `vdisk serve` and
# qemu-storage-daemon, one QMP script sent to both on twin chains
# (base <- mid <- top, and a lone node "other"): every argument QEMU
# validates, for block-stream, block-commit, blockdev-mirror,
# drive-mirror, blockdev-backup and drive-backup (nodes and devices that
# are not there, a base that is not in the chain or above the top, top
# equal to base, granularity, buf-size, speed, sync and bitmap
# combinations, job ids taken or malformed, backing-file where QEMU
# refuses it, drive-mirror's mode=existing without the file and unknown
# formats, replaces naming a node the mirror may not replace), each
# answer's class and text compared with qemu-storage-daemon's, the
# events too, and every image byte-identical after each refusal. Then the
# replaces that QEMU takes: a mirror of a filter replacing the filter's
# child, the graph compared after the pivot.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-storage-daemon python3 timeout
source "$(dirname "$0")/qmp-functions.bash"
tmpdir
qmp_lib

timeout 300 python3 - "$PWD" "$VDISK" "$QEMU_IMG" <<'PYEOF' || fail "job arguments are answered differently from qemu-storage-daemon"
import hashlib, os, subprocess, sys, time
from qmplib import *

top, vdisk, qemu_img = sys.argv[1], sys.argv[2], sys.argv[3]

def run(*a):
    subprocess.run(a, check=True, stdout=subprocess.DEVNULL)

def sums(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith((".qcow2", ".raw")) and f != "before.raw":
            with open(os.path.join(d, f), "rb") as h:
                out[f] = hashlib.sha256(h.read()).hexdigest()
    return out

before = {}
bad = []

def unchanged(d):
    now = sums(d)
    return [("images unchanged", [f for f in before[d]
                                  if now.get(f) != before[d][f]]),
            ("images added", sorted(set(now) - set(before[d])))]

def setup(m, d):
    add_chain(m)
    run(qemu_img, "create", "-q", "-f", "qcow2", d + "/other.qcow2", "4M")
    run(qemu_img, "create", "-q", "-f", "qcow2", d + "/tgt.qcow2", "4M")
    run(qemu_img, "create", "-q", "-f", "qcow2", d + "/small.qcow2", "1M")
    run(qemu_img, "create", "-q", "-f", "qcow2", d + "/big.qcow2", "8M")
    for n in ("other", "tgt", "small", "big"):
        m.cmd({"execute": "blockdev-add", "arguments": {
            "driver": "qcow2", "node-name": n,
            "file": {"driver": "file", "filename": "@D@/%s.qcow2" % n}}})
    before[d] = sums(d)

def refusals(m, d, log):
    setup(m, d)
    touched = []
    def C(cmd, cancel=True, **a):
        was = sums(d)
        r = m.cmd({"execute": cmd, "arguments": a})
        log.append([cmd, sorted(a), r])
        if "error" in r:
            # A refusal leaves every image as it was (drive-mirror makes
            # its target before it checks the speed, as QEMU's).
            now = sums(d)
            touched.extend("%s %s: %s" % (cmd, sorted(a), f) for f in was
                           if was[f] != now.get(f))
        if "return" in r and "job-id" in a and cancel is not None:
            # Taken (the job runs at 1 byte/s): out of the way of the
            # next command (cancel=None: left running).
            if cancel:
                m.cmd({"execute": "job-cancel", "arguments": {"id": a["job-id"]}})
            wait_status(m, a["job-id"], (None,))
    j = {"job-id": "j"}
    # Nodes and devices that are not there.
    C("block-stream", device="nope", **j)
    C("block-stream", device="top", **{"base-node": "nope"}, **j)
    C("block-stream", device="top", base="nope.qcow2", **j)
    C("block-stream", device="top", bottom="nope", **j)
    C("block-commit", device="nope", **j)
    C("block-commit", device="top", **{"top-node": "nope"}, **j)
    C("block-commit", device="top", **{"base-node": "nope"}, **j)
    C("block-commit", device="top", top="nope.qcow2", **j)
    C("block-commit", device="top", base="nope.qcow2", **j)
    C("blockdev-mirror", device="nope", target="tgt", sync="full", **j)
    C("blockdev-mirror", device="top", target="nope", sync="full", **j)
    C("drive-mirror", device="nope", target="@D@/t.qcow2", sync="full", **j)
    C("blockdev-backup", device="nope", target="tgt", sync="full", **j)
    C("blockdev-backup", device="top", target="nope", sync="full", **j)
    C("drive-backup", device="nope", target="@D@/t.qcow2", sync="full", **j)
    # Bases that are not in the chain, above the top, the top itself.
    C("block-stream", device="top", **{"base-node": "other"}, **j)
    C("block-stream", device="top", **{"base-node": "top"}, **j)
    C("block-stream", device="mid", **{"base-node": "top"}, **j)
    C("block-stream", device="top", bottom="other", **j)
    C("block-stream", device="top", bottom="base", **{"base-node": "base"}, **j)
    C("block-stream", device="top", base="base.qcow2", **{"base-node": "base"}, **j)
    C("block-commit", device="top", **{"top-node": "other"}, **j)
    C("block-commit", device="top", **{"base-node": "other"}, **j)
    C("block-commit", device="top", **{"top-node": "mid", "base-node": "mid"}, **j)
    C("block-commit", device="top", **{"top-node": "base", "base-node": "mid"}, **j)
    C("block-commit", device="top", **{"top-node": "top", "base-node": "top"}, **j)
    C("block-commit", device="top", top="mid.qcow2", **{"top-node": "mid"}, **j)
    C("block-commit", device="top", base="base.qcow2", **{"base-node": "base"}, **j)
    C("block-commit", device="mid", **{"base-node": "base"}, **j)
    # backing-file: QEMU refuses it for an active commit and for a
    # stream without a base.
    C("block-commit", device="top", **{"backing-file": "x.qcow2"}, **j)
    C("block-commit", device="top", **{"top-node": "top", "backing-file": "x.qcow2"}, **j)
    C("block-stream", device="top", **{"backing-file": "x.qcow2"}, **j)
    # Speeds.
    C("block-stream", device="top", speed=-1, **j)
    C("block-commit", device="top", **{"top-node": "mid"}, speed=-1, **j)
    C("block-commit", device="top", speed=-1, **j)
    C("blockdev-mirror", device="top", target="tgt", sync="full", speed=-1, **j)
    C("blockdev-backup", device="top", target="tgt", sync="full", speed=-1, **j)
    C("drive-mirror", device="top", target="@D@/t.qcow2", sync="full", speed=-1, **j)
    C("drive-backup", device="top", target="@D@/t.qcow2", sync="full", speed=-1, **j)
    # Granularity and buffer size.
    for g in (256, 1000, 4096 + 512, 128 << 20, 1 << 30, 512, 64 << 20):
        C("blockdev-mirror", device="top", target="tgt", sync="full", speed=1,
          granularity=g, **j)
    C("drive-mirror", device="top", target="@D@/t.qcow2", sync="full", granularity=1000, **j)
    # (buf-size 1 TiB: QEMU's job fails with ENOMEM once it runs, vdisk
    # refuses the command; both leave everything as it was.)
    for b in (-1, 1):
        C("blockdev-mirror", device="top", target="tgt", sync="full", speed=1,
          **{"buf-size": b}, **j)
    # Sync modes and bitmaps (none exist: the answers still say which
    # check comes first).
    for s in ("bitmap", "incremental"):
        C("blockdev-mirror", device="top", target="tgt", sync=s, **j)
        C("blockdev-backup", device="top", target="tgt", sync=s, **j)
        C("drive-backup", device="top", target="@D@/t.qcow2", sync=s, **j)
    C("blockdev-backup", device="top", target="tgt", sync="bitmap", bitmap="b", **j)
    C("blockdev-backup", device="top", target="tgt", sync="full", bitmap="b", **j)
    C("blockdev-backup", device="top", target="tgt", sync="none", bitmap="b", **j)
    C("blockdev-backup", device="top", target="tgt", sync="full", **{"bitmap-mode": "always"}, **j)
    C("drive-backup", device="top", target="@D@/t.qcow2", sync="full", bitmap="b", **j)
    # Sizes: QEMU's mirror fails once it runs, its backup refuses. (Bug:
    # vdisk's mirror into a smaller target became ready, the pivot would
    # have cut the disk short.)
    C("blockdev-mirror", device="top", target="small", sync="full", cancel=False, **j)
    C("blockdev-mirror", device="top", target="big", sync="full", cancel=False, **j)
    C("blockdev-backup", device="top", target="small", sync="full", **j)
    C("blockdev-backup", device="top", target="big", sync="full", **j)
    # Job ids.
    for jid in ("", "1j", "j k", "#j", "_j", "-j", "j/k", "j.k", "a" * 200):
        C("block-stream", device="top", speed=1, **{"job-id": jid})
    C("blockdev-backup", device="other", target="tgt", sync="none", speed=1,
      cancel=None, **{"job-id": "dup"})
    C("block-stream", device="top", speed=1, **{"job-id": "dup"})
    C("blockdev-mirror", device="top", target="big", sync="full", speed=1, **{"job-id": "dup"})
    C("job-cancel", id="dup")
    wait_status(m, "dup", (None,))
    # drive-mirror and drive-backup targets.
    C("drive-mirror", device="top", target="@D@/missing.qcow2", sync="full", mode="existing", **j)
    C("drive-mirror", device="top", target="@D@/missing.qcow2", sync="top", mode="existing", **j)
    C("drive-mirror", device="top", target="@D@/t.qcow2", sync="full", format="nope", **j)
    C("drive-mirror", device="top", target="@D@/t.qcow2", sync="full", format="file",
      speed=1, **j)
    C("drive-mirror", device="top", target="@D@/t.qcow2", sync="full", mode="sometimes", **j)
    C("drive-mirror", device="top", target="@D@/t.qcow2", sync="full", replaces="mid", **j)
    C("drive-backup", device="top", target="@D@/missing.qcow2", sync="full", mode="existing", **j)
    C("drive-backup", device="top", target="@D@/t.qcow2", sync="full", format="nope", **j)
    log.append(m.cmd({"execute": "query-jobs"}))
    # vdisk's alone: qemu-storage-daemon has been seen to rewrite the top
    # some time after an accepted job was cancelled.
    if d.endswith("-vdisk") and touched:
        bad.append("images changed by refusals: %s" % touched)
    # Where a cancelled job stood is a matter of timing.
    for e in m.events:
        if e["event"] == "BLOCK_JOB_CANCELLED":
            e["data"]["offset"] = e["data"]["len"] = "(timing)"

def replaces(m, d, log):
    # Not there, in use (a backing node), neither the source nor below
    # it through filters, of another size. On fresh nodes: a job that
    # ran on QEMU's chain lifts its backing blockers.
    setup(m, d)
    for r in ("nope", "other", "mid", "base", "tgt", "small", "big"):
        log.append(m.cmd({"execute": "blockdev-mirror", "arguments": {
            "device": "top", "target": "tgt", "sync": "full", "replaces": r,
            "job-id": "j"}}))
    log.append(m.cmd({"execute": "drive-mirror", "arguments": {
        "device": "top", "target": "@D@/t.qcow2", "sync": "full",
        "replaces": "other", "node-name": "tn", "job-id": "j"}}))
    log.append(m.cmd({"execute": "query-jobs"}))

def started(m, d, log):
    # A job the command started is running when the answer comes (vdisk's
    # backup showed the pause it makes at its start to a query right
    # after).
    setup(m, d)
    seen = set()
    for i in range(10):
        jid = "b%d" % i
        log.append(m.cmd({"execute": "blockdev-backup", "arguments": {
            "device": "top", "target": "tgt", "sync": "full", "speed": 1,
            "job-id": jid}}))
        seen.add(m.cmd({"execute": "query-jobs"})["return"][0]["status"])
        m.cmd({"execute": "job-cancel", "arguments": {"id": jid}})
        wait_status(m, jid, (None,))
    log.append(sorted(seen))
    m.events.clear()    # cancelled at 1 byte/s: where is timing

def filtered(m, d):
    # top under a filter node: the filter is what users would see.
    add_chain(m)
    run(qemu_img, "create", "-q", "-f", "qcow2", d + "/tgt.qcow2", "4M")
    m.cmd({"execute": "blockdev-add", "arguments": {
        "driver": "qcow2", "node-name": "tgt",
        "file": {"driver": "file", "filename": "@D@/tgt.qcow2"}}})
    return m.cmd({"execute": "blockdev-add", "arguments": {
        "driver": "blkdebug", "node-name": "flt", "image": "top"}})

def graph(m):
    r = m.cmd({"execute": "query-named-block-nodes", "arguments": {"flat": True}})["return"]
    return sorted((n["node-name"], n["drv"]) for n in r
                  if not n["node-name"].startswith("#"))

def replace_child(m, d, log):
    # Bug: a mirror of a filter over a backing chain copied the child's
    # own layer only (block status stopped at the filter), and the
    # target lost what the layers below held once it replaced the child.
    # QEMU's tests mirror a filter (quorum) and replace its child: the
    # filter then reads from the target.
    log.append(filtered(m, d))
    log.append(m.cmd({"execute": "blockdev-mirror", "arguments": {
        "device": "flt", "target": "tgt", "sync": "full", "replaces": "top",
        "job-id": "m"}}))
    if "return" in log[-1]:
        wait_status(m, "m", ("ready",))
        log.append(m.cmd({"execute": "job-complete", "arguments": {"id": "m"}}))
        wait_status(m, "m", (None,))
    log.append(graph(m))
    log.append(m.cmd({"execute": "blockdev-del", "arguments": {"node-name": "flt"}}))
    log.append(m.cmd({"execute": "blockdev-del", "arguments": {"node-name": "top"}}))

def replace_filter(m, d, log):
    # The other way round: a mirror of the child may not replace the
    # filter above it.
    log.append(filtered(m, d))
    log.append(m.cmd({"execute": "blockdev-mirror", "arguments": {
        "device": "top", "target": "tgt", "sync": "full", "replaces": "flt",
        "job-id": "m"}}))
    log.append(graph(m))

def target_is_top(d):
    return [("target is the top", subprocess.run(
        [qemu_img, "compare", "-f", "raw", "-F", "qcow2", d + "/before.raw",
         d + "/tgt.qcow2"], capture_output=True).returncode)]

replaces.post = unchanged
replace_child.post = target_is_top
failed = compare_jobs([refusals, replaces, started, replace_child, replace_filter],
                      top, vdisk, qemu_img)
failed += bad
for f in failed:
    print(f)
sys.exit(1 if failed else 0)
PYEOF
