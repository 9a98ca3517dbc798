#!/usr/bin/env bash
# vdisk serve with TLS (--object tls-creds-x509/psk, --tls-creds): qemu-img
# and qemu-io read and write through X.509 (client certificate checked)
# and PSK, nbdinfo/nbdcopy over nbds://, parallel writes from qemu-img
# convert; plaintext clients, clients without a certificate and clients
# with a wrong key are refused; STARTTLS rules checked with a raw client.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io python3 timeout certtool
tmpdir

T="timeout 60"

free_port()
{
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

stop_server()
{
    local pid i
    [ -s "$1" ] || return 0
    pid=$(cat "$1")
    kill "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null
    return 1
}

# start_server PIDFILE ARGS...
start_server()
{
    local pidfile=$1
    shift
    $T "$VDISK" serve --fork --pid-file "$PWD/$pidfile" -t -b 127.0.0.1 "$@"
    [ -s "$pidfile" ] || fail "no pid file after --fork"
    cleanup_fn stop_server "$pidfile"
}

# ---- credentials, made fresh for this run ----
mkdir srv cli nocert psk badpsk
cat > ca.info <<'EOF'
cn = vdisk test CA
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
cp srv/ca-cert.pem nocert/
gen --generate-privkey --outfile cli/client-key.pem
gen --generate-certificate --load-ca-certificate srv/ca-cert.pem \
    --load-ca-privkey ca-key.pem --load-privkey cli/client-key.pem \
    --template client.info --outfile cli/client-cert.pem
# A client certificate the server's CA did not sign.
mkdir rogue
printf 'cn = rogue\ntls_www_client\nsigning_key\nexpiration_days = 2\n' \
    > rogue.info
gen --generate-privkey --outfile rogue/client-key.pem
gen --generate-self-signed --load-privkey rogue/client-key.pem \
    --template rogue.info --outfile rogue/client-cert.pem
key=$(python3 -c 'import os; print(os.urandom(32).hex())')
echo "qemu:$key" > psk/keys.psk
echo "qemu:$(python3 -c 'import os; print(os.urandom(32).hex())')" \
    > badpsk/keys.psk

$QEMU_IMG create -q -f qcow2 img.qcow2 64M
$QEMU_IO -c 'write -P 0xab 1M 1M' -c 'write -P 0xcd 10M 64k' img.qcow2 \
    >/dev/null
cp img.qcow2 orig.qcow2

# Skip while the command line has no TLS options or gnutls is missing.
probe=0
"$VDISK" serve --tls-creds=none img.qcow2 > probe.err 2>&1 || probe=$?
if grep -q 'unrecognized option\|not compiled in' probe.err; then
    echo "$0: test skipped because vdisk serve has no TLS support"
    exit 77
fi
grep -q "No TLS credentials with id 'none'" probe.err ||
    fail "unexpected answer to an unknown --tls-creds: $(cat probe.err)"

# Bad credential directories fail at start-up, naming the file.
expect_status 1 "$VDISK" serve --object \
    "tls-creds-x509,id=t,endpoint=server,dir=$PWD/cli" --tls-creds t \
    img.qcow2 2> bad.err
grep -q "cli/server-cert.pem: cannot read TLS credentials" bad.err ||
    fail "missing server certificate not reported: $(cat bad.err)"
expect_status 1 "$VDISK" serve --object "tls-creds-psk,id=t,dir=$PWD/psk" \
    --tls-creds t img.qcow2 2> bad.err
grep -q "server endpoint" bad.err ||
    fail "client-endpoint credentials accepted: $(cat bad.err)"

# ---- X.509, client certificates required (verify-peer defaults on) ----
port=$(free_port)
start_server pid1 -p "$port" -f qcow2 \
    --object "tls-creds-x509,id=tls0,endpoint=server,dir=$PWD/srv" \
    --tls-creds tls0 img.qcow2 2> srv1.err
X509="--object tls-creds-x509,id=tls0,dir=$PWD/cli,endpoint=client"
N="driver=nbd,host=127.0.0.1,port=$port,tls-creds=tls0"

# shellcheck disable=SC2086
$T $QEMU_IMG info $X509 --image-opts "$N" > info.out
grep -q '67108864 bytes' info.out || fail "wrong size through TLS"
# shellcheck disable=SC2086
$T $QEMU_IO $X509 --image-opts "$N" -c 'read -P 0xab 1M 1M' \
    -c 'read -P 0xcd 10M 64k' -c 'read -P 0 0 1M' \
    -c 'write -P 0x11 20M 3M' -c 'write -P 0x22 30000 777' \
    -c 'write -z 1M 64k' -c 'flush' -c 'read -P 0x11 20M 3M' > io.out
grep -qi 'fail\|error' io.out && fail "I/O through X.509 TLS failed"
$QEMU_IO -c 'write -P 0x11 20M 3M' -c 'write -P 0x22 30000 777' \
    -c 'write -z 1M 64k' orig.qcow2 >/dev/null
# shellcheck disable=SC2086
$T $QEMU_IMG compare $X509 --image-opts "$N" \
    "driver=qcow2,file.filename=orig.qcow2"

# Many requests in flight on one TLS session: replies from the workers
# interleave with the reader's receiving.
head -c 16M /dev/urandom > rand.raw
# shellcheck disable=SC2086
$T $QEMU_IMG convert -n -W -m 16 -f raw rand.raw $X509 \
    --target-image-opts "$N"
$QEMU_IMG convert -n -f raw -O qcow2 rand.raw orig.qcow2
# shellcheck disable=SC2086
$T $QEMU_IMG convert $X509 --image-opts "$N" -O qcow2 back.qcow2
assert_same_content -f qcow2 -F qcow2 back.qcow2 orig.qcow2

# Plaintext clients get QEMU's "TLS required" error.
st=0
$T $QEMU_IO -f raw -c 'read 0 4k' "nbd://127.0.0.1:$port" \
    > plain.out 2>&1 || st=$?
[ "$st" = 1 ] || fail "plaintext client: status $st"
grep -q 'TLS negotiation required before option' plain.out ||
    fail "plaintext client not told TLS is required: $(cat plain.out)"

# A client without a certificate fails the handshake.
st=0
# shellcheck disable=SC2086
$T $QEMU_IMG info --object \
    "tls-creds-x509,id=tls0,dir=$PWD/nocert,endpoint=client" \
    --image-opts "$N" > nocert.out 2>&1 || st=$?
[ "$st" = 1 ] || fail "client without certificate: status $st"

# STARTTLS rules, with a raw client (Python's ssl for the upgrade).
cat > raw.py <<'EOF'
import os, socket, ssl, struct, sys

port, d, rogue = int(sys.argv[1]), sys.argv[2], sys.argv[3]
INIT, OPTS, REPM = 0x4e42444d41474943, 0x49484156454F5054, 0x3e889045565a9
STARTTLS, GO, ABORT, EXPORT_NAME, LIST = 5, 7, 2, 1, 3
ACK, INFO, TLS_REQD, INVALID = 1, 3, 0x80000005, 0x80000003

def check(cond, what):
    if not cond:
        print("FAIL:", what, file=sys.stderr)
        sys.exit(1)

def recvn(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError("closed after %d of %d bytes" % (len(b), n))
        b += c
    return b

def hello():
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    m1, m2, _ = struct.unpack(">QQH", recvn(s, 18))
    check(m1 == INIT and m2 == OPTS, "greeting")
    s.sendall(struct.pack(">I", 3))
    return s

def opt(s, o, data=b""):
    s.sendall(struct.pack(">QII", OPTS, o, len(data)) + data)

def reply(s):
    m, o, t, n = struct.unpack(">QIII", recvn(s, 20))
    check(m == REPM, "reply magic")
    return o, t, recvn(s, n)

def go(s):
    opt(s, GO, struct.pack(">IH", 0, 0))
    while True:
        o, t, _ = reply(s)
        if t != INFO:
            return t

s = hello()
for o in (GO, LIST, 42):
    opt(s, o, struct.pack(">IH", 0, 0) if o == GO else b"")
    check(reply(s)[1] == TLS_REQD, "option %d before TLS" % o)
opt(s, STARTTLS, b"x")
check(reply(s)[1] == INVALID, "STARTTLS with data")
opt(s, STARTTLS)
check(reply(s)[1] == ACK, "STARTTLS")
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(d + "/ca-cert.pem")
ctx.load_cert_chain(d + "/client-cert.pem", d + "/client-key.pem")
t = ctx.wrap_socket(s, server_hostname="localhost")
opt(t, STARTTLS)
check(reply(t)[1] == INVALID, "second STARTTLS")
check(go(t) == ACK, "GO over TLS")
# One read (20M holds 0x11 by now), then a clean disconnect.
t.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 7, 20 << 20, 8))
m, e, c = struct.unpack(">IIQ", recvn(t, 16))
check(m == 0x67446698 and e == 0 and c == 7, "read reply")
check(recvn(t, 8) == b"\x11" * 8, "read data")
t.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 8, 0, 0))
t.close()

# Regression: gnutls invalidated the session when the client half-closed
# without close_notify, so replies still owed were dropped. 96 MiB of
# reads exceed the server's 64 MiB in-flight budget, so it sees the end
# of stream while replies are still going out.
s = hello()
opt(s, STARTTLS)
check(reply(s)[1] == ACK, "STARTTLS")
t = ctx.wrap_socket(s, server_hostname="localhost")
check(go(t) == ACK, "GO over TLS")
N = 24
t.sendall(b"".join(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, 0, 4 << 20)
                   for i in range(N)))
socket.socket(fileno=os.dup(t.fileno())).shutdown(socket.SHUT_WR)
for i in range(N):
    m, e, c = struct.unpack(">IIQ", recvn(t, 16))
    check(m == 0x67446698 and e == 0, "read reply %d after half-close" % i)
    recvn(t, 4 << 20)
t.close()

# A certificate from another CA: the server hangs up after the handshake.
s = hello()
opt(s, STARTTLS)
check(reply(s)[1] == ACK, "STARTTLS")
rctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
rctx.load_verify_locations(d + "/ca-cert.pem")
rctx.load_cert_chain(rogue + "/client-cert.pem", rogue + "/client-key.pem")
try:
    t = rctx.wrap_socket(s, server_hostname="localhost")
    opt(t, LIST)
    reply(t)
    check(False, "untrusted client certificate accepted")
except (ssl.SSLError, EOFError, ConnectionResetError):
    pass

# EXPORT_NAME cannot be refused: the server hangs up.
s = hello()
opt(s, EXPORT_NAME)
try:
    check(s.recv(1) == b"", "EXPORT_NAME before TLS not refused")
except ConnectionResetError:
    pass

# ABORT is still allowed before TLS.
s = hello()
opt(s, ABORT)
o, t, _ = reply(s)
check(t == ACK, "ABORT before TLS")
EOF
$T python3 raw.py "$port" "$PWD/cli" "$PWD/rogue"
grep -q 'client certificate rejected: .*issuer is unknown$' srv1.err ||
    fail "untrusted certificate not reported: $(cat srv1.err)"

# The server still serves after all that.
# shellcheck disable=SC2086
$T $QEMU_IO $X509 --image-opts "$N" -c 'read -P 0x11 20M 4k' > io.out
grep -q 'Pattern verification failed' io.out && fail "read back wrong data"
stop_server pid1 || fail "server did not stop on SIGTERM"

# ---- X.509 without client certificates (verify-peer=off) ----
port=$(free_port)
start_server pid2 -p "$port" -f qcow2 --object \
    "tls-creds-x509,id=tls0,endpoint=server,dir=$PWD/srv,verify-peer=off" \
    --tls-creds tls0 img.qcow2
# shellcheck disable=SC2086
$T $QEMU_IO --object "tls-creds-x509,id=tls0,dir=$PWD/nocert,endpoint=client" \
    --image-opts "driver=nbd,host=127.0.0.1,port=$port,tls-creds=tls0" \
    -c 'read -P 0x11 20M 1M' > io.out
grep -q 'Pattern verification failed' io.out && fail "read back wrong data"
stop_server pid2 || fail "server did not stop on SIGTERM"

# ---- PSK ----
port=$(free_port)
start_server pid3 -p "$port" -f qcow2 \
    --object "tls-creds-psk,id=tls0,endpoint=server,dir=$PWD/psk" \
    --tls-creds tls0 img.qcow2
N="driver=nbd,host=127.0.0.1,port=$port,tls-creds=tls0"
PSK="--object tls-creds-psk,id=tls0,dir=$PWD/psk,endpoint=client,username=qemu"

# shellcheck disable=SC2086
$T $QEMU_IO $PSK --image-opts "$N" -c 'read -P 0x11 20M 1M' \
    -c 'write -P 0x33 40M 1M' -c 'read -P 0x33 40M 1M' > io.out
grep -qi 'fail\|error' io.out && fail "I/O through PSK TLS failed"
$QEMU_IO -c 'write -P 0x33 40M 1M' orig.qcow2 >/dev/null
# shellcheck disable=SC2086
$T $QEMU_IMG compare $PSK --image-opts "$N" \
    "driver=qcow2,file.filename=orig.qcow2"

# A wrong key and an unknown user both fail.
st=0
$T $QEMU_IO --object \
    "tls-creds-psk,id=tls0,dir=$PWD/badpsk,endpoint=client,username=qemu" \
    --image-opts "$N" -c 'read 0 4k' > badpsk.out 2>&1 || st=$?
[ "$st" = 1 ] || fail "wrong PSK: status $st"
grep -q 'TLS handshake failed' badpsk.out ||
    fail "wrong PSK: $(cat badpsk.out)"
echo "other:$key" > badpsk/keys.psk
st=0
$T $QEMU_IO --object \
    "tls-creds-psk,id=tls0,dir=$PWD/badpsk,endpoint=client,username=other" \
    --image-opts "$N" -c 'read 0 4k' > baduser.out 2>&1 || st=$?
[ "$st" = 1 ] || fail "unknown PSK user: status $st"

# Many small requests in flight at once: the server takes those it has
# already received in batches and answers each batch in one TLS write.
aio=() plain=()
for i in $(seq 0 47); do
    aio+=(-c "aio_write -P $((i + 1)) $((48 * 1024 + i * 12))k 4k")
    plain+=(-c "write -P $((i + 1)) $((48 * 1024 + i * 12))k 4k")
done
aio+=(-c aio_flush)
for i in $(seq 0 47); do
    aio+=(-c "aio_read -P $((i + 1)) $((48 * 1024 + i * 12))k 4k")
done
aio+=(-c aio_flush)
# shellcheck disable=SC2086
$T $QEMU_IO $PSK --image-opts "$N" "${aio[@]}" > aio.out 2>&1
grep -qi 'fail\|error' aio.out && fail "pipelined TLS I/O: $(cat aio.out)"
[ "$(grep -c '^read 4096/4096' aio.out)" = 48 ] ||
    fail "pipelined TLS reads: $(cat aio.out)"
$QEMU_IO "${plain[@]}" orig.qcow2 >/dev/null

# libnbd's nbds:// URIs.
if command -v nbdinfo >/dev/null; then
    U="nbds://qemu@127.0.0.1:$port/?tls-psk-file=$PWD/psk/keys.psk"
    $T nbdinfo "$U" > nbdinfo.out
    grep -q 'with TLS' nbdinfo.out || fail "nbdinfo did not use TLS"
    grep -q 'export-size: 67108864' nbdinfo.out || fail "nbdinfo size"
    if command -v nbdcopy >/dev/null; then
        $T nbdcopy "$U" copy.raw
        $QEMU_IMG convert -f qcow2 -O raw orig.qcow2 orig.raw
        cmp copy.raw orig.raw || fail "nbdcopy over TLS copied wrong data"
    fi
fi
stop_server pid3 || fail "server did not stop on SIGTERM"
assert_same_content -f qcow2 -F qcow2 img.qcow2 orig.qcow2
