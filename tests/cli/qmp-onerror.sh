#!/usr/bin/env bash
# The error policies of the block jobs under `vdisk serve` and
# qemu-storage-daemon, one QMP script sent to both on twin chains
# (base <- mid <- top): blkdebug fails a read of mid (the source of
# stream, commit, active commit, mirror and backup) or a write into the
# target (commit's base, a mirror or backup target over blkdebug), once
# or for good, with EIO or ENOSPC, and each policy is exercised: report
# (the job fails), ignore (it goes on), stop (it pauses with io-status
# failed or nospace until resumed, then retries the same piece) and
# enospc (stops on ENOSPC only). Compared with qemu-storage-daemon's:
# every reply, the event sequence (JOB_STATUS_CHANGE, BLOCK_JOB_ERROR
# with operation and action, BLOCK_JOB_COMPLETED with its error text),
# query-block-jobs while the job stands paused or ready, query-jobs at
# the end, and the images afterwards (the top's chain and content, the
# base's content, the target against the top as it was).
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-storage-daemon python3 timeout
source "$(dirname "$0")/qmp-functions.bash"
tmpdir
qmp_lib

timeout 300 python3 - "$PWD" "$VDISK" "$QEMU_IMG" <<'PYEOF' || fail "job error policies differ from qemu-storage-daemon"
import hashlib, json, os, shutil, subprocess, sys, time
import qmplib
from qmplib import *

top, vdisk, qemu_img = sys.argv[1], sys.argv[2], sys.argv[3]

# One chain made by qemu-img and qemu-io, copied for every run: the same
# bytes, so the same host offsets in both daemons' images.
_made = qmplib.make_chain
def copy_chain(d, qemu_img):
    t = os.path.join(top, "template")
    if not os.path.exists(t):
        _made(t, qemu_img)
    shutil.copytree(t, d)
qmplib.make_chain = copy_chain

_offs = {}
def host_off(d, img, guest):
    # A rule's sector is an offset in the node below the format driver
    # (the same in every copy of the chain: asked once).
    if (img, guest) not in _offs:
        _offs[img, guest] = _host_off(d, img, guest)
    return _offs[img, guest]

def _host_off(d, img, guest):
    out = subprocess.run([qemu_img, "map", "--output=json", d + "/" + img],
                         capture_output=True, text=True, check=True).stdout
    for e in json.loads(out):
        if e["depth"] == 0 and "offset" in e and \
           e["start"] <= guest < e["start"] + e["length"]:
            return e["offset"] + guest - e["start"]
    raise SystemExit("%s: %d is not allocated" % (img, guest))

def rule(event, errno, once, off):
    # One sector only: a single request fails, also where QEMU has
    # several copies in flight.
    return {"event": event, "errno": errno, "once": once, "sector": off // 512}

def add_chain_dbg(m, layer, r):
    for n, b in (("base", None), ("mid", "base"), ("top", "mid")):
        f = {"driver": "file", "filename": "@D@/%s.qcow2" % n}
        if n == layer:
            f = {"driver": "blkdebug", "inject-error": [r], "image": f}
        a = {"driver": "qcow2", "node-name": n, "file": f}
        if b:
            a["backing"] = b
        m.cmd({"execute": "blockdev-add", "arguments": a})

def add_target(m, d, r):
    subprocess.run([qemu_img, "create", "-q", "-f", "raw", d + "/tgt.raw", "4M"],
                   check=True)
    f = {"driver": "file", "filename": "@D@/tgt.raw"}
    if r:
        f = {"driver": "blkdebug", "inject-error": [r], "image": f}
    return m.cmd({"execute": "blockdev-add", "arguments": {
        "driver": "raw", "node-name": "tgt", "file": f}})

def block_jobs(m):
    # busy is compared for a paused job only (it must be false then): a
    # running or READY job is busy or not as its copies happen to be at
    # the moment of the query, in either daemon.
    r = m.cmd({"execute": "query-block-jobs"})["return"]
    return [{k: j.get(k) for k in ("device", "type", "io-status", "paused",
                                   "ready") + (("busy",) if j.get("paused")
                                               else ())} for j in r]

def status(m):
    q = m.cmd({"execute": "query-jobs"})["return"]
    return q[0]["status"] if q else None

def settle(m, secs=60):
    # Until the job stands still: stopped by an error, ready, concluded.
    # One query for both status and io-status: a backup pauses once as
    # it starts, and that pause is no stop.
    end = time.time() + secs
    while time.time() < end:
        b = m.cmd({"execute": "query-block-jobs"})["return"]
        st = b[0]["status"] if b else status(m)
        if st == "paused" and b[0]["io-status"] != "ok":
            return st
        if st in ("ready", "concluded", None):
            return st
        time.sleep(0.01)
    raise SystemExit("the job never stood still (%s)" % st)

def drive(m, log, resumes, resume_cmd):
    # Resume a stopped job `resumes` times, then cancel it; complete it
    # when ready; dismiss it once concluded.
    for _ in range(20):
        st = settle(m)
        if st == "paused":
            log.append(block_jobs(m))
            if resumes:
                resumes -= 1
                n = len(m.events)
                arg = {"device": "j"} if resume_cmd.startswith("block") else {"id": "j"}
                log.append(m.cmd({"execute": resume_cmd, "arguments": arg}))
                # Until it left this pause (an error may stop it again at
                # once: its events tell).
                for _ in range(2000):
                    if status(m) != "paused" or len(m.events) > n + 1:
                        break
                    time.sleep(0.005)
            else:
                log.append(m.cmd({"execute": "job-cancel", "arguments": {"id": "j"}}))
        elif st == "ready":
            log.append(block_jobs(m))
            log.append(m.cmd({"execute": "job-complete", "arguments": {"id": "j"}}))
            for _ in range(2000):
                if status(m) != "ready":
                    break
                time.sleep(0.005)
        elif st == "concluded":
            q = m.cmd({"execute": "query-jobs"})["return"]
            log.append([{k: j.get(k) for k in ("id", "type", "status", "error")}
                        for j in q])
            log.append(m.cmd({"execute": "job-dismiss", "arguments": {"id": "j"}}))
            return
        else:
            return
    raise SystemExit("the job went on stopping")

def raw_sum(path):
    subprocess.run([qemu_img, "convert", "-U", "-O", "raw", path, path + ".raw"],
                   check=True)
    with open(path + ".raw", "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()

def make(kind, side, policy, errno, once, resumes=1):
    def sc(m, d, log):
        if side == "src":
            # Guest offset 1M lies in mid (0x22), below the top.
            add_chain_dbg(m, "mid", rule("read_aio", errno, once,
                                         host_off(d, "mid.qcow2", 1 << 20)))
        elif kind in ("commit", "active"):
            add_chain_dbg(m, "base", rule("write_aio", errno, once,
                                          host_off(d, "base.qcow2", 1 << 20)))
        else:
            add_chain(m)
        if kind in ("mirror", "backup"):
            log.append(add_target(m, d, rule("write_aio", errno, once, 1 << 20)
                                  if side == "tgt" else None))
        a = {"job-id": "j", "auto-dismiss": False}
        if kind == "stream":
            cmd = "block-stream"
            a.update({"device": "top", "on-error": policy})
        elif kind == "commit":
            # backing-file: QEMU would write a json: name of the blkdebug
            # node into the top's header, vdisk the node's file name.
            cmd = "block-commit"
            a.update({"device": "top", "top-node": "mid", "base-node": "base",
                      "on-error": policy, "backing-file": "base.qcow2"})
        elif kind == "active":
            cmd = "block-commit"
            a.update({"device": "top", "on-error": policy})
        else:
            cmd = "blockdev-" + kind
            a.update({"device": "top", "target": "tgt", "sync": "full",
                      "on-source-error" if side == "src" else "on-target-error": policy})
        log.append(m.cmd({"execute": cmd, "arguments": a}))
        drive(m, log, resumes, "job-resume" if kind in ("mirror", "backup")
              else "block-job-resume")
        if kind in ("mirror", "backup", "active"):
            # QEMU copies several pieces at once: where a failed or
            # cancelled job stopped is a matter of timing.
            for e in m.events:
                if e["event"] == "BLOCK_JOB_CANCELLED" or "error" in e.get("data", {}):
                    e["data"]["offset"] = "(timing)"
    sc.__name__ = "%s_%s_%s_%s%s" % (kind, side, policy,
                                     "enospc" if errno == 28 else "eio",
                                     "_once" if once else "")
    if kind in ("mirror", "backup", "active"):
        # A target left by a failed job holds what the copies in flight
        # made of it: whether it is the top is what both must agree on.
        tgt = "base.qcow2" if kind == "active" else "tgt.raw"
        sc.post = lambda d: [("target is the top", subprocess.run(
            [qemu_img, "compare", "-f", "raw", d + "/before.raw",
             d + "/" + tgt], capture_output=True).returncode)]
    else:
        sc.post = lambda d: [("base", raw_sum(d + "/base.qcow2"))]
    return sc

EIO, ENOSPC = 5, 28
S = []
for kind in ("stream", "commit", "active", "mirror", "backup"):
    for side in ("src",) if kind == "stream" else ("src", "tgt"):
        S += [make(kind, side, "report", EIO, False),
              make(kind, side, "ignore", EIO, True),
              make(kind, side, "stop", EIO, True),
              make(kind, side, "stop", EIO, False),   # stops again, cancelled
              make(kind, side, "enospc", ENOSPC, True)]
        if side == "src":
            S.append(make(kind, side, "enospc", EIO, False))
failed = compare_jobs(S, top, vdisk, qemu_img)
for f in failed:
    print(f)
sys.exit(1 if failed else 0)
PYEOF
