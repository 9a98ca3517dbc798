#!/usr/bin/env bash
# TLS in the storage-daemon form of vdisk serve: QMP object-add/object-del
# and nbd-server-start with tls-creds (X.509 clients from qemu-img,
# qemu-io and nbdinfo; plaintext clients refused; a plain server after
# nbd-server-stop), the same commands' answers compared in shape and
# error class with qemu-storage-daemon's, and the command line
# --object tls-creds-psk ... --nbd-server ...,tls-creds=ID with PSK clients.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-storage-daemon python3 timeout certtool
tmpdir

T="timeout 60"

free_port()
{
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ---- credentials, made fresh for this run ----
mkdir srv cli psk
cat > ca.info <<'EOF'
cn = vdisk qmp-tls CA
ca
cert_signing_key
expiration_days = 2
EOF
cat > server.info <<'EOF'
organization = vdisk test
cn = localhost
dns_name = localhost
ip_address = 127.0.0.1
tls_www_server
encryption_key
signing_key
expiration_days = 2
EOF
cat > client.info <<'EOF'
organization = vdisk test
cn = client
tls_www_client
encryption_key
signing_key
expiration_days = 2
EOF
gen() { certtool "$@" >/dev/null 2>&1 || fail "certtool $*"; }
gen --generate-privkey --outfile ca-key.pem
gen --generate-self-signed --load-privkey ca-key.pem --template ca.info \
    --outfile srv/ca-cert.pem
gen --generate-privkey --outfile srv/server-key.pem
gen --generate-certificate --load-ca-certificate srv/ca-cert.pem \
    --load-ca-privkey ca-key.pem --load-privkey srv/server-key.pem \
    --template server.info --outfile srv/server-cert.pem
cp srv/ca-cert.pem cli/
gen --generate-privkey --outfile cli/client-key.pem
gen --generate-certificate --load-ca-certificate srv/ca-cert.pem \
    --load-ca-privkey ca-key.pem --load-privkey cli/client-key.pem \
    --template client.info --outfile cli/client-cert.pem
echo "qemu:$(python3 -c 'import os; print(os.urandom(32).hex())')" \
    > psk/keys.psk

$QEMU_IMG create -q -f qcow2 img.qcow2 16M
$QEMU_IO -c 'write -P 0x5a 1M 64k' img.qcow2 >/dev/null
cp img.qcow2 ref.qcow2

# Skip where vdisk was built without gnutls.
probe=0
"$VDISK" serve --object "tls-creds-psk,id=p,endpoint=server,dir=$PWD/psk" \
    --tls-creds=p --help > probe.out 2>&1 || probe=$?
if grep -q 'not compiled in' probe.out; then
    echo "$0: test skipped because vdisk has no TLS support"
    exit 77
fi

# A QMP client: `qmp.py SOCKET` reads lines "ok JSON" or "err JSON" and
# fails unless each reply is a return or an error as announced; error
# descriptions are printed for the log.
cat > qmp.py <<'EOF'
import json, socket, sys, time
s = socket.socket(socket.AF_UNIX)
for _ in range(200):
    try:
        s.connect(sys.argv[1])
        break
    except OSError:
        time.sleep(0.05)
s.settimeout(30)
f = s.makefile("rb", buffering=0)
json.loads(f.readline())
bad = 0
for line in ["ok {\"execute\": \"qmp_capabilities\"}"] + sys.stdin.read().splitlines():
    if not line.strip():
        continue
    want, req = line.split(" ", 1)
    s.sendall(req.encode() + b"\n")
    while True:
        r = json.loads(f.readline())
        if "event" not in r:
            break
    got = "ok" if "return" in r else "err"
    print(got, req[:100], json.dumps(r.get("error", "")))
    if got != want:
        print("  ^ expected", want, file=sys.stderr)
        bad = 1
sys.exit(bad)
EOF

# ---- QMP: object-add, nbd-server-start with X.509, clients ----
port=$(free_port)
timeout 120 "$VDISK" serve \
    --chardev "socket,id=m,path=$PWD/qmp.sock,server=on,wait=off" \
    --monitor chardev=m --pidfile "$PWD/vd.pid" > vd.log 2>&1 &
vd=$!
cleanup_fn sh -c "kill $vd 2>/dev/null; true"

D=$PWD
$T python3 qmp.py qmp.sock <<EOF || fail "QMP set-up refused"
ok {"execute": "object-add", "arguments": {"qom-type": "tls-creds-x509", "id": "tls0", "dir": "$D/srv", "endpoint": "server"}}
err {"execute": "nbd-server-start", "arguments": {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "$port"}}, "tls-creds": "tls0", "tls-authz": "authz0"}}
ok {"execute": "nbd-server-start", "arguments": {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "$port"}}, "tls-creds": "tls0"}}
ok {"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "disk", "file": {"driver": "file", "filename": "$D/img.qcow2"}}}
ok {"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "disk", "name": "disk", "writable": true}}
EOF

X509="--object tls-creds-x509,id=c0,dir=$PWD/cli,endpoint=client"
N="driver=nbd,host=127.0.0.1,port=$port,export=disk,tls-creds=c0"
# shellcheck disable=SC2086
$T $QEMU_IMG info $X509 --image-opts "$N" > info.out
grep -q '16 MiB' info.out || fail "wrong size through TLS: $(cat info.out)"
# shellcheck disable=SC2086
$T $QEMU_IO $X509 --image-opts "$N" -c 'read -P 0x5a 1M 64k' \
    -c 'write -P 0x33 4M 1M' -c 'flush' -c 'read -P 0x33 4M 1M' > io.out
grep -qi 'fail\|error' io.out && fail "I/O through TLS failed: $(cat io.out)"
$QEMU_IO -c 'write -P 0x33 4M 1M' ref.qcow2 >/dev/null
# shellcheck disable=SC2086
$T $QEMU_IMG compare $X509 --image-opts "$N" "driver=qcow2,file.filename=ref.qcow2" ||
    fail "the image seen through TLS differs from the reference"

if command -v nbdinfo >/dev/null; then
    $T nbdinfo "nbds://127.0.0.1:$port/disk?tls-certificates=$PWD/cli" \
        > nbdinfo.out || fail "nbdinfo over X.509 failed"
    grep -q 'export-size: 16777216' nbdinfo.out ||
        fail "nbdinfo size: $(cat nbdinfo.out)"
fi

# A plaintext client learns nothing.
st=0
$T $QEMU_IMG info "nbd://127.0.0.1:$port/disk" > plain.out 2>&1 || st=$?
[ "$st" = 1 ] || fail "plaintext client got status $st: $(cat plain.out)"
grep -q 'TLS negotiation required' plain.out ||
    fail "plaintext client not refused for TLS: $(cat plain.out)"

# Deleting the object leaves the running server's credentials alone (as
# in QEMU); nbd-server-stop forgets them, so a plain server can follow,
# and a new TLS server cannot use the deleted object.
$T python3 qmp.py qmp.sock <<EOF || fail "QMP object-del/restart refused"
ok {"execute": "object-del", "arguments": {"id": "tls0"}}
err {"execute": "object-del", "arguments": {"id": "tls0"}}
EOF
# shellcheck disable=SC2086
$T $QEMU_IO $X509 --image-opts "$N" -c 'read -P 0x33 4M 1M' > io2.out
grep -qi 'fail\|error' io2.out && fail "TLS after object-del: $(cat io2.out)"
$T python3 qmp.py qmp.sock <<EOF || fail "QMP plain restart refused"
ok {"execute": "nbd-server-stop"}
err {"execute": "nbd-server-start", "arguments": {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "$port"}}, "tls-creds": "tls0"}}
ok {"execute": "nbd-server-start", "arguments": {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "$port"}}}}
ok {"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "disk", "name": "disk"}}
EOF
$T $QEMU_IO -r -c 'read -P 0x33 4M 1M' "nbd://127.0.0.1:$port/disk" \
    > plain2.out
grep -qi 'fail\|error' plain2.out &&
    fail "plain server after nbd-server-stop: $(cat plain2.out)"
$T python3 qmp.py qmp.sock <<<'ok {"execute": "quit"}' || fail "quit"
st=0
wait "$vd" || st=$?
[ "$st" = 0 ] || fail "vdisk serve exited with status $st: $(cat vd.log)"

# ---- the same commands against qemu-storage-daemon ----
mkdir qemu vdisk
timeout 100 qemu-storage-daemon \
    --chardev "socket,id=m,path=$PWD/qemu/qmp.sock,server=on,wait=off" \
    --monitor chardev=m > qsd.log 2>&1 &
qsd=$!
cleanup_fn sh -c "kill $qsd 2>/dev/null; true"
timeout 100 "$VDISK" serve \
    --chardev "socket,id=m,path=$PWD/vdisk/qmp.sock,server=on,wait=off" \
    --monitor chardev=m > vd2.log 2>&1 &
vd=$!
cleanup_fn sh -c "kill $vd 2>/dev/null; true"

timeout 100 python3 - "$PWD" <<'PYEOF' || fail "answers differ from qemu-storage-daemon"
import json, socket, sys, time

top = sys.argv[1]
# @T@ is the test directory, @D@ each side's own.
X = '"qom-type": "tls-creds-x509"'
P = '"qom-type": "tls-creds-psk"'
SEQ = [
    '{"execute": "qmp_capabilities"}',
    '{"execute": "object-add", "arguments": {%s, "id": "t0", "dir": "@T@/srv", "endpoint": "server"}}' % X,
    '{"execute": "object-add", "arguments": {%s, "id": "t0", "dir": "@T@/srv", "endpoint": "server"}}' % X,
    '{"execute": "object-add", "arguments": {%s, "id": "t1", "dir": "@T@/nope", "endpoint": "server"}}' % X,
    '{"execute": "object-add", "arguments": {%s, "id": "t2", "endpoint": "server"}}' % X,
    '{"execute": "object-add", "arguments": {"qom-type": "no-such", "id": "t3"}}',
    '{"execute": "object-add", "arguments": {%s}}' % X,
    '{"execute": "object-add", "arguments": {"id": "t4"}}',
    '{"execute": "object-add", "arguments": {%s, "id": "t5", "dir": "@T@/srv", "endpoint": "middle"}}' % X,
    '{"execute": "object-add", "arguments": {%s, "id": "t6", "dir": "@T@/srv", "endpoint": "server", "junk": 1}}' % X,
    '{"execute": "object-add", "arguments": {%s, "id": "t7", "dir": "@T@/srv", "endpoint": "server", "verify-peer": "no"}}' % X,
    '{"execute": "object-add", "arguments": {%s, "id": "a b", "dir": "@T@/srv", "endpoint": "server"}}' % X,
    '{"execute": "object-add", "arguments": {%s, "id": "t8", "dir": "@T@/srv", "endpoint": "server", "loaded": true}}' % X,
    '{"execute": "object-add", "arguments": {%s, "id": "t9", "dir": "@T@/srv", "endpoint": "server", "verify-peer": false, "sanity-check": true, "priority": "NORMAL"}}' % X,
    '{"execute": "object-add", "arguments": {%s, "id": "c0", "dir": "@T@/cli", "endpoint": "client"}}' % X,
    '{"execute": "object-add", "arguments": {%s, "id": "p0", "dir": "@T@/psk", "endpoint": "server"}}' % P,
    '{"execute": "object-add", "arguments": {%s, "id": "p1", "dir": "@T@/psk", "endpoint": "server", "username": "qemu"}}' % P,
    '{"execute": "object-add", "arguments": {%s, "id": "p2", "dir": "@T@/nope", "endpoint": "server"}}' % P,
    '{"execute": "object-del"}',
    '{"execute": "object-del", "arguments": {"id": "nope"}}',
    '{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "@D@/nbd.sock"}}, "tls-creds": "nope"}}',
    '{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "@D@/nbd.sock"}}, "tls-creds": "c0"}}',
    '{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "@D@/nbd.sock"}}, "tls-creds": 5}}',
    '{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "@D@/nbd.sock"}}, "tls-creds": "t0"}}',
    '{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "@D@/nbd2.sock"}}, "tls-creds": "p0"}}',
    '{"execute": "object-del", "arguments": {"id": "t0"}}',
    '{"execute": "object-add", "arguments": {%s, "id": "t0", "dir": "@T@/srv", "endpoint": "server"}}' % X,
    '{"execute": "object-del", "arguments": {"id": "p0"}}',
    '{"execute": "nbd-server-stop"}',
    '{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "@D@/nbd.sock"}}}}',
    '{"execute": "nbd-server-stop"}',
    '{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "@D@/nbd.sock"}}, "tls-creds": "p0"}}',
    '{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "@D@/nbd.sock"}}, "tls-creds": "t0"}}',
    '{"execute": "nbd-server-stop"}',
    '{"execute": "object-del", "arguments": {"id": "t0"}}',
    '{"execute": "object-del", "arguments": {"id": "t9"}}',
    '{"execute": "object-del", "arguments": {"id": "c0"}}',
    '{"execute": "query-commands"}',
    '{"execute": "quit"}',
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
        s.sendall(req.replace("@T@", top).replace("@D@", d).encode() + b"\n")
        while True:
            r = json.loads(f.readline())
            if "event" not in r:
                break
        out.append(r)
    s.close()
    return out

def shape(x):
    if isinstance(x, dict):
        return {k: shape(v) for k, v in x.items()}
    if isinstance(x, list):
        return ["list"]
    return type(x).__name__

q = session(top + "/qemu")
v = session(top + "/vdisk")
problems = []
for req, aq, av in zip(SEQ, q, v):
    label = req[:110]
    print(label, "\n  qemu: ", aq if "error" in aq else "ok",
          "\n  vdisk:", av if "error" in av else "ok")
    if req == '{"execute": "query-commands"}':
        names = {c["name"] for c in av["return"]}
        for c in ("object-add", "object-del"):
            if c not in names:
                problems.append("query-commands lacks " + c)
        continue
    if ("error" in aq) != ("error" in av):
        problems.append("%s: qemu %s, vdisk %s" % (label, aq, av))
    elif "error" in aq:
        if aq["error"]["class"] != av["error"]["class"]:
            problems.append("%s: error class %s vs %s" %
                            (label, aq["error"], av["error"]))
    elif shape(aq) != shape(av):
        problems.append("%s: shape %s vs %s" % (label, aq, av))
for p in problems:
    print("DIFF:", p)
sys.exit(1 if problems else 0)
PYEOF
st=0
wait "$vd" || st=$?
[ "$st" = 0 ] || fail "vdisk serve exited with status $st: $(cat vd2.log)"

# ---- the command line: --object, --nbd-server ...,tls-creds=ID ----
expect_status 1 $T "$VDISK" serve \
    --blockdev "driver=file,node-name=f,filename=$PWD/img.qcow2" \
    --nbd-server "addr.type=unix,addr.path=$PWD/nbd.sock,tls-creds=nope" \
    2> nope.err
grep -q "No TLS credentials with id 'nope'" nope.err ||
    fail "unknown tls-creds not reported: $(cat nope.err)"
expect_status 1 $T "$VDISK" serve \
    --object "tls-creds-psk,id=p0,endpoint=server,dir=$PWD/psk" \
    --tls-creds p0 \
    --blockdev "driver=file,node-name=f,filename=$PWD/img.qcow2" \
    --nbd-server "addr.type=unix,addr.path=$PWD/nbd.sock" 2> mix.err
grep -q "tls-creds=ID" mix.err ||
    fail "--tls-creds with the daemon form not refused: $(cat mix.err)"

timeout 120 "$VDISK" serve \
    --object "tls-creds-psk,id=p0,endpoint=server,dir=$PWD/psk" \
    --blockdev "driver=file,node-name=f,filename=$PWD/img.qcow2" \
    --blockdev driver=qcow2,node-name=q,file=f \
    --nbd-server "addr.type=unix,addr.path=$PWD/nbd.sock,tls-creds=p0" \
    --export type=nbd,id=e,node-name=q,name=disk,writable=on \
    --qmp "unix:$PWD/qmp3.sock,server=on,wait=off" \
    --pidfile "$PWD/vd3.pid" > vd3.log 2>&1 &
vd=$!
cleanup_fn sh -c "kill $vd 2>/dev/null; true"
for ((i = 0; i < 100; i++)); do
    [ -s vd3.pid ] && break
    kill -0 "$vd" 2>/dev/null || fail "daemon died: $(cat vd3.log)"
    sleep 0.1
done
[ -s vd3.pid ] || fail "no pid file from the daemon"

PSK="--object tls-creds-psk,id=c0,dir=$PWD/psk,username=qemu,endpoint=client"
NP="driver=nbd,server.type=unix,server.path=$PWD/nbd.sock,export=disk,tls-creds=c0"
# shellcheck disable=SC2086
$T $QEMU_IO $PSK --image-opts "$NP" -c 'read -P 0x33 4M 1M' \
    -c 'write -P 0x44 8M 64k' -c 'read -P 0x44 8M 64k' > psk.out
grep -qi 'fail\|error' psk.out && fail "I/O over PSK failed: $(cat psk.out)"
$QEMU_IO -c 'write -P 0x44 8M 64k' ref.qcow2 >/dev/null
# shellcheck disable=SC2086
$T $QEMU_IMG compare $PSK --image-opts "$NP" "driver=qcow2,file.filename=ref.qcow2" ||
    fail "the image seen over PSK differs from the reference"
if command -v nbdinfo >/dev/null; then
    $T nbdinfo "nbds+unix://qemu@/disk?socket=$PWD/nbd.sock&tls-psk-file=$PWD/psk/keys.psk" \
        > nbdinfo2.out || fail "nbdinfo over PSK failed"
    grep -q 'with TLS' nbdinfo2.out || fail "nbdinfo did not use TLS"
fi
st=0
$T $QEMU_IMG info "nbd+unix:///disk?socket=$PWD/nbd.sock" > plain3.out 2>&1 ||
    st=$?
[ "$st" = 1 ] || fail "plaintext client got status $st: $(cat plain3.out)"
grep -q 'TLS negotiation required' plain3.out ||
    fail "plaintext client not refused for TLS: $(cat plain3.out)"

$T python3 qmp.py qmp3.sock <<<'ok {"execute": "quit"}' || fail "quit"
st=0
wait "$vd" || st=$?
[ "$st" = 0 ] || fail "vdisk serve exited with status $st: $(cat vd3.log)"
exit 0
