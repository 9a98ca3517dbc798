#!/usr/bin/env bash
# The nbd client driver against nbdkit's memory and file plugins, in
# plain text and with TLS (nbdkit --tls=require, X.509 credentials made
# by certtool for the run, handed to vdisk as QEMU takes them: --object
# tls-creds-x509,endpoint=client and tls-creds=ID): vdisk writes, qemu-img
# reads back (and the other way round), map and convert agree with
# qemu-img's; a client without TLS, or trusting another CA, is refused
# with a clear error.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/nbd-servers.bash"
source "$(dirname "$0")/tls-functions.bash"
requires qemu-img qemu-io nbdkit certtool python3 timeout
tmpdir

T="timeout 60"
nbds_requires_client

# write_and_check URI OPTS...: vdisk writes a pattern, zeros and a
# discard; qemu-io checks them; qemu-io writes, vdisk reads; map and
# convert as qemu-img's.
write_and_check()
{
    local what=$1
    shift
    $T "$VDISK" io "$@" -c 'write -P 0x5a 1M 3M' -c 'write -z 2M 64k' \
        -c 'write -P 0x6b 40M 100k' -c 'write -z -u 50M 1M' -c 'flush' \
        > io.out 2>&1 || fail "$what: vdisk io: $(cat io.out)"
    $T $QEMU_IO "$@" -c 'read -P 0x5a 1M 1M' -c 'read -P 0 2M 64k' \
        -c 'read -P 0x5a 2162688 1M' -c 'read -P 0x6b 40M 100k' \
        -c 'read -P 0 50M 1M' -c 'write -P 0x7c 60M 64k' > qio.out 2>&1
    grep -qi 'fail\|error\|mismatch' qio.out && fail "$what: qemu-io: $(cat qio.out)"
    $T "$VDISK" io "$@" -c 'read -P 0x7c 60M 64k' > io2.out 2>&1 ||
        fail "$what: vdisk read: $(cat io2.out)"
    grep -qi 'fail\|mismatch' io2.out && fail "$what: vdisk read: $(cat io2.out)"
    $T "$VDISK" map --output=json "$@" > v.map || fail "$what: vdisk map"
    $T $QEMU_IMG map --output=json "$@" > q.map
    diff -u q.map v.map || fail "$what: map differs from qemu-img's"
    $T "$VDISK" convert -O raw "$@" v.raw || fail "$what: vdisk convert"
    $T $QEMU_IMG convert -O raw "$@" q.raw
    cmp v.raw q.raw || fail "$what: vdisk convert read other bytes"
    rm -f v.raw q.raw
}

# ---- plain text: memory plugin, file plugin ----
nbds_nbdkit pid1 - memory 64M || fail "nbdkit memory"
write_and_check "memory" -f raw "nbd://127.0.0.1:$NBDS_PORT"
$T "$VDISK" info "nbd://127.0.0.1:$NBDS_PORT" > v.info
$T $QEMU_IMG info "nbd://127.0.0.1:$NBDS_PORT" > q.info
diff -u q.info v.info || fail "info differs on nbdkit memory"
nbds_stop pid1

truncate -s 64M disk.raw
nbds_nbdkit pid2 - file disk.raw || fail "nbdkit file"
write_and_check "file" -f raw "nbd://127.0.0.1:$NBDS_PORT"
nbds_stop pid2
# What vdisk wrote through the server is in the file.
$QEMU_IO -f raw -c 'read -P 0x5a 1M 1M' -c 'read -P 0x7c 60M 64k' disk.raw \
    > f.out
grep -qi 'fail\|mismatch' f.out && fail "file plugin: data not in the file"

# convert -n into an export: a raw target on nbd takes its writes in
# flight, started in order (tools/cmd_convert.c); over both of nbdkit's
# connections the export ends up holding the source, as qemu-img's copy.
head -c 24M /dev/urandom > src.raw
truncate -s 32M src.raw
nbds_nbdkit pid4 - memory 64M || fail "nbdkit memory"
for m in 8 16; do
    $T "$VDISK" convert -n -m $m -f raw -O raw src.raw \
        "nbd://127.0.0.1:$NBDS_PORT" || fail "convert -n -m $m into nbdkit"
    $T $QEMU_IMG compare -f raw -F raw src.raw "nbd://127.0.0.1:$NBDS_PORT" \
        > cmp.out || fail "convert -n -m $m: $(cat cmp.out)"
done
nbds_stop pid4
# Every write refused: both tools stop at the first chunk with the same
# words, several of vdisk's writes having been in flight when they failed.
nbds_nbdkit pid5 - --filter=error memory 64M error-pwrite=EIO \
    error-pwrite-rate=100% || fail "nbdkit error filter"
expect_status 1 $T $QEMU_IMG convert -n -f raw -O raw src.raw \
    "nbd://127.0.0.1:$NBDS_PORT" 2> q.err
expect_status 1 $T "$VDISK" convert -n -f raw -O raw src.raw \
    "nbd://127.0.0.1:$NBDS_PORT" 2> v.err
diff <(sed 's/^qemu-img: //' q.err) <(sed 's/^vdisk: //' v.err) ||
    fail "write errors reported unlike qemu-img"
nbds_stop pid5

# ---- TLS ----
tls_make_x509 srv cli
# A CA of its own for the client: the server's certificate is foreign.
mkdir -p other/cli
cp cli/client-*.pem other/cli/
certtool --generate-privkey --outfile other/ca-key.pem 2>/dev/null
certtool --generate-self-signed --load-privkey other/ca-key.pem \
    --template ca.info --outfile other/cli/ca-cert.pem >/dev/null 2>&1 ||
    fail "certtool: another CA"
nbds_nbdkit pid3 - --tls=require --tls-certificates="$PWD/srv" memory 64M ||
    fail "nbdkit --tls=require"
P=$NBDS_PORT
X509="tls-creds-x509,id=tls0,dir=$PWD/cli,endpoint=client"
N="driver=raw,file.driver=nbd,file.server.type=inet"
N="$N,file.server.host=127.0.0.1,file.server.port=$P,file.tls-creds=tls0"
write_and_check "memory over TLS" --object "$X509" --image-opts "$N"

# Without TLS: refused by the server, vdisk says so and exits 1.
expect_status 1 $T "$VDISK" info "nbd://127.0.0.1:$P" 2> plain.err
grep -q 'requires TLS' plain.err || fail "plaintext: $(cat plain.err)"
# Trusting another CA: the server's certificate does not verify.
expect_status 1 $T "$VDISK" info \
    --object "tls-creds-x509,id=tls0,dir=$PWD/other/cli,endpoint=client" \
    --image-opts "$N" 2> wrong.err
grep -qi "127.0.0.1:$P" wrong.err && grep -qi 'certificate\|verif\|TLS' wrong.err ||
    fail "wrong CA: $(cat wrong.err)"
# QEMU's errors for credentials that cannot be a client's.
expect_status 1 $T "$VDISK" info \
    --object "tls-creds-x509,id=tls0,dir=$PWD/srv,endpoint=server" \
    --image-opts "$N" 2> ep.err
# (QEMU 7.2's words; qemu-img takes seconds to say them.)
grep -q 'Expected TLS credentials for a client endpoint' ep.err ||
    fail "server-endpoint credentials: $(cat ep.err)"
expect_status 1 $T "$VDISK" info --image-opts "$N" 2> none.err
grep -q "No TLS credentials with id 'tls0'" none.err ||
    fail "missing object: $(cat none.err)"
exit 0
