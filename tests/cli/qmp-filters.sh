#!/usr/bin/env bash
# blockdev-add of the filter drivers (blkdebug, blkverify, throttle,
# copy-on-read, compress, preallocate, null-aio, host_device) against
# qemu-storage-daemon: each request gets the same answer (the same
# error text), in JSON over QMP and as --blockdev key=value options on
# the command line (lists as key.0.member).
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-storage-daemon python3 timeout
tmpdir

mkdir qemu vdisk
for d in qemu vdisk; do
    $QEMU_IMG create -q -f qcow2 $d/a.qcow2 1M
    $QEMU_IMG create -q -f raw $d/r.img 1M
done

timeout 60 python3 - "$PWD" "$VDISK" <<'PYEOF' || fail "answers differ from qemu-storage-daemon"
import json, os, socket, subprocess, sys, time

top, vdisk = sys.argv[1], sys.argv[2]
IMG = '{"driver": "file", "filename": "@D@/a.qcow2"}'
B = '{"execute": "blockdev-add", "arguments": {"node-name": "%s", "driver": "%s", %s}}'
def bd(node, driver, rest):
    return B % (node, driver, rest)
SEQ = [
    '{"execute": "qmp_capabilities"}',
    bd("b1", "blkdebug", '"image": %s, "inject-error": [{"event": "bogus"}]' % IMG),
    bd("b1", "blkdebug", '"image": %s, "inject-error": [{"event": "l2_load", "errno": "x"}]' % IMG),
    bd("b1", "blkdebug", '"image": %s, "inject-error": [{"errno": 5}]' % IMG),
    bd("b1", "blkdebug", '"image": %s, "inject-error": {"event": "l2_load"}' % IMG),
    bd("b1", "blkdebug", '"image": %s, "inject-error": [5]' % IMG),
    bd("b1", "blkdebug", '"image": %s, "set-state": [{"event": "l2_load"}]' % IMG),
    bd("b1", "blkdebug", '"image": %s, "take-child-perms": ["bogus"]' % IMG),
    bd("b1", "blkdebug", '"image": %s, "take-child-perms": "write"' % IMG),
    bd("b1", "blkdebug", '"image": %s, "inject-error": [{"event": "l2_load", "iotype": "x"}]' % IMG),
    bd("b1", "blkdebug", '"image": %s, "inject-error": [{"event": "l2_load", "junk": 1}]' % IMG),
    bd("b1", "blkdebug", '"image": %s, "align": 3' % IMG),
    bd("b1", "blkdebug", '"image": %s, "config": "@D@/nofile"' % IMG),
    bd("b1", "blkdebug", '"image": %s, "inject-error": [{"event": "l2_load", "errno": 5, "once": true}], "set-state": [{"event": "none", "new_state": 2}], "align": 4096, "take-child-perms": ["write"]' % IMG),
    bd("q1", "qcow2", '"file": "b1"'),
    '{"execute": "blockdev-add", "arguments": {"driver": "throttle", "node-name": "t1", "file": "q1"}}',
    bd("t1", "throttle", '"file": "q1", "throttle-group": "x"'),
    '{"execute": "object-add", "arguments": {"qom-type": "throttle-group", "id": "tg", "limits": {"iops-total": 1000}}}',
    bd("t1", "throttle", '"file": "q1", "throttle-group": "tg"'),
    '{"execute": "object-del", "arguments": {"id": "tg"}}',
    bd("c1", "copy-on-read", '"file": "t1", "bottom": 5'),
    bd("c1", "copy-on-read", '"file": "t1", "bottom": "nope"'),
    bd("c1", "copy-on-read", '"file": "t1", "bottom": "t1"'),
    bd("c1", "copy-on-read", '"file": "t1"'),
    bd("p1", "preallocate", '"file": {"driver": "file", "filename": "@D@/r.img"}, "prealloc-size": "x"'),
    bd("p1", "preallocate", '"file": {"driver": "file", "filename": "@D@/r.img"}, "prealloc-align": 1000'),
    bd("p1", "preallocate", '"file": {"driver": "file", "filename": "@D@/r.img"}, "prealloc-align": 4096, "prealloc-size": 1048576'),
    bd("v1", "blkverify", '"raw": {"driver": "file", "filename": "@D@/r.img"}'),
    bd("v1", "blkverify", '"raw": {"driver": "file", "filename": "@D@/r.img"}, "test": {"driver": "raw", "file": {"driver": "file", "filename": "@D@/r.img"}}'),
    bd("z1", "compress", '"file": {"driver": "file", "filename": "@D@/r.img"}'),
    bd("z1", "compress", '"file": {"driver": "qcow2", "file": {"driver": "file", "filename": "@D@/a.qcow2", "locking": "off"}}'),
    bd("n1", "null-aio", '"size": 1048576, "read-zeroes": true, "latency-ns": 10'),
    bd("n2", "null-aio", '"size": "x"'),
    bd("h1", "host_device", '"filename": "@D@/r.img"'),
    bd("h2", "host_cdrom", '"filename": "@D@/r.img"'),
    '{"execute": "blockdev-del", "arguments": {"node-name": "c1"}}',
    '{"execute": "blockdev-del", "arguments": {"node-name": "t1"}}',
    '{"execute": "object-del", "arguments": {"id": "tg"}}',
]

def session(prog, d):
    sock = d + "/qmp.sock"
    p = subprocess.Popen(prog + ["--chardev", "socket,id=m,path=%s,server=on,wait=off" % sock,
                                 "--monitor", "chardev=m"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    s = socket.socket(socket.AF_UNIX)
    for _ in range(200):
        try:
            s.connect(sock)
            break
        except OSError:
            time.sleep(0.05)
    s.settimeout(20)
    f = s.makefile("rb", buffering=0)
    f.readline()
    out = []
    for req in SEQ:
        s.sendall(req.replace("@D@", d).encode() + b"\n")
        while True:
            r = json.loads(f.readline())
            if "event" not in r:
                break
        out.append(r.get("error", {"return": r.get("return")}))
    s.sendall(b'{"execute": "quit"}\n')
    p.wait(20)
    return [json.dumps(o).replace(d, "@D@") for o in out]

q = session(["qemu-storage-daemon"], top + "/qemu")
v = session([vdisk, "serve"], top + "/vdisk")
bad = 0
for req, a, b in zip(SEQ, q, v):
    if a != b:
        print("request: %s\n  qemu:  %s\n  vdisk: %s" % (req, a, b))
        bad += 1
sys.exit(1 if bad else 0)
PYEOF

# The command line's key=value form, lists by index.
for extra in inject-error.0.event=bogus inject-error.0.errno=x \
             inject-error.1.event=l2_load take-child-perms.0=bogus \
             "inject-error.0.event=l2_load,inject-error.0.iotype=x" \
             "set-state.0.event=l2_load" "align=3"; do
    for d in qemu vdisk; do
        if [ $d = qemu ]; then prog=(qemu-storage-daemon); else prog=("$VDISK" serve); fi
        expect_status 1 timeout 20 "${prog[@]}" \
            --blockdev "driver=file,node-name=f,filename=$d/a.qcow2" \
            --blockdev "driver=blkdebug,node-name=b,image=f,$extra" \
            > $d.out 2>&1
        sed -i 's/^[^:]*: //' $d.out
    done
    diff -u qemu.out vdisk.out || fail "--blockdev ...,$extra: message differs"
done
exit 0
