#!/usr/bin/env bash
# vdisk's QMP daemon against QEMU's own qemu-storage-daemon: the same
# command sequence (good and bad input) goes to both, and the *shape* of
# every answer must match: the key sets and JSON types of each `return`,
# recursively, and the `class` of each `error` (and its text, for the
# block_resize refusals). Values that legitimately differ (paths,
# versions, times, counters) are not compared.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-storage-daemon python3 timeout
tmpdir

mkdir qemu vdisk
for d in qemu vdisk; do
    $QEMU_IMG create -q -f qcow2 $d/a.qcow2 64M
    $QEMU_IMG create -q -f qcow2 $d/base.qcow2 64M
    $QEMU_IMG create -q -f qcow2 -b base.qcow2 -F qcow2 $d/top.qcow2
    $QEMU_IMG create -q -f raw $d/r.raw 1M
    $QEMU_IMG create -q -f qcow2 $d/base2.qcow2 1M
    $QEMU_IMG create -q -f qcow2 -b base2.qcow2 -F qcow2 $d/top2.qcow2
done

timeout 100 qemu-storage-daemon --chardev "socket,id=m,path=$PWD/qemu/qmp.sock,server=on,wait=off" \
    --monitor chardev=m > qemu.log 2>&1 &
qsd=$!
cleanup_fn sh -c "kill $qsd 2>/dev/null; true"
timeout 100 "$VDISK" serve --chardev "socket,id=m,path=$PWD/vdisk/qmp.sock,server=on,wait=off" \
    --monitor chardev=m > vdisk.log 2>&1 &
vd=$!
cleanup_fn sh -c "kill $vd 2>/dev/null; true"

timeout 100 python3 - "$PWD" <<'PYEOF' || fail "QMP answers differ from qemu-storage-daemon"
import json, socket, sys, time

top = sys.argv[1]

# @D@ is replaced by each side's directory.
SEQ = [
    ('{"execute": "query-version"}', "before negotiation"),
    ('{"execute": "qmp_capabilities"}', ""),
    ('{"execute": "qmp_capabilities"}', "twice"),
    ('{"execute": "query-version"}', ""),
    ('{"execute": "no-such-command", "id": 1}', ""),
    ('{"execute": "query-version", "arguments": {"x": 1}}', ""),
    ('[1]', ""),
    ('{"execute": "blockdev-add"}', "missing driver"),
    ('{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "q"}}', "missing file"),
    ('{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": 5, "filename": "x"}}', "wrong type"),
    ('{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "f", "filename": "@D@/a.qcow2", "junk": 1}}', "unexpected"),
    ('{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "f", "filename": "@D@/a.qcow2"}}', ""),
    ('{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "q", "file": "f"}}', ""),
    ('{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "t", "file": {"driver": "file", "filename": "@D@/top.qcow2"}, "read-only": true}}', ""),
    ('{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": "@D@/r.raw"}, "cache": {"direct": false, "no-flush": true}, "discard": "unmap", "detect-zeroes": "unmap"}}', ""),
    ('{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n", "size": 1048576}}', ""),
    ('{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "f", "filename": "@D@/a.qcow2"}}', "duplicate"),
    ('{"execute": "query-named-block-nodes"}', ""),
    ('{"execute": "query-blockstats"}', ""),
    ('{"execute": "query-blockstats", "arguments": {"query-nodes": true}}', ""),
    ('{"execute": "blockdev-del", "arguments": {"node-name": "f"}}', "child in use"),
    ('{"execute": "blockdev-del", "arguments": {"node-name": "nope"}}', "unknown node"),
    ('{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e", "node-name": "q"}}', "no server"),
    ('{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "@D@/nbd.sock"}}}}', ""),
    ('{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "@D@/nbd2.sock"}}}}', "already running"),
    ('{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e", "node-name": "q", "writable": true}}', ""),
    ('{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e", "node-name": "q"}}', "duplicate id"),
    ('{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e2", "node-name": "t", "writable": true}}', "read-only node"),
    ('{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e3", "node-name": "nope"}}', "unknown node"),
    ('{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e4", "node-name": "r", "name": "raw", "description": "d", "allocation-depth": true}}', ""),
    ('{"execute": "query-block-exports"}', ""),
    ('{"execute": "blockdev-del", "arguments": {"node-name": "q"}}', "exported"),
    ('{"execute": "blockdev-snapshot-internal-sync", "arguments": {"device": "nope", "name": "s"}}', "unknown device"),
    ('{"execute": "blockdev-snapshot-internal-sync", "arguments": {"device": "t", "name": "s"}}', "read-only"),
    ('{"execute": "blockdev-snapshot-delete-internal-sync", "arguments": {"device": "t"}}', "no id or name"),
    ('{"execute": "block_resize", "arguments": {"node-name": "nope", "size": 1024}}', "unknown node"),
    ('{"execute": "block_resize", "arguments": {"node-name": "n", "size": "big"}}', "wrong type"),
    ('{"execute": "block_resize", "arguments": {"node-name": "q", "size": 134217728}}', "resize: writable export"),
    ('{"execute": "block_resize", "arguments": {"node-name": "r", "size": 2097152}}', "resize: read-only export"),
    ('{"execute": "block_resize", "arguments": {"node-name": "f", "size": 134217728}}', "resize: file of an exported qcow2"),
    ('{"execute": "block_resize", "arguments": {"node-name": "t", "size": 134217728}}', "resize: read-only node"),
    ('{"execute": "block-export-del", "arguments": {"id": "nope"}}', "unknown export"),
    ('{"execute": "block-export-del", "arguments": {"id": "e", "mode": "bad"}}', "bad mode"),
    ('{"execute": "block-export-del", "arguments": {"id": "e4"}}', ""),
    ('{"execute": "block_resize", "arguments": {"node-name": "r", "size": 2097152}}', "resize: export deleted"),
    ('{"execute": "block_resize", "arguments": {"node-name": "q", "size": 134217728}}', "resize: other export remains"),
    ('{"execute": "nbd-server-stop"}', ""),
    ('{"execute": "nbd-server-stop"}', "not running"),
    ('{"execute": "query-block-exports"}', ""),
    ('{"execute": "block_resize", "arguments": {"node-name": "q", "size": 134217728}}', "resize: exports gone"),
    ('{"execute": "block_resize", "arguments": {"node-name": "f", "size": 268435456}}', "resize: file of an unexported qcow2"),
    ('{"execute": "blockdev-del", "arguments": {"node-name": "r"}}', ""),
    ('{"execute": "blockdev-del", "arguments": {"node-name": "q"}}', ""),
    ('{"execute": "blockdev-del", "arguments": {"node-name": "f"}}', ""),
    ('{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "tp", "file": {"driver": "file", "filename": "@D@/top2.qcow2"}, "backing": {"driver": "qcow2", "node-name": "bb", "file": {"driver": "file", "filename": "@D@/base2.qcow2"}}}}', ""),
    ('{"execute": "block_resize", "arguments": {"node-name": "bb", "size": 1048576}}', "resize: backing node"),
    ('{"execute": "block_resize", "arguments": {"node-name": "tp", "size": 1048576}}', ""),
    ('{"execute": "query-commands"}', ""),
    ('{"execute": "quit"}', ""),
]

# Refusals whose text must be QEMU's word for word, not only its class
# (node names are the same on both sides).
EXACT_DESC = {req for req, what in SEQ if what.startswith("resize:")}

def session(d):
    s = socket.socket(socket.AF_UNIX)
    for _ in range(100):
        try:
            s.connect(d + "/qmp.sock")
            break
        except OSError:
            time.sleep(0.05)
    s.settimeout(30)
    f = s.makefile("rb", buffering=0)
    out = [("greeting", json.loads(f.readline()))]
    for req, what in SEQ:
        s.sendall(req.replace("@D@", d).encode() + b"\n")
        while True:
            r = json.loads(f.readline())
            if "event" in r:
                out.append(("event", {"event": r["event"], "data": r.get("data")}))
                continue
            out.append((req, r))
            break
    s.close()
    return out

def key(x):
    if isinstance(x, dict):
        return x.get("node-name") or x.get("id") or x.get("name") or ""
    return ""

def shape(x):
    if isinstance(x, dict):
        return {k: shape(v) for k, v in x.items()}
    if isinstance(x, list):
        # Node lists are compared element by element in node-name order;
        # other lists by the set of their element shapes.
        if x and all(isinstance(e, dict) and key(e) for e in x):
            return ["list"] + [shape(e) for e in sorted(x, key=key)]
        return ["set"] + sorted({json.dumps(shape(e), sort_keys=True) for e in x})
    if isinstance(x, bool):
        return "bool"
    if isinstance(x, int):
        return "int"
    return type(x).__name__

def diff(a, b, path):
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append("%s.%s only in %s" % (path, k, "qemu" if k in a else "vdisk"))
            else:
                out += diff(a[k], b[k], path + "." + k)
        return out
    if isinstance(a, list) and isinstance(b, list):
        if a[:1] == ["set"] and (len(a) == 1 or len(b) == 1):
            return []  # an empty list matches any element type
        if len(a) != len(b):
            return ["%s: %d vs %d elements" % (path, len(a) - 1, len(b) - 1)]
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += diff(x, y, "%s[%d]" % (path, i))
        return out
    return [] if a == b else ["%s: %s vs %s" % (path, a, b)]

# Members whose presence depends on the implementation's data rather than
# its interface (QEMU's statistics carry an idle time only after I/O).
IGNORE = ("idle_time_ns",)

def strip(x):
    if isinstance(x, dict):
        # vdisk's documented extensions (x-vdisk- members, docs/qmp.md);
        # a qcow2 node's driver-specific holds nothing else.
        out = {k: strip(v) for k, v in x.items()
               if k not in IGNORE and not k.startswith("x-vdisk-")}
        if set(out.get("driver-specific", {"-": 0})) == {"driver"}:
            del out["driver-specific"]
        return out
    if isinstance(x, list):
        return [strip(v) for v in x]
    return x

q = session(top + "/qemu")
v = session(top + "/vdisk")
problems = []
assert len(q) == len(v), (len(q), len(v), [r for r, _ in q], [r for r, _ in v])
for (rq, aq), (rv, av) in zip(q, v):
    label = rq[:90]
    if rq != rv:
        problems.append("%s: qemu sent %s, vdisk %s" % (label, rq[:40], rv[:40]))
        continue
    if rq == '{"execute": "query-commands"}':
        names = {c["name"] for c in av["return"]}
        missing = {s[0].split('"')[3] for s in SEQ if s[0].startswith('{"execute"')} - names - {"no-such-command"}
        if missing:
            problems.append("query-commands lacks %s" % missing)
        continue
    if "error" in aq or "error" in av:
        cq = aq.get("error", {}).get("class")
        cv = av.get("error", {}).get("class")
        if cq != cv:
            problems.append("%s: error class %s vs %s (%s / %s)" %
                            (label, cq, cv, aq.get("error", aq), av.get("error", av)))
        elif rq in EXACT_DESC and aq["error"]["desc"] != av["error"]["desc"]:
            problems.append("%s: error text %r vs %r" %
                            (label, aq["error"]["desc"], av["error"]["desc"]))
        continue
    for p in diff(shape(strip(aq)), shape(strip(av)), ""):
        problems.append("%s: %s" % (label, p))
for p in problems:
    print(p)
sys.exit(1 if problems else 0)
PYEOF

for p in $qsd $vd; do
    for ((i = 0; i < 100; i++)); do
        kill -0 "$p" 2>/dev/null || break
        sleep 0.1
    done
done
kill -0 "$vd" 2>/dev/null && fail "vdisk still running after quit"
wait "$vd" || fail "vdisk exited with status $?"
exit 0
