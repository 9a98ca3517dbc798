#!/usr/bin/env bash
# qemu-storage-daemon's QMP commands beyond the basics, one script sent
# to qemu-storage-daemon and to `vdisk serve`, every reply compared
# member by member with the directory names made equal: query-version
# (QEMU's release, the micro and package strings being each build's
# own), query-block (empty: no named backends), query-named-block-nodes
# with and without "flat" (absolute backing paths, backing_file_depth,
# the nested image tree), the legacy nbd-server-add/nbd-server-remove
# (a read-only node exported read-only, the name as the id), and
# blockdev-reopen of the read-only mode with its permission checks and
# QEMU's refusals.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-storage-daemon python3 timeout
source "$(dirname "$0")/qmp-functions.bash"
tmpdir
qmp_lib

for d in qemu vdisk; do
    mkdir $d
    $QEMU_IMG create -q -f raw $d/r.raw 1M
    $QEMU_IMG create -q -f qcow2 $d/base.qcow2 1M
    $QEMU_IMG create -q -f qcow2 -b base.qcow2 -F qcow2 $d/mid.qcow2
    $QEMU_IMG create -q -f qcow2 -b mid.qcow2 -F qcow2 $d/top.qcow2
done

timeout 120 python3 - "$PWD" "$VDISK" <<'PYEOF' || fail "QMP replies differ from qemu-storage-daemon"
import json, sys
from qmplib import *

top, vdisk = sys.argv[1], sys.argv[2]

def R(*opts):
    return {"execute": "blockdev-reopen", "arguments": {"options": list(opts)}}

SEQ = [
    {"execute": "query-version"},
    {"execute": "query-block"},
    {"execute": "query-block", "arguments": {"x": 1}},
    {"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r", "file": {"driver": "file", "node-name": "rf", "filename": "@D@/r.raw"}}},
    {"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "t", "file": {"driver": "file", "node-name": "tf", "filename": "@D@/top.qcow2"}}},
    {"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "b", "read-only": True, "file": {"driver": "file", "node-name": "bf", "filename": "@D@/base.qcow2"}}},
    {"execute": "query-block"},
    {"execute": "query-named-block-nodes"},
    {"execute": "query-named-block-nodes", "arguments": {"flat": True}},
    {"execute": "query-named-block-nodes", "arguments": {"flat": False}},
    {"execute": "query-named-block-nodes", "arguments": {"flat": "yes"}},
    # blockdev-reopen: refusals first, then the read-only mode.
    R({"driver": "raw", "file": "rf"}),
    R({"driver": "raw", "node-name": "nope", "file": "rf"}),
    R({"driver": "qcow2", "node-name": "r", "file": "rf"}),
    {"execute": "blockdev-reopen", "arguments": {}},
    {"execute": "blockdev-reopen", "arguments": {"options": [{"node-name": "r"}]}},
    R({"driver": "raw", "node-name": "r", "file": "rf", "read-only": True}),
    {"execute": "query-named-block-nodes", "arguments": {"flat": True}},
    R({"driver": "raw", "node-name": "r", "file": "rf"}),
    R({"driver": "file", "node-name": "rf", "filename": "@D@/r.raw", "read-only": True}),
    R({"driver": "file", "node-name": "rf", "filename": "@D@/r.raw"}),
    R({"driver": "qcow2", "node-name": "b", "file": "bf", "read-only": False}),
    R({"driver": "qcow2", "node-name": "b", "file": "bf", "read-only": True}),
    R({"driver": "raw", "node-name": "r", "file": "rf"}, {"driver": "qcow2", "node-name": "b", "file": "bf", "read-only": True}),
    {"execute": "query-named-block-nodes", "arguments": {"flat": True}},
    # The legacy export commands.
    {"execute": "nbd-server-add", "arguments": {"device": "r"}},
    {"execute": "nbd-server-add", "arguments": {"device": "nope"}},
    {"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "@D@/nbd.sock"}}}},
    {"execute": "nbd-server-add", "arguments": {"device": "r", "writable": True}},
    {"execute": "nbd-server-add", "arguments": {"device": "r"}},
    {"execute": "nbd-server-add", "arguments": {"device": "b", "writable": True}},
    {"execute": "nbd-server-add", "arguments": {"device": "t", "name": "tt", "description": "top"}},
    {"execute": "nbd-server-add", "arguments": {"device": "t", "bitmap": "nobitmap"}},
    {"execute": "nbd-server-add", "arguments": {"device": "t", "name": "tt"}},
    {"execute": "nbd-server-add", "arguments": {"name": "x"}},
    {"execute": "query-block-exports"},
    # A writable export holds write: the node cannot go read-only.
    R({"driver": "raw", "node-name": "r", "file": "rf", "read-only": True}),
    R({"driver": "file", "node-name": "rf", "filename": "@D@/r.raw", "read-only": True}),
    {"execute": "nbd-server-remove", "arguments": {"name": "tt", "mode": "hard"}},
    {"execute": "nbd-server-remove", "arguments": {"name": "tt"}},
    {"execute": "nbd-server-remove", "arguments": {"name": "r", "mode": "bad"}},
    {"execute": "nbd-server-remove", "arguments": {"name": "r"}},
    R({"driver": "raw", "node-name": "r", "file": "rf", "read-only": True}),
    {"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e1", "node-name": "t", "name": "t-exp"}},
    {"execute": "nbd-server-remove", "arguments": {"name": "t-exp"}},
    {"execute": "nbd-server-remove", "arguments": {"name": "e1"}},
    {"execute": "query-block-exports"},
    {"execute": "nbd-server-stop"},
    {"execute": "query-named-block-nodes"},
]

# Members that are each build's own: the micro release and the package
# string (QEMU's distribution, vdisk's version).
IGNORE = ("micro", "package")

q = Monitor(["qemu-storage-daemon"], top + "/qemu")
v = Monitor([vdisk, "serve"], top + "/vdisk")
bad = 0
for req in SEQ:
    a = q.cmd(req)
    b = v.cmd(req)
    print(json.dumps(req))
    if "error" in a or "error" in b:
        oa, ob = outcome(a, q.d), outcome(b, v.d)
        print("   qemu-storage-daemon:", oa)
        if oa != ob:
            print("   vdisk serve:        ", ob)
            bad += 1
        continue
    problems = diff(norm(a["return"], q.d), norm(b["return"], v.d), IGNORE)
    print("   same" if not problems else "   DIFFERENT")
    for p in problems:
        print("     ", p)
    bad += bool(problems)
q.close()
v.close()
print("%d of %d replies differ" % (bad, len(SEQ)))
sys.exit(1 if bad else 0)
PYEOF
exit 0
