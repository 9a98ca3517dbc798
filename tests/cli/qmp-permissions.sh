#!/usr/bin/env bash
# The permission model seen through QMP: one script of graph changes goes
# to qemu-storage-daemon and to `vdisk serve`, and every answer must be
# the same (return, or error class and text): exporting the protocol
# child of a writable format node, two writable exports of one node,
# resizing under a raw offset/size window, deleting nodes in use (as a
# child, as a backing node, as an export), one node as the backing of two
# writers, a second writable format node on a file in use (in-process and
# through the lock bytes), and what becomes possible once the user goes.
# Regression: block-export-add accepted a writable export of the file
# child of a writable qcow2 node, and a second writable qcow2 node on a
# file another one wrote, both of which QEMU refuses.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-storage-daemon python3 timeout
source "$(dirname "$0")/qmp-functions.bash"
tmpdir
qmp_lib

mkdir qemu vdisk
for d in qemu vdisk; do
    $QEMU_IMG create -q -f qcow2 $d/a.qcow2 64M
    $QEMU_IMG create -q -f raw $d/r.raw 1M
    $QEMU_IMG create -q -f qcow2 $d/base.qcow2 64M
    $QEMU_IMG create -q -f qcow2 -b base.qcow2 -F qcow2 $d/o1.qcow2
    $QEMU_IMG create -q -f qcow2 -b base.qcow2 -F qcow2 $d/o2.qcow2
done

timeout 120 python3 - "$PWD" "$VDISK" <<'PYEOF' || fail "QMP answers differ from qemu-storage-daemon"
import os, sys
from qmplib import Monitor, outcome

top, vdisk = sys.argv[1], sys.argv[2]

SEQ = r'''
{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "f", "filename": "@D@/a.qcow2"}}
{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "q", "file": "f"}}
{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "q2", "file": "f"}}
{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "q3", "file": "f", "read-only": true}}
{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "rr", "file": "f"}}
{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "q4", "file": {"driver": "file", "filename": "@D@/a.qcow2"}}}
{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "q5", "read-only": true, "file": {"driver": "file", "filename": "@D@/a.qcow2"}}}
{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "@D@/nbd.sock"}}}}
{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e1", "node-name": "f", "writable": true}}
{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e1", "node-name": "f"}}
{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e2", "node-name": "q", "writable": true}}
{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e3", "node-name": "q", "writable": true, "name": "q-again"}}
{"execute": "block_resize", "arguments": {"node-name": "q", "size": 134217728}}
{"execute": "block_resize", "arguments": {"node-name": "f", "size": 134217728}}
{"execute": "blockdev-del", "arguments": {"node-name": "q"}}
{"execute": "blockdev-del", "arguments": {"node-name": "f"}}
{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "fr", "filename": "@D@/r.raw"}}
{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "rw", "file": "fr", "offset": 512, "size": 4096}}
{"execute": "block_resize", "arguments": {"node-name": "fr", "size": 2097152}}
{"execute": "block_resize", "arguments": {"node-name": "rw", "size": 8192}}
{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "rall", "file": "fr"}}
{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e4", "node-name": "rw", "writable": true}}
{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e5", "node-name": "rall", "writable": true}}
{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e6", "node-name": "fr", "writable": true}}
{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "base", "read-only": true, "file": {"driver": "file", "filename": "@D@/base.qcow2"}}}
{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "o1", "backing": "base", "file": {"driver": "file", "filename": "@D@/o1.qcow2"}}}
{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "o2", "backing": "base", "file": {"driver": "file", "filename": "@D@/o2.qcow2"}}}
{"execute": "block_resize", "arguments": {"node-name": "base", "size": 1048576}}
{"execute": "blockdev-del", "arguments": {"node-name": "base"}}
{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e7", "node-name": "base", "writable": true}}
{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e8", "node-name": "base"}}
{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e9", "node-name": "o1", "writable": true}}
{"execute": "blockdev-del", "arguments": {"node-name": "o2"}}
{"execute": "blockdev-del", "arguments": {"node-name": "base"}}
{"execute": "block-export-del", "arguments": {"id": "e2"}}
{"execute": "block-export-del", "arguments": {"id": "e3"}}
{"execute": "block_resize", "arguments": {"node-name": "q", "size": 134217728}}
{"execute": "blockdev-del", "arguments": {"node-name": "q"}}
{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "q6", "file": "f"}}
{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e10", "node-name": "f", "writable": true}}
'''.strip().splitlines()



q = Monitor(["qemu-storage-daemon"], os.path.join(top, "qemu"))
v = Monitor([vdisk, "serve"], os.path.join(top, "vdisk"))
bad = 0
for line in SEQ:
    a = outcome(q.cmd(line), q.d)
    b = outcome(v.cmd(line), v.d)
    print(line)
    print("   qemu-storage-daemon:", a)
    if a != b:
        print("   vdisk serve:        ", b)
        bad += 1
q.close()
v.close()
print("%d of %d answers differ" % (bad, len(SEQ)))
sys.exit(1 if bad else 0)
PYEOF
