#!/usr/bin/env bash
# Live external snapshots (blockdev-snapshot, blockdev-snapshot-sync)
# under `vdisk serve` and qemu-storage-daemon, one QMP script sent to both
# on twin chains (base <- mid <- top): replies and the named nodes
# afterwards compared with qemu-storage-daemon's, and no write lost or
# misplaced while the guest writes through an NBD export of the top: the
# writes before the snapshot are in the old top (it shows the copy made
# before plus them), the writes after it in the overlay (which shows
# everything). Also QEMU's refusals (nodes not found, an overlay in use
# or with a backing node, node-name rules of the -sync form) and the -sync
# overlay of a node nothing uses, which goes again as in QEMU.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-storage-daemon python3 timeout
source "$(dirname "$0")/qmp-functions.bash"
tmpdir
qmp_lib

timeout 300 python3 - "$PWD" "$VDISK" "$QEMU_IMG" <<'PYEOF' || fail "external snapshots differ from qemu-storage-daemon"
import os, subprocess, sys
from qmplib import *

top, vdisk, qemu_img = sys.argv[1], sys.argv[2], sys.argv[3]

def run(*a):
    subprocess.run(a, check=True, stdout=subprocess.DEVNULL)

def writes(d, first, models):
    cmds = []
    for i in range(6):
        off = ((first + i) * 337 * 1024) % (4 * 1024 * 1024 - 65536)
        cmds += ["-c", "write -P 0x%02x %d 65536" % (0x40 + first + i, off)]
    run("qemu-io", "-f", "raw", *cmds, "nbd+unix:///top?socket=" + d + "/nbd.sock")
    for mdl in models:
        run("qemu-io", "-f", "raw", *cmds, d + "/" + mdl)

def export(m, log):
    log.append(m.cmd({"execute": "nbd-server-start", "arguments": {
        "addr": {"type": "unix", "data": {"path": "@D@/nbd.sock"}}}}))
    log.append(m.cmd({"execute": "block-export-add", "arguments": {
        "type": "nbd", "id": "e", "node-name": "top", "writable": True}}))

def overlay(m, d, backing=None):
    run(qemu_img, "create", "-q", "-f", "qcow2", "-b", "top.qcow2", "-F",
        "qcow2", d + "/ov.qcow2")
    return m.cmd({"execute": "blockdev-add", "arguments": {
        "driver": "qcow2", "node-name": "ov", "backing": backing,
        "file": {"driver": "file", "filename": "@D@/ov.qcow2"}}})

def nodes(m):
    r = m.cmd({"execute": "query-named-block-nodes", "arguments": {"flat": True}})
    return sorted(n["node-name"] for n in r["return"] if not n["node-name"].startswith("#"))

def S(m, log, cmd, **a):
    log.append(m.cmd({"execute": cmd, "arguments": a}))

def refusals(m, d, log):
    add_chain(m)
    S(m, log, "blockdev-snapshot", node="nope", overlay="top")
    S(m, log, "blockdev-snapshot", node="top", overlay="nope")
    log.append(overlay(m, d, backing="base"))
    S(m, log, "blockdev-snapshot", node="top", overlay="ov")
    S(m, log, "blockdev-snapshot-sync", **{"node-name": "top", "snapshot-file": "@D@/s.qcow2"})
    S(m, log, "blockdev-snapshot-sync", **{"node-name": "top", "snapshot-file": "@D@/s.qcow2", "snapshot-node-name": "mid"})
    S(m, log, "blockdev-snapshot-sync", **{"device": "nope", "snapshot-file": "@D@/s.qcow2"})
    S(m, log, "blockdev-snapshot-sync", **{"node-name": "top", "snapshot-file": "@D@/s.qcow2", "snapshot-node-name": "s", "mode": "odd"})
    S(m, log, "blockdev-snapshot-sync", **{"node-name": "top", "snapshot-file": "@D@/s.qcow2", "snapshot-node-name": "s", "format": "nope"})
    log.append(nodes(m))

def in_use(m, d, log):
    add_chain(m)
    log.append(overlay(m, d))
    log.append(m.cmd({"execute": "nbd-server-start", "arguments": {
        "addr": {"type": "unix", "data": {"path": "@D@/nbd.sock"}}}}))
    log.append(m.cmd({"execute": "block-export-add", "arguments": {
        "type": "nbd", "id": "o", "node-name": "ov"}}))
    S(m, log, "blockdev-snapshot", node="top", overlay="ov")

def snapshot(m, d, log):
    add_chain(m)
    export(m, log)
    run("cp", d + "/before.raw", d + "/old.raw")
    run("cp", d + "/before.raw", d + "/new.raw")
    writes(d, 0, ["old.raw", "new.raw"])
    log.append(overlay(m, d))
    S(m, log, "blockdev-snapshot", node="top", overlay="ov")
    writes(d, 6, ["new.raw"])
    log.append(nodes(m))
    S(m, log, "blockdev-del", **{"node-name": "top"})
    log.append(m.cmd({"execute": "block-export-del", "arguments": {"id": "e"}}))

def snapshot_sync(m, d, log):
    add_chain(m)
    export(m, log)
    run("cp", d + "/before.raw", d + "/old.raw")
    run("cp", d + "/before.raw", d + "/new.raw")
    writes(d, 0, ["old.raw", "new.raw"])
    S(m, log, "blockdev-snapshot-sync", **{"node-name": "top", "snapshot-file": "@D@/ov.qcow2", "snapshot-node-name": "ov"})
    writes(d, 6, ["new.raw"])
    log.append(nodes(m))
    log.append(m.cmd({"execute": "block-export-del", "arguments": {"id": "e"}}))

def unused_sync(m, d, log):
    add_chain(m)
    S(m, log, "blockdev-snapshot-sync", **{"node-name": "top", "snapshot-file": "@D@/ov.qcow2", "snapshot-node-name": "ov"})
    log.append(nodes(m))
    log.append(os.path.exists(d + "/ov.qcow2"))

def layers(d):
    def cmp(a, b):
        return subprocess.run([qemu_img, "compare", "-f", "raw", "-F", "qcow2",
                               d + "/" + a, d + "/" + b], capture_output=True).returncode
    return [("old top", cmp("old.raw", "top.qcow2")),
            ("overlay", cmp("new.raw", "ov.qcow2")),
            ("overlay's backing", subprocess.run([qemu_img, "info", d + "/ov.qcow2"],
             capture_output=True, text=True).stdout.count("backing file: top.qcow2"))]

snapshot.post = snapshot_sync.post = layers
snapshot.top_changes = snapshot_sync.top_changes = True
failed = compare_jobs([refusals, in_use, snapshot, snapshot_sync, unused_sync],
                      top, vdisk, qemu_img)
for f in failed:
    print(f)
sys.exit(1 if failed else 0)
PYEOF
