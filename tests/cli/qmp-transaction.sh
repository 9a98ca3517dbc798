#!/usr/bin/env bash
# QMP transaction under `vdisk serve` and qemu-storage-daemon, one script
# sent to both on twin chains (base <- mid <- top): replies and events
# compared, and all or nothing checked on the images afterwards: a
# transaction whose last action fails (or is "abort") leaves no internal
# snapshot, no overlay and no backup job behind; one that succeeds makes
# its backup the point in time of the transaction and its external
# snapshot the new top. Also QEMU's refusals of malformed actions.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-storage-daemon python3 timeout
source "$(dirname "$0")/qmp-functions.bash"
tmpdir
qmp_lib

timeout 300 python3 - "$PWD" "$VDISK" "$QEMU_IMG" <<'PYEOF' || fail "transaction differs from qemu-storage-daemon"
import os, subprocess, sys
from qmplib import *

top, vdisk, qemu_img = sys.argv[1], sys.argv[2], sys.argv[3]

def run(*a):
    subprocess.run(a, check=True, stdout=subprocess.DEVNULL)

def prepare(m, d):
    add_chain(m)
    run(qemu_img, "create", "-q", "-f", "qcow2", d + "/tgt.qcow2", "4M")
    run(qemu_img, "create", "-q", "-f", "qcow2", "-b", "top.qcow2", "-F",
        "qcow2", d + "/ov.qcow2")
    for name, backing in (("tgt", None), ("ov", None)):
        m.cmd({"execute": "blockdev-add", "arguments": {
            "driver": "qcow2", "node-name": name, "backing": backing,
            "file": {"driver": "file", "filename": "@D@/%s.qcow2" % name}}})

def T(m, log, *actions):
    log.append(m.cmd({"execute": "transaction", "arguments": {
        "actions": [{"type": t, "data": a} if a is not None else {"type": t}
                    for t, a in actions]}}))

BACKUP = ("blockdev-backup", {"device": "top", "target": "tgt", "sync": "full", "job-id": "b"})
SNAP = ("blockdev-snapshot", {"node": "top", "overlay": "ov"})
INTERNAL = ("blockdev-snapshot-internal-sync", {"device": "top", "name": "s1"})

def nodes(m):
    r = m.cmd({"execute": "query-named-block-nodes", "arguments": {"flat": True}})
    return sorted((n["node-name"], n.get("backing_file_depth")) for n in r["return"]
                  if not n["node-name"].startswith("#"))

def refusals(m, d, log):
    prepare(m, d)
    T(m, log, ("nope", {}))
    T(m, log, ("blockdev-snapshot", {"node": "top"}))
    T(m, log, ("blockdev-backup", {"device": "top", "target": "tgt"}))
    T(m, log, ("abort", None))
    log.append(m.cmd({"execute": "transaction", "arguments": {}}))

def all_or_nothing(m, d, log):
    prepare(m, d)
    T(m, log, INTERNAL, SNAP, ("abort", {}))
    T(m, log, BACKUP, INTERNAL, ("blockdev-snapshot", {"node": "top", "overlay": "nope"}))
    log.append(nodes(m))
    log.append(m.cmd({"execute": "query-jobs"}))

def success(m, d, log):
    prepare(m, d)
    T(m, log, INTERNAL, BACKUP, SNAP)
    wait_status(m, "b", (None,))
    log.append(nodes(m))

def grouped(m, d, log):
    prepare(m, d)
    run(qemu_img, "create", "-q", "-f", "qcow2", d + "/tgt2.qcow2", "4M")
    m.cmd({"execute": "blockdev-add", "arguments": {"driver": "qcow2",
           "node-name": "tgt2", "file": {"driver": "file", "filename": "@D@/tgt2.qcow2"}}})
    log.append(m.cmd({"execute": "transaction", "arguments": {
        "actions": [{"type": BACKUP[0], "data": BACKUP[1]},
                    {"type": "blockdev-backup", "data": {"device": "mid",
                     "target": "tgt2", "sync": "full", "job-id": "b2"}}],
        "properties": {"completion-mode": "grouped"}}}))
    wait_status(m, "b", (None,))
    wait_status(m, "b2", (None,))
    log.append(m.cmd({"execute": "transaction", "arguments": {
        "actions": [INTERNAL], "properties": {"completion-mode": "odd"}}}))
    log.append(m.cmd({"execute": "transaction", "arguments": {
        "actions": [{"type": INTERNAL[0], "data": INTERNAL[1]}],
        "properties": {"completion-mode": "odd"}}}))

def snapshots(d):
    out = subprocess.run([qemu_img, "snapshot", "-l", d + "/top.qcow2"],
                         capture_output=True, text=True).stdout
    tgt = subprocess.run([qemu_img, "compare", "-f", "raw", "-F", "qcow2",
                          d + "/before.raw", d + "/tgt.qcow2"], capture_output=True)
    return [("s1 in top", " s1 " in out), ("backup is the start", tgt.returncode)]

all_or_nothing.post = success.post = grouped.post = snapshots
grouped.events_by_job = True
failed = compare_jobs([refusals, all_or_nothing, success, grouped], top,
                      vdisk, qemu_img)
for f in failed:
    print(f)
sys.exit(1 if failed else 0)
PYEOF
