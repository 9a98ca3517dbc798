#!/usr/bin/env bash
# qemu-nbd --tls-authz and -L over TLS, vdisk invoked as qemu-nbd side by
# side with QEMU's qemu-nbd on UNIX sockets: an X.509 client whose
# distinguished name an authz-simple or authz-list object allows gets in,
# one it does not allow (or a missing authz object) is turned away, a PSK
# client is not checked (QEMU 7.2 checks X.509 names only). The client
# (qemu-img) must see the same outcome from both servers (its output too
# where it gets in; only its exit status where it is refused, since the
# error it reads then depends on timing), and the allowed cases must
# really succeed. Then -L with client credentials (--tls-creds) lists the
# same exports from both servers as qemu-nbd -L does.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/tls-functions.bash"
requires qemu-nbd qemu-img certtool python3 timeout
tmpdir

Q=qemu-nbd
V=$VDISK_QEMU_NBD
T="timeout 30"

tls_make_x509 srv cli
tls_make_psk psk alice
mkdir pskcli
cp psk/keys.psk pskcli/
$QEMU_IMG create -q -f qcow2 a.qcow2 1M

X509="tls-creds-x509,id=t,endpoint=server,dir=$PWD/srv,verify-peer=on"
PSK="tls-creds-psk,id=t,endpoint=server,dir=$PWD/psk"
CX509="tls-creds-x509,id=c,endpoint=client,dir=$PWD/cli"
CPSK="tls-creds-psk,id=c,endpoint=client,dir=$PWD/pskcli,username=alice"

declare -A pid
# serve WHO ARGS...: starts WHO (q: qemu-nbd, v: vdisk) on WHO.sock.
serve()
{
    local who=$1 prog=$Q i
    shift
    [ "$who" = v ] && prog=$V
    rm -f "$who.sock"
    $prog -t -k "$PWD/$who.sock" -f qcow2 "$@" a.qcow2 2> "$who.srv.err" &
    pid[$who]=$!
    cleanup_fn sh -c "kill ${pid[$who]} 2>/dev/null; true"
    for ((i = 0; i < 200; i++)); do
        [ -S "$who.sock" ] && return 0
        sleep 0.05
    done
    cat "$who.srv.err" >&2
    fail "server $who did not start: $*"
}

stop()
{
    kill "${pid[$1]}" 2>/dev/null || true
    wait "${pid[$1]}" || true
}

# case_ NAME CLIENT-CREDS SERVER-ARGS...: qemu-img info through both
# servers; sets $outcome to the client's exit status, which must be the
# same from both (and the output too when it got in).
case_()
{
    local name=$1 ccreds=$2 who st
    shift 2
    for who in q v; do
        serve "$who" "$@"
        st=0
        $T $QEMU_IMG info --object "$ccreds" --image-opts \
            "driver=nbd,server.type=unix,server.path=$PWD/$who.sock,tls-creds=c,tls-hostname=localhost" \
            > "$name.$who.out" 2>&1 || st=$?
        sed -i "s|$PWD/$who.sock|SOCK|g" "$name.$who.out"
        echo "$st" > "$name.$who.st"
        stop "$who"
    done
    diff -u "$name.q.st" "$name.v.st" ||
        fail "$name: exit status $(cat "$name.v.st") through vdisk, $(cat "$name.q.st") through qemu-nbd"
    outcome=$(cat "$name.q.st")
    if [ "$outcome" = 0 ]; then
        diff -u "$name.q.out" "$name.v.out" || fail "$name: output differs"
    fi
}

case_ x509-denied "$CX509" --object "$X509" \
    --object authz-simple,id=a,identity=CN=someone-else \
    --tls-creds t --tls-authz a
[ "$outcome" != 0 ] || fail "x509: a DN that is not allowed got in"
diff -u q.srv.err v.srv.err ||
    fail "x509: the servers log the refusal differently"
# The client certificate's distinguished name as qemu-nbd sees it (the
# order gnutls gives), from its refusal message.
dn=$(sed -n 's/.*authz check for \(.*\) is denied$/\1/p' q.srv.err)
[ -n "$dn" ] || fail "qemu-nbd did not name the refused DN"
case_ x509-allowed "$CX509" --object "$X509" \
    --object "authz-simple,id=a,identity=${dn//,/,,}" \
    --tls-creds t --tls-authz a
[ "$outcome" = 0 ] || fail "x509: an allowed DN was refused"
case_ x509-list "$CX509" --object "$X509" \
    --object 'authz-list,id=a,policy=deny,rules.0.match=*CN=client*,rules.0.policy=allow,rules.0.format=glob' \
    --tls-creds t --tls-authz a
[ "$outcome" = 0 ] || fail "x509: authz-list glob did not allow the client"
case_ x509-noobj "$CX509" --object "$X509" --tls-creds t --tls-authz nosuch
[ "$outcome" != 0 ] || fail "x509: a missing authz object let the client in"
case_ psk "$CPSK" --object "$PSK" --object authz-simple,id=a,identity=bob \
    --tls-creds t --tls-authz a
[ "$outcome" = 0 ] || fail "PSK: the client was refused"

# -L with client credentials: vdisk's list equals qemu-nbd's, on both
# servers.
for who in q v; do
    serve "$who" --object "$PSK" --tls-creds t -x e -D desc
    for lister in q v; do
        prog=$Q
        [ "$lister" = v ] && prog=$V
        st=0
        $T $prog --object "$CPSK" --tls-creds c -L -k "$PWD/$who.sock" \
            > "L.$who.$lister" 2>&1 || st=$?
        echo "exit $st" >> "L.$who.$lister"
    done
    stop "$who"
    diff -u "L.$who.q" "L.$who.v" || fail "-L over TLS differs (server $who)"
done
diff -u L.q.q L.v.q || fail "the servers list differently over TLS"
grep -q "export: 'e'" L.q.q || fail "-L over TLS listed nothing"
