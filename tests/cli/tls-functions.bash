# TLS credentials for the shell tests, made fresh for each run with
# certtool. Source after ../functions.sh and tmpdir:
#
#   tls_make_x509 SRVDIR CLIDIR   a CA (its key in ./ca-key.pem), in
#                                 SRVDIR ca-cert.pem, server-cert.pem and
#                                 server-key.pem for "localhost", in
#                                 CLIDIR ca-cert.pem, client-cert.pem and
#                                 client-key.pem for CN=client,O=vdisk
#                                 test: QEMU's file names, so the two
#                                 directories serve tls-creds-x509 objects
#                                 with endpoint=server and endpoint=client
#   tls_make_psk DIR USER...      DIR/keys.psk with a fresh key for each
#                                 USER (the same key for all of them)

_tls_gen()
{
    certtool "$@" >/dev/null 2>&1 || fail "certtool $*"
}

tls_make_x509()
{
    local srv=$1 cli=$2
    mkdir -p "$srv" "$cli"
    printf '%s\n' 'cn = vdisk test CA' ca cert_signing_key \
        'expiration_days = 2' > ca.info
    printf '%s\n' 'organization = vdisk test' 'cn = localhost' \
        'dns_name = localhost' 'ip_address = 127.0.0.1' tls_www_server \
        encryption_key signing_key 'expiration_days = 2' > server.info
    printf '%s\n' 'organization = vdisk test' 'cn = client' tls_www_client \
        encryption_key signing_key 'expiration_days = 2' > client.info
    _tls_gen --generate-privkey --outfile ca-key.pem
    _tls_gen --generate-self-signed --load-privkey ca-key.pem \
        --template ca.info --outfile "$srv/ca-cert.pem"
    _tls_gen --generate-privkey --outfile "$srv/server-key.pem"
    _tls_gen --generate-certificate --load-ca-certificate "$srv/ca-cert.pem" \
        --load-ca-privkey ca-key.pem --load-privkey "$srv/server-key.pem" \
        --template server.info --outfile "$srv/server-cert.pem"
    cp "$srv/ca-cert.pem" "$cli/"
    _tls_gen --generate-privkey --outfile "$cli/client-key.pem"
    _tls_gen --generate-certificate --load-ca-certificate "$srv/ca-cert.pem" \
        --load-ca-privkey ca-key.pem --load-privkey "$cli/client-key.pem" \
        --template client.info --outfile "$cli/client-cert.pem"
}

tls_make_psk()
{
    local dir=$1 key user
    shift
    mkdir -p "$dir"
    key=$(python3 -c 'import os; print(os.urandom(32).hex())')
    : > "$dir/keys.psk"
    for user in "$@"; do
        echo "$user:$key" >> "$dir/keys.psk"
    done
}
