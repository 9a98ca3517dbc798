#!/usr/bin/env bash
# tls-creds-x509's passwordid: an encrypted server key opened with the
# password of a secret object (inline, or itself AES-256-CBC-encrypted
# with another secret), as qemu-nbd opens it; a wrong or missing secret
# stops both at start-up with the same message.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-nbd certtool openssl timeout
tmpdir

T="timeout 60"
mkdir srv cli
printf 'cn = vdisk test CA\nca\ncert_signing_key\nexpiration_days = 2\n' \
    > ca.info
cat > server.info <<'INFO'
organization = vdisk test
cn = localhost
dns_name = localhost
tls_www_server
encryption_key
signing_key
expiration_days = 2
INFO
gen() { certtool "$@" >/dev/null 2>&1 || fail "certtool $*"; }
gen --generate-privkey --outfile ca-key.pem
gen --generate-self-signed --load-privkey ca-key.pem --template ca.info \
    --outfile srv/ca-cert.pem
pw=$(openssl rand -hex 12)
gen --generate-privkey --pkcs8 --password="$pw" --outfile srv/server-key.pem
grep -q 'ENCRYPTED PRIVATE KEY' srv/server-key.pem || fail "key not encrypted"
gen --generate-certificate --load-ca-certificate srv/ca-cert.pem \
    --load-ca-privkey ca-key.pem --load-privkey srv/server-key.pem \
    --password="$pw" --template server.info --outfile srv/server-cert.pem
cp srv/ca-cert.pem cli/
$QEMU_IMG create -q -f qcow2 img.qcow2 4M

# The password again, encrypted with a key secret as QEMU takes it.
key=$(openssl rand -hex 32)
iv=$(openssl rand -hex 16)
key64=$(printf '%s' "$key" | xxd -r -p | base64 -w0)
iv64=$(printf '%s' "$iv" | xxd -r -p | base64 -w0)
ct64=$(printf '%s' "$pw" | openssl enc -aes-256-cbc -K "$key" -iv "$iv" |
       base64 -w0)

X509="tls-creds-x509,id=t,endpoint=server,dir=$PWD/srv,verify-peer=off"
CLIENT="tls-creds-x509,id=t,dir=$PWD/cli,endpoint=client"

# serve PROGRAM SOCKET OBJECTS...: start the server in the background.
serve()
{
    local prog=$1 sock=$2
    shift 2
    if [ "$prog" = qemu-nbd ]; then
        $T qemu-nbd "$@" --tls-creds t -k "$PWD/$sock" img.qcow2 &
    else
        $T "$VDISK" serve "$@" --tls-creds t -k "$PWD/$sock" img.qcow2 &
    fi
    cleanup_fn sh -c "kill $! 2>/dev/null; true"
    for _ in $(seq 100); do
        [ -S "$sock" ] && return 0
        sleep 0.1
    done
    fail "$prog did not start"
}

i=0
for secrets in "secret,id=pw,data=$pw" \
    "secret,id=k,data=$key64,format=base64|secret,id=pw,data=$ct64,format=base64,keyid=k,iv=$iv64"; do
    objs=()
    IFS='|' read -r -a list <<< "$secrets"
    for o in "${list[@]}"; do
        objs+=(--object "$o")
    done
    for prog in qemu-nbd vdisk; do
        i=$((i + 1))
        serve "$prog" "s$i.sock" "${objs[@]}" --object "$X509,passwordid=pw"
        $T $QEMU_IMG info --object "$CLIENT" --image-opts \
            "driver=nbd,path=$PWD/s$i.sock,tls-creds=t,tls-hostname=localhost" \
            > "info-$prog.txt" || fail "$prog: TLS client refused"
        sed -i "s/s$i.sock/SOCK/" "info-$prog.txt"
    done
    diff info-qemu-nbd.txt info-vdisk.txt || fail "served image differs"
done

# Refusals at start-up: the same status and message.
for objs in "secret,id=pw,data=wrong$pw" "secret,id=other,data=$pw" \
            "secret,id=pw,data=$pw,format=base64"; do
    qs=0 vs=0
    $T qemu-nbd --object "$objs" --object "$X509,passwordid=pw" \
        --tls-creds t -k "$PWD/q.sock" img.qcow2 2> q.err || qs=$?
    $T "$VDISK" serve --object "$objs" --object "$X509,passwordid=pw" \
        --tls-creds t -k "$PWD/v.sock" img.qcow2 2> v.err || vs=$?
    [ "$qs" = 1 ] && [ "$vs" = 1 ] || fail "$objs: exit $vs, qemu-nbd $qs"
    diff <(sed -e 's/^qemu-nbd: //' -e 's/\.$//' q.err) \
         <(sed -e 's/^vdisk serve: //' -e 's/^vdisk: //' v.err) ||
        fail "$objs: message differs"
done
