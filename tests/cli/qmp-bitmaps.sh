#!/usr/bin/env bash
# Dirty bitmaps over QMP under `vdisk serve` and qemu-storage-daemon, one
# script sent to both on twin chains (base <- mid <- top, plus a raw
# node): block-dirty-bitmap-add/-remove/-clear/-enable/-disable/-merge,
# writes, zero writes and discards through the NBD export (qemu-io), then
# the bitmaps as query-named-block-nodes lists them (count, granularity,
# recording, busy, persistent) and their x-debug-block-dirty-bitmap-sha256
# digests compared; the transaction actions, all or nothing (an aborted
# transaction leaves every bitmap's bits and state as they were); and
# every refusal, with QEMU's texts. Persistent bitmaps are qcow2's
# (another test): here only the refusal on a format that cannot store.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-storage-daemon python3 timeout
source "$(dirname "$0")/qmp-functions.bash"
tmpdir
qmp_lib

timeout 300 python3 - "$PWD" "$VDISK" "$QEMU_IMG" <<'PYEOF' || fail "dirty bitmaps differ from qemu-storage-daemon"
import subprocess, sys
from qmplib import *

top, vdisk, qemu_img = sys.argv[1], sys.argv[2], sys.argv[3]
B = "block-dirty-bitmap-"

def C(m, log, cmd, **args):
    log.append(m.cmd({"execute": cmd, "arguments": args}))

def prepare(m, d):
    """The chain, a 4 MiB and a 1 MiB raw node, and top exported."""
    add_chain(m)
    for name, size in (("r", "4M"), ("small", "1M")):
        subprocess.run([qemu_img, "create", "-q", "-f", "raw",
                        "%s/%s.raw" % (d, name), size], check=True)
        m.cmd({"execute": "blockdev-add", "arguments": {
            "driver": "raw", "node-name": name, "file": {
                "driver": "file", "filename": "@D@/%s.raw" % name}}})
    m.cmd({"execute": "nbd-server-start", "arguments": {"addr": {
        "type": "unix", "data": {"path": "@D@/nbd.sock"}}}})
    m.cmd({"execute": "block-export-add", "arguments": {
        "type": "nbd", "id": "e", "node-name": "top", "writable": True}})

def io(d, *cmds):
    argv = ["qemu-io", "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run(argv + ["nbd+unix:///top?socket=%s/nbd.sock" % d],
                   check=True, stdout=subprocess.DEVNULL)

def state(m, log):
    """Every named node's bitmaps, and the digest of each."""
    r = m.cmd({"execute": "query-named-block-nodes", "arguments": {"flat": True}})
    out = {"#auto": []}
    for n in r["return"]:
        if n["node-name"].startswith("#"):
            # Nodes named by the block layer differ by construction;
            # none of them has bitmaps.
            out["#auto"].append(n.get("dirty-bitmaps"))
            continue
        bms = n.get("dirty-bitmaps")
        out[n["node-name"]] = bms
        for bm in bms or []:
            h = m.cmd({"execute": "x-debug-" + B + "sha256", "arguments": {
                "node": n["node-name"], "name": bm["name"]}})
            bm["sha256"] = h.get("return", h)
    log.append(out)

def basics(m, d, log):
    prepare(m, d)
    C(m, log, B + "add", node="top", name="dflt")
    C(m, log, B + "add", node="top", name="fine", granularity=512)
    C(m, log, B + "add", node="top", name="off", disabled=True)
    C(m, log, B + "add", node="top", name="huge", granularity=2**31)
    C(m, log, B + "add", node="mid", name="m")
    C(m, log, B + "add", node="r", name="rb", granularity=4096)
    state(m, log)
    io(d, "write -P 0x21 0 64k", "write -P 0x22 1048704 1k",
       "write -z 2M 128k", "discard 3M 64k", "write -P 0x23 4190208 4096")
    state(m, log)
    C(m, log, B + "clear", node="top", name="fine")
    C(m, log, B + "enable", node="top", name="off")
    C(m, log, B + "disable", node="top", name="dflt")
    io(d, "write -P 0x24 512k 3k", "write -z -u 1536k 64k")
    state(m, log)
    # Merges: local and external sources, other granularities.
    C(m, log, B + "merge", node="top", target="fine", bitmaps=["dflt"])
    C(m, log, B + "merge", node="top", target="off",
      bitmaps=["fine", {"node": "r", "name": "rb"}, "huge"])
    C(m, log, B + "merge", node="r", target="rb",
      bitmaps=[{"node": "top", "name": "dflt"}])
    # (Not bitmaps=[]: an empty list crashes qemu-storage-daemon 7.2.)
    C(m, log, B + "merge", node="top", target="dflt", bitmaps=["dflt"])
    state(m, log)
    C(m, log, B + "remove", node="top", name="huge")
    C(m, log, B + "remove", node="mid", name="m")
    state(m, log)
    # A resize keeps the bits below the new end; a grown end is clean.
    C(m, log, "block_resize", node_name="r", size=8 << 20)
    state(m, log)
    C(m, log, "block_resize", node_name="r", size=1 << 20)
    state(m, log)
    C(m, log, B + "merge", node="top", target="dflt",
      bitmaps=[{"node": "r", "name": "rb"}])
basics.top_changes = True

def errors(m, d, log):
    prepare(m, d)
    C(m, log, B + "add", node="top", name="b")
    C(m, log, B + "add", node="top", name="b")
    C(m, log, B + "add", node="top", name="")
    C(m, log, B + "add", node="nope", name="")
    C(m, log, B + "add", node="nope", name="x")
    for g in (0, 256, 1000, 3 * 512, -1, 2**32, 2**33):
        C(m, log, B + "add", node="top", name="g", granularity=g)
    C(m, log, B + "add", node="top", name="x" * 1024)
    C(m, log, B + "add", node="top", name="x" * 1023)
    C(m, log, B + "add", node="r", name="p", persistent=True)
    C(m, log, B + "add", node="r", name="p", persistent=False)
    C(m, log, B + "add", node="top")
    C(m, log, B + "add", node="top", name="y", bogus=1)
    for cmd in ("remove", "clear", "enable", "disable"):
        C(m, log, B + cmd, node="top", name="zz")
        C(m, log, B + cmd, node="zz", name="b")
        C(m, log, B + cmd, node="top")
    C(m, log, "x-debug-" + B + "sha256", node="top", name="zz")
    C(m, log, "x-debug-" + B + "sha256", node="zz", name="b")
    C(m, log, B + "add", node="small", name="s")
    for bms in (["zz"], [{"node": "zz", "name": "b"}], [{"node": "top"}],
                [1], "b", [{"node": "small", "name": "s"}],
                [{"node": "top", "name": "nope"}], ["b", "zz"]):
        C(m, log, B + "merge", node="top", target="b", bitmaps=bms)
    C(m, log, B + "merge", node="top", target="zz", bitmaps=["b"])
    C(m, log, B + "merge", node="zz", target="b", bitmaps=["b"])
    C(m, log, B + "merge", node="small", target="s", bitmaps=[{"node": "top", "name": "b"}])
    state(m, log)

def T(m, log, *actions):
    log.append(m.cmd({"execute": "transaction", "arguments": {
        "actions": [{"type": B + t, "data": a} if t != "abort" else
                    {"type": "abort", "data": {}} for t, a in actions]}}))

def transactions(m, d, log):
    prepare(m, d)
    C(m, log, B + "add", node="top", name="a")
    C(m, log, B + "add", node="top", name="b", granularity=4096)
    io(d, "write -P 0x31 0 192k", "write -P 0x32 1M 4k")
    C(m, log, B + "add", node="top", name="c", disabled=True)
    state(m, log)
    # Each of these fails at its end: nothing may remain of the others.
    T(m, log, ("add", {"node": "top", "name": "n1"}),
      ("clear", {"node": "top", "name": "a"}),
      ("disable", {"node": "top", "name": "b"}),
      ("enable", {"node": "top", "name": "c"}),
      ("merge", {"node": "top", "target": "c", "bitmaps": ["a", "b"]}),
      ("abort", None))
    T(m, log, ("merge", {"node": "top", "target": "c", "bitmaps": ["a"]}),
      ("clear", {"node": "top", "name": "b"}),
      ("add", {"node": "top", "name": "a"}))
    T(m, log, ("remove", {"node": "top", "name": "a"}),
      ("remove", {"node": "top", "name": "a"}))
    T(m, log, ("remove", {"node": "top", "name": "a"}),
      ("add", {"node": "top", "name": "a"}))
    T(m, log, ("remove", {"node": "top", "name": "zz"}))
    T(m, log, ("clear", {"node": "zz", "name": "a"}))
    T(m, log, ("add", {"node": "top", "name": "g", "granularity": 2**33}))
    T(m, log, ("add", {"node": "top", "name": "g", "granularity": 768}))
    T(m, log, ("merge", {"node": "top", "target": "a", "bitmaps": "a"}))
    state(m, log)
    io(d, "write -P 0x33 2M 4k")
    state(m, log)
    # And these succeed.
    T(m, log, ("add", {"node": "top", "name": "n2", "granularity": 16384}),
      ("merge", {"node": "top", "target": "n2", "bitmaps": ["a", "b"]}),
      ("disable", {"node": "top", "name": "n2"}),
      ("clear", {"node": "top", "name": "a"}),
      ("enable", {"node": "top", "name": "c"}))
    io(d, "write -P 0x34 3M 4k")
    state(m, log)
    T(m, log, ("remove", {"node": "top", "name": "b"}),
      ("clear", {"node": "top", "name": "n2"}))
    state(m, log)
transactions.top_changes = True

failed = compare_jobs([basics, errors, transactions], top, vdisk, qemu_img)
for f in failed:
    print(f)
sys.exit(1 if failed else 0)
PYEOF
