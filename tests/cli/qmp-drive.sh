#!/usr/bin/env bash
# drive-backup and drive-mirror, which create their target image first,
# under `vdisk serve` and qemu-storage-daemon, one QMP script sent to
# both on twin chains (base <- mid <- top): replies and events compared,
# and the targets checked once the daemons have exited: a full backup or
# mirror equals the top as it was, a sync=top one gets the source's
# backing file (absolute-paths) and equals it through that chain, and a
# completed drive-mirror serves the export's later writes. mode=existing
# (sync top onto a target made over the source's backing file, sync full,
# a raw target, with and without format) and format=raw: the graph after
# the pivot, what the export reads, and qemu-img info --backing-chain of
# the target compared with qemu-storage-daemon's. Also QEMU's refusals
# (unknown formats, existing targets that are not there, replaces
# without node-name).
# Bug: a mode=existing target was opened without its backing chain, and
# after the pivot the export of a sync=top mirror read zeros where the
# layers below the source's own held data.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-storage-daemon python3 timeout
source "$(dirname "$0")/qmp-functions.bash"
tmpdir
qmp_lib

timeout 300 python3 - "$PWD" "$VDISK" "$QEMU_IMG" <<'PYEOF' || fail "drive-backup/drive-mirror differ from qemu-storage-daemon"
import json, os, subprocess, sys, time
from qmplib import *

top, vdisk, qemu_img = sys.argv[1], sys.argv[2], sys.argv[3]

def run(*a):
    subprocess.run(a, check=True, stdout=subprocess.DEVNULL)

def C(m, log, cmd, **a):
    log.append(m.cmd({"execute": cmd, "arguments": a}))

def wait_ready(m):
    for _ in range(3000):
        if any(e["event"] == "BLOCK_JOB_READY" for e in m.events):
            return
        m.cmd({"execute": "query-jobs"})
        time.sleep(0.01)
    raise SystemExit("never ready")

def refusals(m, d, log):
    add_chain(m)
    C(m, log, "drive-backup", device="top", target="@D@/t.qcow2", sync="full", format="nope", **{"job-id": "j"})
    C(m, log, "drive-backup", device="nope", target="@D@/t.qcow2", sync="full", **{"job-id": "j"})
    C(m, log, "drive-mirror", device="top", target="@D@/t.qcow2", sync="full", replaces="mid", **{"job-id": "j"})
    C(m, log, "drive-mirror", device="mid", target="@D@/t.qcow2", sync="full", **{"job-id": "j"})
    C(m, log, "drive-mirror", device="top", target="@D@/t.qcow2", sync="full", format="nope", **{"job-id": "j"})
    log.append(os.path.exists(d + "/t.qcow2"))

def backup_full(m, d, log):
    add_chain(m)
    C(m, log, "drive-backup", device="top", target="@D@/tgt.qcow2", sync="full", **{"job-id": "b"})
    wait_status(m, "b", (None,))

def top_only(m):
    # The chain from the images' headers: QEMU names a chain given by node
    # references with json: file names, which would end up in the new
    # target's header.
    m.cmd({"execute": "blockdev-add", "arguments": {"driver": "qcow2",
           "node-name": "top", "file": {"driver": "file",
                                        "filename": "@D@/top.qcow2"}}})

def backup_top(m, d, log):
    top_only(m)
    C(m, log, "drive-backup", device="top", target="@D@/tgt.qcow2", sync="top", **{"job-id": "b"})
    wait_status(m, "b", (None,))

def mirror_full(m, d, log):
    add_chain(m)
    C(m, log, "drive-mirror", device="top", target="@D@/tgt.qcow2", sync="full", **{"job-id": "m"})
    wait_ready(m)
    C(m, log, "job-complete", id="m")
    wait_status(m, "m", (None,))

def mirror_top(m, d, log):
    top_only(m)
    C(m, log, "drive-mirror", device="top", target="@D@/tgt.qcow2", sync="top",
      **{"job-id": "m", "node-name": "tn"})
    wait_ready(m)
    C(m, log, "job-complete", id="m")
    wait_status(m, "m", (None,))
    r = m.cmd({"execute": "query-named-block-nodes", "arguments": {"flat": True}})
    log.append(sorted(n["node-name"] for n in r["return"] if not n["node-name"].startswith("#")))

def existing(m, d, log, sync, backing=None, fmt="qcow2", **a):
    # mode=existing: the target made beforehand (for sync=top over the
    # source's backing file, as the user would), opened with the chain
    # its header names.
    args = [qemu_img, "create", "-q", "-f", fmt, d + "/tgt." + fmt, "4M"]
    if backing:
        args[5:5] = ["-b", backing, "-F", "qcow2"]
    run(*args)
    pivot(m, d, log, target="@D@/tgt." + fmt, sync=sync, mode="existing",
          **{"node-name": "tn"}, **a)

def pivot(m, d, log, finish=("job-complete", {"id": "m"}), **a):
    # The top alone, exported, mirrored and completed: the export then
    # reads the target (or the top still, when the job is cancelled).
    top_only(m)
    export(m, log)
    C(m, log, "drive-mirror", device="top", **{"job-id": "m"}, **a)
    wait_ready(m)
    C(m, log, finish[0], **finish[1])
    wait_status(m, "m", (None,))
    log.append(graph(m))
    log.append(export_reads_start(d))

def export(m, log):
    # A user of the top, which the pivot moves to the target.
    C(m, log, "nbd-server-start", addr={"type": "unix", "data": {"path": "@D@/nbd.sock"}})
    C(m, log, "block-export-add", type="nbd", id="e", **{"node-name": "top"})

def export_reads_start(d):
    # What the export serves after the pivot: the target through the
    # chain the target has in the graph.
    return ("export reads the start", subprocess.run(
        [qemu_img, "compare", "-f", "raw", "-F", "raw", d + "/before.raw",
         "nbd+unix:///top?socket=" + d + "/nbd.sock"], capture_output=True).returncode)

def graph(m):
    # What the export would read after the pivot: the nodes, each with
    # its driver, file and backing file (auto-named ones are matched by
    # what they open).
    r = m.cmd({"execute": "query-named-block-nodes", "arguments": {"flat": True}})
    return [{"node-name": n["node-name"], "drv": n["drv"], "file": n["file"],
             "backing_file": n.get("backing_file")} for n in r["return"]]

def existing_top(m, d, log):
    existing(m, d, log, "top", backing="mid.qcow2", format="qcow2")

def existing_top_probed(m, d, log):
    # No format: QEMU probes an existing target.
    existing(m, d, log, "top", backing="mid.qcow2")

def existing_full(m, d, log):
    existing(m, d, log, "full", format="qcow2")

def existing_raw(m, d, log):
    existing(m, d, log, "full", fmt="raw", format="raw")

def absolute_raw(m, d, log):
    # format: a raw target made by the mirror for a qcow2 source.
    pivot(m, d, log, target="@D@/tgt.raw", sync="full", format="raw")

def absolute_none(m, d, log):
    # sync=none, absolute-paths: a new target over the source itself.
    pivot(m, d, log, target="@D@/tgt.qcow2", sync="none",
          finish=("block-job-cancel", {"device": "m"}))

def target_state(d):
    # The target's chain as qemu-img sees it, and its content through
    # that chain.
    t = d + "/tgt.qcow2" if os.path.exists(d + "/tgt.qcow2") else d + "/tgt.raw"
    info = subprocess.run([qemu_img, "info", "--backing-chain", "--output=json", t],
                          capture_output=True, text=True).stdout
    chain = [[norm(i.get(k), d) for k in ("filename", "format", "virtual-size",
                                          "backing-filename", "full-backing-filename",
                                          "backing-filename-format")]
             for i in json.loads(info)]
    same = subprocess.run([qemu_img, "compare", "-f", "raw", d + "/before.raw", t],
                          capture_output=True)
    return [("target chain", chain), ("target is the start", same.returncode)]

S = [backup_full, backup_top, mirror_full, mirror_top, existing_top,
     existing_top_probed, existing_full, existing_raw, absolute_raw, absolute_none]
for sc in S:
    sc.post = target_state
failed = compare_jobs([refusals] + S, top, vdisk, qemu_img)
for f in failed:
    print(f)
sys.exit(1 if failed else 0)
PYEOF
