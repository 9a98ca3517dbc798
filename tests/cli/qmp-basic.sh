#!/usr/bin/env bash
# vdisk serve as a QMP daemon: a python3 client negotiates, adds a
# file+qcow2 node, exports it over NBD, and while qemu-io reads and writes
# through the export it snapshots, reads statistics that grow with I/O,
# is refused a resize of the exported node (as qemu-storage-daemon),
# removes the export, resizes, exports again (qemu-img info over NBD sees
# the new size), removes the export and the nodes and quits. The image
# must pass qemu-img check afterwards.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io python3 timeout
tmpdir

$QEMU_IMG create -q -f qcow2 img.qcow2 64M
$QEMU_IO -c 'write -P 0xab 0 1M' img.qcow2 >/dev/null

timeout 120 "$VDISK" serve --qmp "unix:$PWD/qmp.sock" --pidfile "$PWD/pid" \
    > daemon.log 2>&1 &
daemon=$!
cleanup_fn sh -c "kill $daemon 2>/dev/null; true"

QEMU_IMG=$QEMU_IMG QEMU_IO=$QEMU_IO timeout 100 python3 - "$PWD" <<'PYEOF' || fail "QMP session failed"
import json, os, socket, subprocess, sys, time

d = sys.argv[1]
qemu_io = os.environ["QEMU_IO"]
qemu_img = os.environ["QEMU_IMG"]

s = socket.socket(socket.AF_UNIX)
for _ in range(100):
    try:
        s.connect(d + "/qmp.sock")
        break
    except OSError:
        time.sleep(0.05)
else:
    sys.exit("cannot connect to the monitor")
f = s.makefile("rwb", buffering=0)
events = []

def recv():
    line = f.readline()
    if not line:
        sys.exit("monitor closed the connection")
    return json.loads(line)

def cmd(name, args=None, ok=True):
    req = {"execute": name, "id": name}
    if args is not None:
        req["arguments"] = args
    s.sendall(json.dumps(req).encode() + b"\n")
    while True:
        r = recv()
        if "event" in r:
            events.append(r)
            continue
        assert r.get("id") == name, r
        if ok and "error" in r:
            sys.exit("%s failed: %s" % (name, r["error"]))
        return r

greet = recv()
assert "QMP" in greet and "version" in greet["QMP"], greet
cmd("qmp_capabilities")
cmd("blockdev-add", {"driver": "file", "node-name": "f",
                     "filename": d + "/img.qcow2"})
cmd("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "f"})
cmd("nbd-server-start", {"addr": {"type": "unix",
                                  "data": {"path": d + "/nbd.sock"}}})
cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "q",
                         "name": "disk", "writable": True})
ex = cmd("query-block-exports")["return"]
assert ex == [{"node-name": "q", "shutting-down": False, "type": "nbd",
               "id": "e"}], ex

def stats(node):
    for st in cmd("query-blockstats", {"query-nodes": True})["return"]:
        if st["node-name"] == node:
            return st["stats"]
    sys.exit("no stats for " + node)

before = stats("q")
uri = "nbd+unix:///disk?socket=" + d + "/nbd.sock"

def io(*cmds):
    args = [qemu_io, "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    out = subprocess.run(args + [uri], capture_output=True, text=True,
                         timeout=60)
    if out.returncode or "fail" in out.stdout.lower() or out.stderr:
        sys.exit("qemu-io %s: %s %s" % (cmds, out.stdout, out.stderr))

# I/O through the export, with QMP commands in between.
io("read -P 0xab 0 1M", "write -P 0x11 2M 1M")
# A writer runs while the snapshot is taken and statistics are read.
bg = subprocess.Popen([qemu_io, "-f", "raw"] +
                      sum([["-c", "write -P 0x44 %dk 64k" % (8192 + 64 * i)]
                           for i in range(64)], []) + [uri],
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                      text=True)
sn = cmd("blockdev-snapshot-internal-sync", {"device": "q", "name": "s1"},
         ok=False)
stats("q")
out = bg.communicate(timeout=60)[0]
if bg.returncode or "fail" in out.lower():
    sys.exit("background writer: " + out)
have_snapshots = "return" in sn
io("write -P 0x22 3M 512k", "read -P 0x11 2M 1M")
after = stats("q")
assert after["wr_bytes"] >= before["wr_bytes"] + 1536 * 1024, (before, after)
assert after["rd_bytes"] >= before["rd_bytes"] + 2 * 1024 * 1024, after
assert after["wr_operations"] > before["wr_operations"], after

if have_snapshots:
    nodes = cmd("query-named-block-nodes")["return"]
    q = [n for n in nodes if n["node-name"] == "q"][0]
    assert [x["name"] for x in q["image"].get("snapshots", [])] == ["s1"], q
    r = cmd("blockdev-snapshot-delete-internal-sync",
            {"device": "q", "name": "s1"})["return"]
    assert r["name"] == "s1", r

def export_size():
    info = subprocess.run([qemu_img, "info", "--output=json", "-f", "raw",
                           uri], capture_output=True, text=True, timeout=60)
    if info.returncode:
        sys.exit("qemu-img info: " + info.stderr)
    return json.loads(info.stdout)["virtual-size"]

# An exported node keeps its size (qmp-compat.sh checks QEMU's words).
r = cmd("block_resize", {"node-name": "q", "size": 128 * 1024 * 1024},
        ok=False)
assert r["error"]["class"] == "GenericError", r
r = cmd("block_resize", {"node-name": "f", "size": 128 * 1024 * 1024},
        ok=False)
assert r["error"]["class"] == "GenericError", r
assert export_size() == 64 * 1024 * 1024

# Busy nodes cannot go; then export, qcow2 node and file node go in turn.
r = cmd("blockdev-del", {"node-name": "q"}, ok=False)
assert r["error"]["class"] == "GenericError", r
r = cmd("blockdev-del", {"node-name": "f"}, ok=False)
assert "error" in r, r
cmd("block-export-del", {"id": "e"})
assert any(e["event"] == "BLOCK_EXPORT_DELETED" and e["data"]["id"] == "e"
           for e in events), events

# Without the export the resize goes through, and a new export of the
# node shows clients the new size.
cmd("block_resize", {"node-name": "q", "size": 128 * 1024 * 1024})
cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "q",
                         "name": "disk", "writable": True})
assert export_size() == 128 * 1024 * 1024
io("write -P 0x33 100M 64k", "read -P 0x33 100M 64k")
cmd("block-export-del", {"id": "e"})
cmd("blockdev-del", {"node-name": "q"})
cmd("blockdev-del", {"node-name": "f"})
assert cmd("query-named-block-nodes")["return"] == []
cmd("nbd-server-stop")
cmd("quit")
ev = recv()
assert ev.get("event") == "SHUTDOWN", ev
print("snapshots:", "yes" if have_snapshots else "not supported")
PYEOF

# The daemon leaves on quit and removes its pid file.
for ((i = 0; i < 100; i++)); do
    kill -0 "$daemon" 2>/dev/null || break
    sleep 0.1
done
kill -0 "$daemon" 2>/dev/null && fail "daemon still running after quit"
wait "$daemon" || fail "daemon exited with status $?"
[ -e pid ] && fail "pid file left behind"

$QEMU_IMG check -q img.qcow2 || fail "qemu-img check failed"
$QEMU_IO -c 'read -P 0xab 0 1M' -c 'read -P 0x11 2M 1M' \
    -c 'read -P 0x22 3M 512k' -c 'read -P 0x33 100M 64k' \
    -c 'read -P 0x44 8M 4M' img.qcow2 > r.out
grep -q 'Pattern verification failed' r.out && fail "data lost"
$QEMU_IMG info --output=json img.qcow2 | grep -q '"virtual-size": 134217728' ||
    fail "resize not persistent"
exit 0
