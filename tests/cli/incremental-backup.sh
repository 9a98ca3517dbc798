#!/usr/bin/env bash
# The incremental-backup workflow end to end, as backup tools drive it,
# in `vdisk serve` and (the reference) qemu-storage-daemon:
#  - generation 0: one transaction adds a persistent bitmap and starts a
#    full backup; the guest then writes through the NBD export;
#  - generations 1-3: push mode, blockdev-backup sync=incremental into a
#    new qcow2 overlay whose backing file is the previous generation;
#    each generation, restored (qemu-img convert of the overlay chain),
#    equals the guest disk as it was when its backup started (pulled
#    through the export then, with the guest quiet);
#  - pull mode: a transaction adds the next bitmap, starts a fleecing
#    job (sync=none into an overlay of the live disk) and disables the
#    bitmap;
#    the fleecing node is exported with the bitmap, the guest writes on,
#    and only the extents `nbdinfo --map=qemu:dirty-bitmap:NAME` reports
#    are read from the export and applied to the previous restore, which
#    then equals the disk at the fleecing point;
#  - the daemon killed (-9) between generations: the persistent bitmap
#    comes back inconsistent, the incremental backup is refused with
#    QEMU's words, and the tool falls back to a full backup plus a new
#    bitmap, which restores correctly, and the chain goes on from it.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-storage-daemon nbdinfo python3 timeout
source "$(dirname "$0")/qmp-functions.bash"
tmpdir
qmp_lib

timeout 300 python3 - "$PWD" "$VDISK" "$QEMU_IMG" <<'PYEOF' || fail "the incremental backup workflow failed"
import os, random, subprocess, sys, time
from qmplib import *

top, vdisk, qemu_img = sys.argv[1], sys.argv[2], sys.argv[3]
SIZE = 16 << 20

def run(*a):
    subprocess.run(a, check=True, stdout=subprocess.DEVNULL)

class Flow:
    def __init__(self, name, argv):
        self.name, self.argv = name, argv
        self.d = os.path.join(top, name)
        os.makedirs(self.d)
        self.failed = []
        self.rng = random.Random(14)
        run(qemu_img, "create", "-q", "-f", "qcow2", self.p("disk.qcow2"), str(SIZE))
        run("qemu-io", "-c", "write -P 0x5a 0 3M", "-c", "write -P 0x5b 9M 2M",
            self.p("disk.qcow2"))

    def p(self, f):
        return os.path.join(self.d, f)

    def uri(self, export):
        return "nbd+unix:///%s?socket=%s" % (export, self.p("nbd.sock"))

    def check(self, cond, what):
        print("%-6s %-60s %s" % (self.name, what, "ok" if cond else "FAILED"))
        if not cond:
            self.failed.append("%s: %s" % (self.name, what))

    def start(self):
        self.m = Monitor(self.argv, self.d)
        self.ok({"execute": "blockdev-add", "arguments": {
            "driver": "qcow2", "node-name": "disk",
            "file": {"driver": "file", "filename": self.p("disk.qcow2")}}})
        self.ok({"execute": "nbd-server-start", "arguments": {
            "addr": {"type": "unix", "data": {"path": self.p("nbd.sock")}}}})
        self.ok({"execute": "block-export-add", "arguments": {
            "type": "nbd", "id": "guest", "node-name": "disk", "name": "disk",
            "writable": True}})

    def ok(self, req):
        r = self.m.cmd(req)
        if "error" in r:
            raise SystemExit("%s: %s: %s" % (self.name, req, r["error"]))
        return r["return"]

    def wait(self, job):
        end = time.time() + 120
        while time.time() < end:
            jobs = [j for j in self.ok({"execute": "query-jobs"}) if j["id"] == job]
            if not jobs:
                break
            time.sleep(0.02)
        ev = [e for e in self.m.events if e["event"] == "BLOCK_JOB_COMPLETED"
              and e["data"]["device"] == job]
        return ev[-1]["data"] if ev else None

    def guest_writes(self, n=10):
        cmds = []
        for _ in range(n):
            ln = self.rng.choice((4096, 65536, 100000, 196608))
            off = self.rng.randrange(0, SIZE - ln) & ~511
            cmds += ["-c", "write -P 0x%02x %d %d" % (self.rng.randrange(1, 255), off, ln & ~511)]
        run("qemu-io", "-f", "raw", *cmds, self.uri("disk"))

    def save(self, out):
        """The guest's disk now (the guest is quiet), through the export."""
        run(qemu_img, "convert", "-f", "raw", "-O", "raw", self.uri("disk"), self.p(out))

    def bitmap(self, name):
        for n in self.ok({"execute": "query-named-block-nodes", "arguments": {"flat": True}}):
            if n["node-name"] == "disk":
                for b in n.get("dirty-bitmaps", []):
                    if b.get("name") == name:
                        return b
        return None

    def target(self, node, f, backing=None):
        args = [qemu_img, "create", "-q", "-f", "qcow2", self.p(f), str(SIZE)]
        if backing:
            args[5:5] = ["-b", backing, "-F", "qcow2"]
        run(*args)
        self.ok({"execute": "blockdev-add", "arguments": {
            "driver": "qcow2", "node-name": node,
            "file": {"driver": "file", "filename": self.p(f)}}})

    def restores(self, f, expected, what):
        run(qemu_img, "convert", "-O", "raw", self.p(f), self.p("restore.raw"))
        same = subprocess.run(["cmp", "-s", self.p("restore.raw"), self.p(expected)]).returncode == 0
        self.check(same, what)

    def full_with_bitmap(self, gen, bitmap):
        """A full backup and a new persistent bitmap, one transaction."""
        f = "gen%d.qcow2" % gen
        self.save("exp%d.raw" % gen)
        self.target("t%d" % gen, f)
        self.ok({"execute": "transaction", "arguments": {"actions": [
            {"type": "block-dirty-bitmap-add",
             "data": {"node": "disk", "name": bitmap, "persistent": True}},
            {"type": "blockdev-backup",
             "data": {"job-id": "g%d" % gen, "device": "disk",
                      "target": "t%d" % gen, "sync": "full"}}]}})
        ev = self.wait("g%d" % gen)
        self.check(ev and "error" not in ev, "generation %d: full backup completes" % gen)
        self.ok({"execute": "blockdev-del", "arguments": {"node-name": "t%d" % gen}})
        self.restores(f, "exp%d.raw" % gen, "generation %d (full) restores" % gen)

    def incremental(self, gen, bitmap):
        f, prev = "gen%d.qcow2" % gen, "gen%d.qcow2" % (gen - 1)
        self.save("exp%d.raw" % gen)
        dirty = self.bitmap(bitmap)["count"]
        self.target("t%d" % gen, f, backing=prev)
        self.ok({"execute": "blockdev-backup", "arguments": {
            "job-id": "g%d" % gen, "device": "disk", "target": "t%d" % gen,
            "sync": "incremental", "bitmap": bitmap}})
        ev = self.wait("g%d" % gen)
        self.check(ev and "error" not in ev and ev["len"] <= dirty + 65536 * 4,
                   "generation %d: incremental copies the dirty clusters" % gen)
        self.check(self.bitmap(bitmap)["count"] == 0,
                   "generation %d: the bitmap is clean afterwards" % gen)
        self.ok({"execute": "blockdev-del", "arguments": {"node-name": "t%d" % gen}})
        self.restores(f, "exp%d.raw" % gen, "generation %d (incremental) restores" % gen)

    def pull(self, gen, bitmap, nxt):
        """Pull mode from a fleecing view of the disk."""
        self.save("exp%d.raw" % gen)
        run(qemu_img, "create", "-q", "-f", "qcow2", "-u", "-b", self.p("disk.qcow2"),
            "-F", "qcow2", self.p("fleece.qcow2"), str(SIZE))
        self.ok({"execute": "blockdev-add", "arguments": {
            "driver": "qcow2", "node-name": "fleece", "backing": "disk",
            "file": {"driver": "file", "filename": self.p("fleece.qcow2")}}})
        # In this order, a write between two actions is in the view's
        # bitmap or below the view, and always in the next bitmap.
        self.ok({"execute": "transaction", "arguments": {"actions": [
            {"type": "block-dirty-bitmap-add",
             "data": {"node": "disk", "name": nxt, "persistent": True}},
            {"type": "blockdev-backup",
             "data": {"job-id": "fl", "device": "disk", "target": "fleece",
                      "sync": "none"}},
            {"type": "block-dirty-bitmap-disable",
             "data": {"node": "disk", "name": bitmap}}]}})
        self.ok({"execute": "block-export-add", "arguments": {
            "type": "nbd", "id": "fleece", "node-name": "fleece",
            "name": "fleece", "bitmaps": [bitmap]}})
        # The guest goes on writing: the view must not move.
        self.guest_writes()
        out = subprocess.run(["nbdinfo", "--map=qemu:dirty-bitmap:" + bitmap,
                              self.uri("fleece")], capture_output=True,
                             text=True, check=True).stdout
        extents = []
        for line in out.splitlines():
            off, ln, typ = (int(x) for x in line.split()[:3])
            if typ & 1:
                extents.append((off, ln))
        run("cp", self.p("restore.raw"), self.p("pulled.raw"))
        with open(self.p("pulled.raw"), "r+b") as img:
            for off, ln in extents:
                # Only this extent: a raw window on the export.
                run(qemu_img, "convert", "-O", "raw", "--image-opts",
                    "driver=raw,offset=%d,size=%d,file.driver=nbd,"
                    "file.export=fleece,file.path=%s" % (off, ln, self.p("nbd.sock")),
                    self.p("extent.raw"))
                with open(self.p("extent.raw"), "rb") as e:
                    img.seek(off)
                    img.write(e.read())
        total = sum(ln for _, ln in extents)
        self.check(0 < total < SIZE // 2, "pull: %d dirty extents, %d bytes read" % (len(extents), total))
        same = subprocess.run(["cmp", "-s", self.p("pulled.raw"), self.p("exp%d.raw" % gen)]).returncode == 0
        self.check(same, "pull: previous restore + dirty extents = the disk at the fleecing point")
        self.save("live.raw")
        moved = subprocess.run(["cmp", "-s", self.p("live.raw"), self.p("exp%d.raw" % gen)]).returncode != 0
        self.check(moved, "pull: while the guest's disk moved on")
        self.ok({"execute": "block-export-del", "arguments": {"id": "fleece"}})
        self.ok({"execute": "job-cancel", "arguments": {"id": "fl"}})
        self.wait("fl")
        self.ok({"execute": "blockdev-del", "arguments": {"node-name": "fleece"}})
        self.ok({"execute": "block-dirty-bitmap-remove",
                 "arguments": {"node": "disk", "name": bitmap}})
        os.replace(self.p("pulled.raw"), self.p("pull%d.raw" % gen))

    def restart(self, kill):
        if kill:
            self.m.close()        # SIGKILL
        else:
            self.ok({"execute": "quit"})
            self.m.proc.wait(timeout=60)
            self.m.close()
        self.start()

    def crash(self, gen):
        """kill -9, restart: the bitmap is inconsistent and refused; the
        tool notices and falls back to a full backup."""
        self.restart(kill=True)
        b = self.bitmap("inc2")
        self.check(b is not None and b.get("inconsistent") is True and not b["recording"],
                   "after kill -9 the persistent bitmap is inconsistent")
        self.target("tx", "refused.qcow2", backing="gen%d.qcow2" % (gen - 1))
        r = self.m.cmd({"execute": "blockdev-backup", "arguments": {
            "job-id": "gx", "device": "disk", "target": "tx",
            "sync": "incremental", "bitmap": "inc2"}})
        self.check("error" in r and r["error"]["desc"] ==
                   "Bitmap 'inc2' is inconsistent and cannot be used",
                   "the incremental backup is refused: %s" %
                   r.get("error", {}).get("desc"))
        self.ok({"execute": "blockdev-del", "arguments": {"node-name": "tx"}})
        # The fallback: drop the bitmap, full backup with a new one.
        self.ok({"execute": "block-dirty-bitmap-remove",
                 "arguments": {"node": "disk", "name": "inc2"}})
        self.full_with_bitmap(gen, "inc3")
        self.guest_writes()
        self.incremental(gen + 1, "inc3")

def flow(name, argv):
    f = Flow(name, argv)
    f.start()
    f.full_with_bitmap(0, "inc")
    for gen in (1, 2, 3):
        f.guest_writes()
        f.incremental(gen, "inc")
    f.guest_writes()
    f.pull(4, "inc", "inc2")
    # The tool keeps the pulled generation as an image of its own.
    run(qemu_img, "convert", "-O", "qcow2", f.p("pull4.raw"), f.p("gen4.qcow2"))
    # A clean restart stores the bitmap; the chain goes on from it.
    f.restart(kill=False)
    b = f.bitmap("inc2")
    f.check(b is not None and b["persistent"] and not b.get("inconsistent")
            and b["count"] > 0, "after a clean restart the bitmap is back")
    f.incremental(5, "inc2")
    f.guest_writes()
    f.crash(6)
    f.ok({"execute": "quit"})
    f.m.proc.wait(timeout=60)
    f.m.close()
    # The chain of generations is a chain qemu-img accepts.
    chk = subprocess.run([qemu_img, "check", f.p("gen7.qcow2")], capture_output=True)
    f.check(chk.returncode == 0, "qemu-img check of the last generation")
    return f.failed

failed = flow("qemu", ["qemu-storage-daemon"]) + flow("vdisk", [vdisk, "serve"])
for x in failed:
    print(x)
sys.exit(1 if failed else 0)
PYEOF
