#!/usr/bin/env bash
# Backup with a dirty bitmap (sync=bitmap and incremental, bitmap-mode
# on-success / always / never, a bitmap with sync=full and top) under
# `vdisk serve` and qemu-storage-daemon: one QMP script sent to both on
# twin chains, the replies, the events, the bitmaps (query-named-block-
# nodes and x-debug-block-dirty-bitmap-sha256) after each job and the
# targets' contents compared. Each mode succeeds and fails (the target
# a raw image over blkdebug failing every write); the bitmap is frozen
# (busy, recording into its successor) while the job runs; the full
# backup plus a new bitmap in one transaction; and every refusal of
# QEMU's do_backup_common() and backup_job_create().
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-storage-daemon python3 timeout sha256sum
source "$(dirname "$0")/qmp-functions.bash"
tmpdir
qmp_lib

timeout 400 python3 - "$PWD" "$VDISK" "$QEMU_IMG" <<'PYEOF' || fail "incremental backup differs from qemu-storage-daemon"
import hashlib, os, subprocess, sys
from qmplib import *

top, vdisk, qemu_img = sys.argv[1], sys.argv[2], sys.argv[3]

def run(*a):
    subprocess.run(a, check=True, stdout=subprocess.DEVNULL)

def target(m, d, name="tgt", failing=False):
    """A 4M target: qcow2, or raw over blkdebug failing every write."""
    if failing:
        run(qemu_img, "create", "-q", "-f", "raw", d + "/" + name + ".raw", "4M")
        a = {"driver": "raw", "node-name": name,
             "file": {"driver": "blkdebug",
                      "inject-error": [{"event": "write_aio", "errno": 5}],
                      "image": {"driver": "file",
                                "filename": "@D@/" + name + ".raw"}}}
    else:
        run(qemu_img, "create", "-q", "-f", "qcow2", d + "/" + name + ".qcow2", "4M")
        a = {"driver": "qcow2", "node-name": name,
             "file": {"driver": "file", "filename": "@D@/" + name + ".qcow2"}}
    return m.cmd({"execute": "blockdev-add", "arguments": a})

def B(m, log, **a):
    log.append(m.cmd({"execute": "blockdev-backup", "arguments": a}))

def bitmaps(m, log, node="top"):
    """The node's named bitmaps and the digest of each."""
    r = m.cmd({"execute": "query-named-block-nodes", "arguments": {"flat": True}})
    bms = [b for n in r["return"] if n["node-name"] == node
           for b in n.get("dirty-bitmaps", []) if "name" in b]
    log.append(bms)
    for b in bms:
        log.append(m.cmd({"execute": "x-debug-block-dirty-bitmap-sha256",
                          "arguments": {"node": node, "name": b["name"]}}))

def export(m, log):
    log.append(m.cmd({"execute": "nbd-server-start", "arguments": {
        "addr": {"type": "unix", "data": {"path": "@D@/nbd.sock"}}}}))
    log.append(m.cmd({"execute": "block-export-add", "arguments": {
        "type": "nbd", "id": "e", "node-name": "top", "writable": True}}))

def guest_writes(d, base=0x40, n=6, step=337):
    cmds = []
    for i in range(n):
        off = (i * step * 1024) % (4 * 1024 * 1024 - 65536)
        cmds += ["-c", "write -P 0x%02x %d 65536" % (base + i, off)]
    run("qemu-io", "-f", "raw", *cmds, "nbd+unix:///top?socket=" + d + "/nbd.sock")

def setup(m, d, log, name="b0", granularity=None):
    """The chain, its export, a bitmap b0 on top and guest writes."""
    add_chain(m)
    export(m, log)
    a = {"node": "top", "name": name}
    if granularity:
        a["granularity"] = granularity
    log.append(m.cmd({"execute": "block-dirty-bitmap-add", "arguments": a}))
    guest_writes(d)
    bitmaps(m, log)

def finish(m, log, job):
    wait_status(m, job, (None,))
    bitmaps(m, log)

def contents(d, name):
    """The digest of a target's contents, as raw."""
    for ext, fmt in ((".qcow2", "qcow2"), (".raw", "raw")):
        if os.path.exists(d + "/" + name + ext):
            run(qemu_img, "convert", "-U", "-f", fmt, "-O", "raw",
                d + "/" + name + ext, d + "/" + name + ".out")
            with open(d + "/" + name + ".out", "rb") as f:
                return hashlib.sha256(f.read()).hexdigest()
    return None

def targets_post(*names):
    def post(d):
        return [(n, contents(d, n)) for n in names]
    return post

# ---- the modes, succeeding and failing ----

def mode_case(sync, mode, failing, granularity=None):
    def sc(m, d, log):
        setup(m, d, log, granularity=granularity)
        log.append(target(m, d, failing=failing))
        if failing and sync in ("full", "top"):
            # Every cluster holds data, so every copy fails: QEMU's
            # parallel copies write the zero areas before they stop.
            run("qemu-io", "-f", "raw", "-c", "write -P 0x99 2M 1M", "-c",
                "write -P 0x98 3584k 512k",
                "nbd+unix:///top?socket=" + d + "/nbd.sock")
        args = {"job-id": "j", "device": "top", "target": "tgt",
                "sync": sync, "bitmap": "b0"}
        if mode:
            args["bitmap-mode"] = mode
        B(m, log, **args)
        finish(m, log, "j")
    sc.__name__ = "%s_%s_%s%s" % (sync, mode or "dflt", "fail" if failing else "ok",
                                  "_g%d" % granularity if granularity else "")
    sc.post = targets_post("tgt")
    return sc

cases = [mode_case("bitmap", mo, f) for mo in ("on-success", "always", "never")
         for f in (False, True)]
cases += [mode_case("incremental", None, f) for f in (False, True)]
cases += [mode_case("full", mo, f) for mo in ("on-success", "always")
          for f in (False, True)]
cases += [mode_case("top", "on-success", False)]
# Bitmaps finer and coarser than the backup's 64 KiB clusters.
cases += [mode_case("bitmap", "always", True, granularity=4096),
          mode_case("bitmap", "on-success", False, granularity=1 << 20)]

# ---- frozen during the job: busy, recording into the successor ----

def frozen(m, d, log):
    setup(m, d, log)
    log.append(target(m, d))
    B(m, log, device="top", target="tgt", sync="bitmap", bitmap="b0",
      speed=256 * 1024, **{"job-id": "j", "bitmap-mode": "on-success"})
    # The successor gets these writes; the job still copies b0's bits.
    guest_writes(d, base=0x60, n=3, step=1001)
    bitmaps(m, log)
    for cmd in ("block-dirty-bitmap-clear", "block-dirty-bitmap-remove",
                "block-dirty-bitmap-disable", "block-dirty-bitmap-enable"):
        log.append(m.cmd({"execute": cmd, "arguments": {"node": "top", "name": "b0"}}))
    log.append(m.cmd({"execute": "block-dirty-bitmap-merge", "arguments": {
        "node": "top", "target": "b0", "bitmaps": ["b0"]}}))
    log.append(m.cmd({"execute": "block-job-set-speed",
                      "arguments": {"device": "j", "speed": 0}}))
    finish(m, log, "j")
frozen.post = targets_post("tgt")

def cancelled(m, d, log):
    """A cancelled job: on-success takes the successor back, always
    abdicates and keeps what was not copied (none when cancelled before
    it copied anything is not guaranteed, so only with on-success)."""
    setup(m, d, log)
    log.append(target(m, d))
    B(m, log, device="top", target="tgt", sync="bitmap", bitmap="b0",
      speed=64 * 1024, **{"job-id": "j", "bitmap-mode": "on-success"})
    guest_writes(d, base=0x70, n=2, step=1500)
    log.append(m.cmd({"execute": "job-cancel", "arguments": {"id": "j"}}))
    finish(m, log, "j")

# ---- full backup and a new bitmap in one transaction, then two
# incrementals ----

def transaction(m, d, log):
    add_chain(m)
    export(m, log)
    log.append(target(m, d, name="full"))
    log.append(m.cmd({"execute": "transaction", "arguments": {"actions": [
        {"type": "block-dirty-bitmap-add",
         "data": {"node": "top", "name": "inc", "persistent": True}},
        {"type": "blockdev-backup",
         "data": {"job-id": "j0", "device": "top", "target": "full",
                  "sync": "full"}}]}}))
    finish(m, log, "j0")
    for gen in (1, 2):
        guest_writes(d, base=0x20 * gen, n=4, step=700 * gen)
        bitmaps(m, log)
        log.append(target(m, d, name="inc%d" % gen))
        B(m, log, device="top", target="inc%d" % gen, sync="incremental",
          bitmap="inc", **{"job-id": "j%d" % gen})
        finish(m, log, "j%d" % gen)
    # drive-backup takes them too.
    log.append(m.cmd({"execute": "drive-backup", "arguments": {
        "job-id": "jd", "device": "top", "target": "@D@/drive.qcow2",
        "format": "qcow2", "sync": "bitmap", "bitmap": "inc",
        "bitmap-mode": "never"}}))
    finish(m, log, "jd")
    # A transaction that fails keeps the bitmap as it was.
    log.append(m.cmd({"execute": "transaction", "arguments": {"actions": [
        {"type": "blockdev-backup",
         "data": {"job-id": "jx", "device": "top", "target": "inc1",
                  "sync": "incremental", "bitmap": "inc"}},
        {"type": "abort", "data": {}}]}}))
    bitmaps(m, log)
transaction.post = targets_post("full", "inc1", "inc2", "drive")
transaction.top_changes = True

def reversed_order(m, d, log):
    """[blockdev-backup, block-dirty-bitmap-add]: the order in which a
    write between the two actions would be in neither the backup nor the
    bitmap unless the transaction is one point in time (vdisk runs the
    addition first, docs/jobs.md). Then an addition that fails (the name
    exists) after a backup: nothing is left of the transaction."""
    add_chain(m)
    export(m, log)
    log.append(target(m, d, name="full"))
    log.append(m.cmd({"execute": "transaction", "arguments": {"actions": [
        {"type": "blockdev-backup",
         "data": {"job-id": "j0", "device": "top", "target": "full",
                  "sync": "full"}},
        {"type": "block-dirty-bitmap-add",
         "data": {"node": "top", "name": "inc", "persistent": True}}]}}))
    finish(m, log, "j0")
    guest_writes(d, base=0x30, n=4, step=500)
    bitmaps(m, log)
    log.append(target(m, d, name="inc1"))
    B(m, log, device="top", target="inc1", sync="incremental", bitmap="inc",
      **{"job-id": "j1"})
    finish(m, log, "j1")
    log.append(target(m, d, name="x"))
    log.append(m.cmd({"execute": "transaction", "arguments": {"actions": [
        {"type": "blockdev-backup",
         "data": {"job-id": "jx", "device": "top", "target": "x",
                  "sync": "full"}},
        {"type": "block-dirty-bitmap-add",
         "data": {"node": "top", "name": "inc"}}]}}))
    log.append(m.cmd({"execute": "query-jobs"}))
    bitmaps(m, log)
reversed_order.post = targets_post("full", "inc1")
reversed_order.top_changes = True

# ---- the refusals ----

def refusals(m, d, log):
    setup(m, d, log)
    log.append(target(m, d))
    def R(**a):
        a.setdefault("job-id", "j")
        B(m, log, device="top", target="tgt", **a)
    R(sync="bitmap")
    R(sync="incremental")
    R(sync="incremental", bitmap="b0", **{"bitmap-mode": "always"})
    R(sync="incremental", bitmap="b0", **{"bitmap-mode": "never"})
    R(sync="incremental", bitmap="nope")
    R(sync="bitmap", bitmap="nope", **{"bitmap-mode": "always"})
    R(sync="full", bitmap="b0")
    R(sync="bitmap", bitmap="b0")
    R(sync="none", bitmap="b0", **{"bitmap-mode": "always"})
    R(sync="full", bitmap="b0", **{"bitmap-mode": "never"})
    R(sync="top", bitmap="b0", **{"bitmap-mode": "never"})
    R(sync="full", **{"bitmap-mode": "on-success"})
    R(sync="bitmap", bitmap="b0", **{"bitmap-mode": "sometimes"})
    R(sync="incremental", bitmap="b0", **{"job-id": "bad id"})
    bitmaps(m, log)
    # Busy: exported with the bitmap.
    log.append(m.cmd({"execute": "block-export-add", "arguments": {
        "type": "nbd", "id": "eb", "node-name": "top", "name": "bm",
        "writable": True, "bitmaps": ["b0"]}}))
    R(sync="incremental", bitmap="b0")
    R(sync="bitmap", bitmap="b0", **{"bitmap-mode": "never"})
    log.append(m.cmd({"execute": "block-export-del", "arguments": {"id": "eb"}}))
    # A bitmap of the node below is not the device's.
    log.append(m.cmd({"execute": "block-dirty-bitmap-add",
                      "arguments": {"node": "mid", "name": "low"}}))
    R(sync="incremental", bitmap="low")
    # Read-only: only never may use it.
    run(qemu_img, "create", "-q", "-f", "qcow2", d + "/ro.qcow2", "4M")
    run(qemu_img, "bitmap", "--add", d + "/ro.qcow2", "rob")
    log.append(m.cmd({"execute": "blockdev-add", "arguments": {
        "driver": "qcow2", "node-name": "ro", "read-only": True,
        "file": {"driver": "file", "filename": "@D@/ro.qcow2"}}}))
    bitmaps(m, log, node="ro")
    B(m, log, device="ro", target="tgt", sync="bitmap", bitmap="rob",
      **{"job-id": "r1", "bitmap-mode": "on-success"})
    B(m, log, device="ro", target="tgt", sync="bitmap", bitmap="rob",
      **{"job-id": "r2", "bitmap-mode": "always"})
    B(m, log, device="ro", target="tgt", sync="bitmap", bitmap="rob",
      **{"job-id": "r3", "bitmap-mode": "never"})
    finish(m, log, "r3")
    bitmaps(m, log, node="ro")
    # Sizes differ: the bitmap is left as it was.
    run(qemu_img, "create", "-q", "-f", "qcow2", d + "/small.qcow2", "1M")
    log.append(m.cmd({"execute": "blockdev-add", "arguments": {
        "driver": "qcow2", "node-name": "small",
        "file": {"driver": "file", "filename": "@D@/small.qcow2"}}}))
    B(m, log, device="top", target="small", sync="incremental", bitmap="b0",
      **{"job-id": "j"})
    bitmaps(m, log)
    log.append(m.cmd({"execute": "query-jobs"}))
    # drive-backup checks the same (after making its target, as QEMU).
    log.append(m.cmd({"execute": "drive-backup", "arguments": {
        "job-id": "jd", "device": "top", "target": "@D@/drive.qcow2",
        "format": "qcow2", "sync": "incremental"}}))
    log.append(m.cmd({"execute": "drive-backup", "arguments": {
        "job-id": "jd", "device": "top", "target": "@D@/drive.qcow2",
        "format": "qcow2", "sync": "full", "bitmap": "b0",
        "bitmap-mode": "never"}}))

for sc in cases + [frozen, cancelled]:
    sc.top_changes = True
refusals.top_changes = True
scs = cases + [frozen, cancelled, transaction, reversed_order, refusals]
if os.environ.get("ONLY"):    # by hand: ONLY=name,name
    scs = [sc for sc in scs if sc.__name__ in os.environ["ONLY"].split(",")]
failed = compare_jobs(scs, top, vdisk, qemu_img)
for f in failed:
    print(f)
sys.exit(1 if failed else 0)
PYEOF
