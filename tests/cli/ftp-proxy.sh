#!/usr/bin/env bash
# The curl driver's other protocols and its proxy options, against real
# servers started here on 127.0.0.1 and stopped by PID: ftp (vsftpd,
# anonymous, passive mode) read as qemu-img reads it (info, map, convert
# byte for byte; a missing file refused in QEMU's words), and nothing but
# the image's information on stdout (libcurl hands an FTP size to the
# write callback as text, which once leaked into `vdisk info`); ftps
# (implicit TLS, self-signed: refused in QEMU's words unless
# sslverify=off, then read; QEMU 7.2's own ftps read times out here, so
# the bytes are compared with the local file); an http proxy (tinyproxy,
# basic auth, through libcurl's http_proxy variable as in QEMU):
# refused with 407 without credentials, read with proxy-username and
# proxy-password-secret, and the proxy saw the requests.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/nbd-servers.bash"
source "$(dirname "$0")/http-server.bash"
requires qemu-img qemu-io vsftpd tinyproxy timeout certtool
tmpdir
"$VDISK" --help > help.out
grep -qw ftp help.out || { echo "no curl driver"; exit 77; }

T="timeout 60"
unset no_proxy NO_PROXY http_proxy https_proxy HTTP_PROXY HTTPS_PROXY

mkdir root empty
chmod 755 root empty
$QEMU_IMG create -q -f qcow2 root/img.qcow2 16M
$QEMU_IO -c 'write -P 7 1M 1M' -c 'write -z 4M 64k' -c 'write -P 9 9M 128k' \
    root/img.qcow2 > /dev/null
$QEMU_IMG convert -O raw root/img.qcow2 want.raw

# daemon_start NAME PIDFILE CONF-WRITER CMD...: runs CMD (in the
# foreground, with @CONF@ for its configuration file) in the background on
# a free port (CONF-WRITER PORT writes NAME-PORT.conf), waits until it
# answers, retries on a clash; leaves the port in DAEMON_PORT.
daemon_start()
{
    local name=$1 pidfile=$2 writer=$3 try i port a args
    shift 3
    for ((try = 0; try < 5; try++)); do
        port=$(nbds_free_port) || continue
        "$writer" "$port"
        args=()
        for a in "$@"; do
            args+=("${a//@CONF@/$PWD/$name-$port.conf}")
        done
        "${args[@]}" > "$name.log" 2>&1 &
        echo $! > "$pidfile"
        cleanup_fn nbds_stop "$PWD/$pidfile"
        for ((i = 0; i < 50; i++)); do
            if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
                DAEMON_PORT=$port
                return 0
            fi
            kill -0 "$(cat "$pidfile")" 2>/dev/null || break
            sleep 0.1
        done
        nbds_stop "$PWD/$pidfile"
    done
    fail "could not start $name: $(tail -3 "$name.log")"
}

vsftpd_conf() # PORT [extra lines on stdin]
{
    local p=$1
    cat > "vsftpd-$p.conf" <<EOF
listen=YES
listen_ipv6=NO
listen_address=127.0.0.1
listen_port=$p
background=NO
anonymous_enable=YES
local_enable=NO
write_enable=NO
anon_root=$PWD/root
no_anon_password=YES
secure_chroot_dir=$PWD/empty
seccomp_sandbox=NO
run_as_launching_user=YES
pasv_enable=YES
pasv_address=127.0.0.1
pasv_min_port=$((p + 1))
pasv_max_port=$((p + 40))
xferlog_enable=NO
EOF
    cat "${VSFTPD_EXTRA:-/dev/null}" >> "vsftpd-$p.conf"
}

# ---- ftp ----
daemon_start vsftpd ftp.pid vsftpd_conf vsftpd @CONF@
url=ftp://127.0.0.1:$DAEMON_PORT/img.qcow2
$T "$VDISK" info "$url" > v.info || fail "vdisk info $url"
$T $QEMU_IMG info "$url" > q.info
diff -u q.info v.info || fail "ftp: info differs from qemu-img's"
$T "$VDISK" map --output=json "$url" > v.map
$T $QEMU_IMG map --output=json "$url" > q.map
diff -u q.map v.map || fail "ftp: map differs from qemu-img's"
$T "$VDISK" convert -O raw "$url" v.raw || fail "ftp: convert"
# (qemu-img's curl driver hangs in convert at its default -m 8 with this
# libcurl: see http-read.sh.)
$T $QEMU_IMG convert -m 1 -O raw "$url" q.raw
cmp q.raw v.raw || fail "ftp: convert differs from qemu-img's"
cmp want.raw v.raw || fail "ftp: convert differs from the image"
same_err() # what qemu-img and vdisk say about an URL they both refuse
{
    expect_status 1 $T "$VDISK" info "$@" 2> v.err
    expect_status 1 $T $QEMU_IMG info "$@" 2> q.err
    diff -u <(sed 's/^qemu-img:/vdisk:/' q.err) v.err ||
        fail "$*: not qemu-img's error"
}
same_err "ftp://127.0.0.1:$DAEMON_PORT/nosuch.img"

# ---- ftps (implicit TLS, self-signed certificate) ----
mkdir tls
certtool --generate-privkey --key-type=rsa --bits=2048 \
    --outfile tls/key.pem 2> /dev/null
printf 'cn = 127.0.0.1\nip_address = 127.0.0.1\nexpiration_days = 2\ntls_www_server\n' \
    > tls/cert.cfg
certtool --generate-self-signed --load-privkey tls/key.pem \
    --template tls/cert.cfg --outfile tls/cert.pem 2> /dev/null
cat > ftps.extra <<EOF
ssl_enable=YES
implicit_ssl=YES
allow_anon_ssl=YES
force_anon_data_ssl=YES
force_anon_logins_ssl=YES
require_ssl_reuse=NO
rsa_cert_file=$PWD/tls/cert.pem
rsa_private_key_file=$PWD/tls/key.pem
EOF
VSFTPD_EXTRA=ftps.extra daemon_start vsftpd ftps.pid vsftpd_conf \
    vsftpd @CONF@
url=ftps://127.0.0.1:$DAEMON_PORT/img.qcow2
same_err "$url"
grep -q "certificate" v.err || fail "ftps: not a certificate error: $(cat v.err)"
opts="json:{\"file.driver\":\"ftps\",\"file.url\":\"$url\",\"file.sslverify\":false}"
$T "$VDISK" convert -O raw "$opts" v.raw || fail "ftps with sslverify=off"
cmp want.raw v.raw || fail "ftps: convert differs from the image"
$T "$VDISK" info --output=json "$opts" > v.json
grep -q '"virtual-size": 16777216' v.json || fail "ftps info: $(cat v.json)"

# ---- an http proxy with basic auth (tinyproxy) ----
http_server_start "$PWD/root"
tinyproxy_conf()
{
    cat > "tinyproxy-$1.conf" <<EOF
Port $1
Listen 127.0.0.1
Timeout 60
LogFile "$PWD/tinyproxy-requests.log"
LogLevel Info
MaxClients 20
Allow 127.0.0.1
BasicAuth vproxy pr0xypw
EOF
}
# -d: in the foreground, so that the PID is the daemon's.
daemon_start tinyproxy proxy.pid tinyproxy_conf tinyproxy -d -c @CONF@
export http_proxy=http://127.0.0.1:$DAEMON_PORT
url=$HTTP_URL/img.qcow2
same_err "$url"
grep -q 407 v.err || fail "proxy: no 407 without credentials: $(cat v.err)"
printf pr0xypw > proxy.pw
popts="json:{\"file.driver\":\"http\",\"file.url\":\"$url\",\"file.proxy-username\":\"vproxy\",\"file.proxy-password-secret\":\"p\"}"
$T "$VDISK" info --object secret,id=p,file=proxy.pw "$popts" > v.info ||
    fail "proxy with credentials"
$T $QEMU_IMG info --object secret,id=p,file=proxy.pw "$popts" > q.info
# (QEMU names a node with options a URL cannot carry by a json: filename
# in its hash order; vdisk keeps the URL: docs/remote.md.)
diff -u <(grep -v '^image:' q.info) <(grep -v '^image:' v.info) ||
    fail "proxy: info differs from qemu-img's"
$T "$VDISK" convert --object secret,id=p,file=proxy.pw -O raw "$popts" \
    v.raw || fail "proxy: convert"
cmp want.raw v.raw || fail "proxy: convert differs from the image"
grep -q "Established connection to host \"127.0.0.1\"" \
    tinyproxy-requests.log || fail "the requests did not go through the proxy"
# A wrong password: refused, as by qemu-img.
printf wrong > bad.pw
same_err --object secret,id=p,file=bad.pw "$popts"
grep -q 'returned error: 40[17]' v.err ||
    fail "proxy: a wrong password: $(cat v.err)"
exit 0
