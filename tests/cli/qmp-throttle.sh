#!/usr/bin/env bash
# QMP on throttle nodes and their groups, against qemu-storage-daemon
# with the same command line: block_set_io_throttle (qemu-storage-daemon
# 7.2 has no such command: it lives in QEMU's system emulator, on the
# BlockBackends of guest devices, and the daemon answers CommandNotFound
# for every form of it), qom-get/qom-set of a group's limits while a
# throttle node uses it (valid and refused), the group and the node
# refused to go while in use, then released in order. Every answer must
# be the same (errors to the message, values to the JSON).
source "$(dirname "$0")/../functions.sh"
requires qemu-storage-daemon python3 timeout
source "$(dirname "$0")/qmp-functions.bash"
tmpdir
qmp_lib

timeout 100 python3 - "$PWD" "$VDISK" <<'PYEOF' || fail "answers differ from qemu-storage-daemon"
import json, sys
from qmplib import *

top, vdisk = sys.argv[1], sys.argv[2]

def throttle(**args):
    return {"execute": "block_set_io_throttle", "arguments": args}
def qget(path, prop):
    return {"execute": "qom-get", "arguments": {"path": path, "property": prop}}
def qset(path, prop, value):
    return {"execute": "qom-set",
            "arguments": {"path": path, "property": prop, "value": value}}
def ex(cmd, **args):
    return {"execute": cmd, "arguments": args}

Z = dict(bps=0, bps_rd=0, bps_wr=0, iops=0, iops_rd=0, iops_wr=0)
SEQ = [
    # block_set_io_throttle, by node, export, device and qdev id, valid
    # and not.
    throttle(device="t0", **dict(Z, bps=1048576)),
    throttle(id="t0", **Z),
    throttle(device="e0", **Z),
    throttle(**Z),
    throttle(device="t0", id="t0", **Z),
    throttle(device="t0", bps=1),
    throttle(device="t0", **dict(Z, bps=-1)),
    throttle(device="t0", group="tg", **dict(Z, iops=100, iops_max=200,
                                             iops_max_length=5)),
    {"execute": "block_set_io_throttle"},
    # the group of a node in use
    qget("tg", "limits"), qget("tg", "x-bps-total"),
    qset("tg", "limits", {"bps-total": 2097152, "bps-total-max": 4194304}),
    qget("tg", "limits"), qget("tg", "x-bps-total-max-length"),
    qset("tg", "x-iops-read", 300), qget("tg", "limits"),
    qset("tg", "limits", {"bps-total": 1, "bps-read": 1}),
    qset("tg", "limits", {"iops-read-max": 10}),
    qset("tg", "x-bps-total-max-length", 0),
    qset("tg", "limits", {"bps-total": -5}),
    qget("tg", "limits"),
    # a second node joins the group; nothing goes while in use
    ex("blockdev-add", driver="null-co", **{"node-name": "n1"}),
    ex("blockdev-add", driver="throttle", file="n1",
       **{"node-name": "t1", "throttle-group": "tg"}),
    ex("blockdev-add", driver="throttle", file="n1",
       **{"node-name": "t2", "throttle-group": "nope"}),
    ex("blockdev-add", driver="throttle", file="n1", **{"node-name": "t2"}),
    ex("blockdev-add", driver="throttle", file="n1",
       **{"node-name": "t2", "throttle-group": "tg", "limits": {}}),
    ex("object-del", id="tg"),
    ex("blockdev-del", **{"node-name": "t0"}),
    ex("blockdev-del", **{"node-name": "n0"}),
    # released in order
    ex("blockdev-del", **{"node-name": "t1"}),
    ex("object-del", id="tg"),
    ex("block-export-del", id="e0"),
    ex("blockdev-del", **{"node-name": "t0"}),
    ex("object-del", id="tg"),
    qget("tg", "limits"),
]

def session(prog, d):
    m = Monitor(prog, d, [
        "--object", "throttle-group,id=tg,limits.bps-total=1048576",
        "--blockdev", "driver=null-co,node-name=n0,size=1048576",
        "--blockdev", "driver=throttle,node-name=t0,throttle-group=tg,file=n0",
        "--nbd-server", "addr.type=unix,addr.path=%s/nbd.sock" % d,
        "--export", "type=nbd,id=e0,node-name=t0,writable=on"])
    out = [m.cmd(req) for req in SEQ]
    m.close()
    return out

q = session(["qemu-storage-daemon"], top + "/qemu")
v = session([vdisk, "serve"], top + "/vdisk")
bad = 0
for req, a, b in zip(SEQ, q, v):
    if a != b:
        print("request: %s\n  qemu:  %s\n  vdisk: %s" % (json.dumps(req), a, b))
        bad += 1
print("%d requests, %d differences" % (len(SEQ), bad))
sys.exit(1 if bad else 0)
PYEOF
exit 0
