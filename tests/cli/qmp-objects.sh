#!/usr/bin/env bash
# QMP object-add, object-del, qom-list, qom-get and qom-set on secrets,
# throttle groups, authorization lists and TLS credentials: the same
# requests go to qemu-storage-daemon and to vdisk serve's daemon form,
# and every answer must be the same (errors to the message, values to
# the JSON, property lists as sets).
source "$(dirname "$0")/../functions.sh"
requires qemu-storage-daemon python3 timeout openssl
tmpdir

mkdir psk qemu vdisk
echo "alice:$(openssl rand -hex 32)" > psk/keys.psk
printf 'from-a-file' > secret.txt
key=$(openssl rand -hex 32)
iv=$(openssl rand -hex 16)
key64=$(printf '%s' "$key" | xxd -r -p | base64 -w0)
iv64=$(printf '%s' "$iv" | xxd -r -p | base64 -w0)
ct64=$(printf 'sesame' | openssl enc -aes-256-cbc -K "$key" -iv "$iv" |
       base64 -w0)
export key64 iv64 ct64

timeout 100 qemu-storage-daemon \
    --chardev "socket,id=m,path=$PWD/qemu/qmp.sock,server=on,wait=off" \
    --monitor chardev=m > qsd.log 2>&1 &
qsd=$!
cleanup_fn sh -c "kill $qsd 2>/dev/null; true"
timeout 100 "$VDISK" serve \
    --chardev "socket,id=m,path=$PWD/vdisk/qmp.sock,server=on,wait=off" \
    --monitor chardev=m > vd.log 2>&1 &
vd=$!
cleanup_fn sh -c "kill $vd 2>/dev/null; true"

timeout 100 python3 - "$PWD" <<'PYEOF' || fail "answers differ from qemu-storage-daemon"
import json, os, socket, sys, time

top = sys.argv[1]
K, IV, CT = os.environ["key64"], os.environ["iv64"], os.environ["ct64"]

def add(**args):
    return {"execute": "object-add", "arguments": args}
def qlist(path):
    return {"execute": "qom-list", "arguments": {"path": path}}
def qget(path, prop):
    return {"execute": "qom-get", "arguments": {"path": path, "property": prop}}
def qset(path, prop, value):
    return {"execute": "qom-set",
            "arguments": {"path": path, "property": prop, "value": value}}
def delete(i):
    return {"execute": "object-del", "arguments": {"id": i}}

rules = [{"match": "fred", "policy": "allow", "format": "exact"},
         {"match": "bob*", "policy": "allow", "format": "glob"},
         {"match": "eve", "policy": "deny"}]
SEQ = [
    {"execute": "qmp_capabilities"},
    # secrets
    add(**{"qom-type": "secret", "id": "s0", "data": "hello"}),
    add(**{"qom-type": "secret", "id": "s1", "file": top + "/secret.txt"}),
    add(**{"qom-type": "secret", "id": "s2", "data": "aGVsbG8=",
           "format": "base64"}),
    add(**{"qom-type": "secret", "id": "k", "data": K, "format": "base64"}),
    add(**{"qom-type": "secret", "id": "s3", "data": CT, "format": "base64",
           "keyid": "k", "iv": IV}),
    add(**{"qom-type": "secret", "id": "s0", "data": "again"}),
    add(**{"qom-type": "secret", "id": "s4"}),
    add(**{"qom-type": "secret", "id": "s4", "data": "x", "file": "/dev/null"}),
    add(**{"qom-type": "secret", "id": "s4", "file": top + "/nonexist"}),
    add(**{"qom-type": "secret", "id": "s4", "file": top}),
    add(**{"qom-type": "secret", "id": "s4", "data": "x", "keyid": "nokey"}),
    add(**{"qom-type": "secret", "id": "s4", "data": "x", "keyid": "s0"}),
    add(**{"qom-type": "secret", "id": "s4", "data": CT, "keyid": "k",
           "format": "base64"}),
    add(**{"qom-type": "secret", "id": "s4", "data": "x", "loaded": True}),
    add(**{"qom-type": "secret", "id": "s4", "data": 5}),
    add(**{"qom-type": "secret", "id": 5, "data": "x"}),
    add(**{"qom-type": "secret", "id": "a b", "data": "x"}),
    add(**{"qom-type": "secret", "id": "s4", "data": "x", "extra": {"a": 1}}),
    add(**{"qom-type": "secret", "id": "s4", "data": "x", "format": "hex"}),
    add(**{"qom-type": "no-such", "id": "s4"}),
    add(**{"id": "s4"}),
    add(**{"qom-type": "secret"}),
    {"execute": "object-add"},
    qlist("/objects/s0"), qlist("s0"), qlist("/objects"), qlist("objects"),
    qlist("/objects/"), qlist("//objects"), qlist(""), qlist("nope"),
    qlist("/objects/s0/x"), qlist("/objects/nope"),
    qget("/objects/s0", "data"), qget("s0", "loaded"), qget("s0", "format"),
    qget("s0", "keyid"), qget("s0", "file"), qget("s0", "type"),
    qget("s0", "nope"), qget("/objects/nope", "data"), qget("s3", "iv"),
    qget("s2", "format"), qget("/objects", "s0"), qget("/objects", "type"),
    qget("/", "type"), qget("objects", "type"),
    {"execute": "qom-get", "arguments": {"path": "s0"}},
    qset("s0", "data", "x"), qget("s0", "data"),
    qset("s0", "loaded", True), qset("s0", "format", "base64"),
    qset("s0", "format", "bad"), qset("s0", "format", 1), qget("s0", "format"),
    qset("s0", "type", "x"), qset("s0", "nope", 1), qset("nope", "x", 1),
    {"execute": "qom-set", "arguments": {"path": "s0", "property": "data"}},
    # throttle groups
    add(**{"qom-type": "throttle-group", "id": "t0", "x-bps-total": 1000}),
    add(**{"qom-type": "throttle-group", "id": "t1",
           "limits": {"iops-total": 50, "iops-total-max": 100,
                      "iops-total-max-length": 10, "bps-read": 4096}}),
    add(**{"qom-type": "throttle-group", "id": "t2",
           "limits": {"bps-total": "x"}}),
    add(**{"qom-type": "throttle-group", "id": "t2", "x-bps-total": 1.5}),
    add(**{"qom-type": "throttle-group", "id": "t2",
           "x-bps-total": 18446744073709551615}),
    add(**{"qom-type": "throttle-group", "id": "t2", "x-bps-total": True}),
    add(**{"qom-type": "throttle-group", "id": "t2", "x-bps-total": -1}),
    add(**{"qom-type": "throttle-group", "id": "t2",
           "limits": {"iops-size": 5}}),
    add(**{"qom-type": "throttle-group", "id": "t2",
           "limits": {"bps-total": 1, "bps-write": 1}}),
    add(**{"qom-type": "throttle-group", "id": "t2",
           "limits": {"bps-total-max-length": 4294967296}}),
    add(**{"qom-type": "throttle-group", "id": "t2",
           "x-iops-read-max-length": 4294967296}),
    add(**{"qom-type": "throttle-group", "id": "t2",
           "limits": {"nope": 1}}),
    qlist("t0"), qget("t0", "limits"), qget("t1", "limits"),
    qget("t0", "x-bps-total-max"), qget("t1", "x-iops-total-max-length"),
    qset("t0", "x-bps-total", 5), qset("t0", "limits", {"iops-total": 7}),
    qget("t0", "limits"),
    qset("t0", "limits", {"iops-total": 7, "iops-read": 3}),
    qget("t0", "limits"),
    qset("t0", "limits", {"bps-total": -1}), qset("t0", "limits", 5),
    qset("t0", "limits", {"iops-total-max": 1}), qget("t0", "limits"),
    # authorization
    add(**{"qom-type": "authz-simple", "id": "a0", "identity": "bob"}),
    add(**{"qom-type": "authz-simple", "id": "a1"}),
    add(**{"qom-type": "authz-list", "id": "l0", "policy": "deny",
           "rules": rules}),
    add(**{"qom-type": "authz-list", "id": "l1"}),
    add(**{"qom-type": "authz-list", "id": "l2",
           "rules": [{"match": "fred"}]}),
    add(**{"qom-type": "authz-list", "id": "l2",
           "rules": [{"match": "fred", "policy": "allow", "format": "re"}]}),
    add(**{"qom-type": "authz-list", "id": "l2",
           "rules": [{"match": "fred", "policy": "allow", "x": 1}]}),
    add(**{"qom-type": "authz-list", "id": "l2", "rules": [5]}),
    add(**{"qom-type": "authz-list", "id": "l2", "rules": {"a": 1}}),
    add(**{"qom-type": "authz-list", "id": "l2", "policy": "maybe"}),
    qlist("a0"), qget("a0", "identity"), qset("a0", "identity", "alice"),
    qget("a0", "identity"), qlist("l0"), qget("l0", "rules"),
    qget("l0", "policy"), qget("l1", "rules"), qget("l1", "policy"),
    qset("l1", "rules", [{"match": "a", "policy": "deny"}]),
    qget("l1", "rules"), qset("l1", "policy", "allow"), qget("l1", "policy"),
    qset("l0", "rules", [{"match": "a"}]),
    # TLS credentials
    add(**{"qom-type": "tls-creds-psk", "id": "p0", "dir": top + "/psk",
           "endpoint": "server"}),
    qlist("p0"), qget("p0", "dir"), qget("p0", "priority"),
    qget("p0", "username"), qget("p0", "endpoint"), qget("p0", "verify-peer"),
    qget("p0", "loaded"), qset("p0", "dir", "/x"), qget("p0", "dir"),
    qset("p0", "loaded", False),
    add(**{"qom-type": "tls-creds-psk", "id": "p1", "dir": top + "/psk",
           "endpoint": "server", "username": "alice"}),
    # the container after all this, and deletion
    qlist("/objects"),
    delete("s0"), delete("s0"), delete("nope"),
    {"execute": "object-del"},
    add(**{"qom-type": "secret", "id": "objects", "data": "x"}),
    qlist("objects"),
    delete("objects"), delete("t0"), delete("t1"), delete("l0"),
    delete("p0"), qlist("/objects"),
    {"execute": "quit"},
]

def session(d):
    s = socket.socket(socket.AF_UNIX)
    for _ in range(200):
        try:
            s.connect(d + "/qmp.sock")
            break
        except OSError:
            time.sleep(0.05)
    s.settimeout(30)
    f = s.makefile("rb", buffering=0)
    json.loads(f.readline())
    out = []
    for req in SEQ:
        s.sendall(json.dumps(req).encode() + b"\n")
        while True:
            r = json.loads(f.readline())
            if "event" not in r:
                break
        out.append(r)
    s.close()
    return out

def norm(req, answer):
    """qom-list answers are sets: QEMU lists in hash order."""
    r = answer.get("return")
    if req.get("execute") == "qom-list" and isinstance(r, list):
        return sorted(json.dumps(x, sort_keys=True) for x in r)
    return answer

q = session(top + "/qemu")
v = session(top + "/vdisk")
problems = []
for req, aq, av in zip(SEQ, q, v):
    label = json.dumps(req)[:150]
    if norm(req, aq) != norm(req, av):
        problems.append("%s\n  qemu:  %s\n  vdisk: %s" % (label, aq, av))
for p in problems:
    print("DIFF:", p)
print("%d requests, %d differences" % (len(SEQ), len(problems)))
sys.exit(1 if problems else 0)
PYEOF
st=0
wait "$vd" || st=$?
[ "$st" = 0 ] || fail "vdisk serve exited with status $st: $(cat vd.log)"

# Types QEMU has and vdisk does not are refused by name over QMP too.
timeout 100 "$VDISK" serve \
    --chardev "socket,id=m,path=$PWD/vdisk/qmp2.sock,server=on,wait=off" \
    --monitor chardev=m > vd2.log 2>&1 &
vd=$!
cleanup_fn sh -c "kill $vd 2>/dev/null; true"
timeout 60 python3 - "$PWD/vdisk/qmp2.sock" <<'PYEOF' || fail "unsupported types"
import json, socket, sys, time
s = socket.socket(socket.AF_UNIX)
for _ in range(200):
    try:
        s.connect(sys.argv[1])
        break
    except OSError:
        time.sleep(0.05)
f = s.makefile("rb", buffering=0)
f.readline()
def cmd(c):
    s.sendall(json.dumps(c).encode() + b"\n")
    return json.loads(f.readline())
cmd({"execute": "qmp_capabilities"})
bad = 0
for t in ("iothread", "main-loop", "memory-backend-ram", "tls-creds-anon"):
    r = cmd({"execute": "object-add", "arguments": {"qom-type": t, "id": "x"}})
    want = "object type '%s' is not supported by vdisk" % t
    if r.get("error", {}).get("desc") != want:
        print("%s: %s" % (t, r))
        bad += 1
cmd({"execute": "quit"})
sys.exit(1 if bad else 0)
PYEOF
wait "$vd" || fail "vdisk serve failed: $(cat vd2.log)"
