# A throwaway nginx for the http/https tests (tests/cli/http-*.sh) and
# bench/remote-http.sh. Sourced after ../functions.sh, in the test's
# tmpdir. Everything nginx writes (pid file, logs, temp paths, the
# self-signed certificate) lives under ./nginx; it listens on 127.0.0.1
# only, on free ports picked at random (retried on a clash), and is
# stopped by its own PID at exit (cleanup_fn).
#
#   http_server_start DOCROOT   start nginx serving DOCROOT; sets
#                               HTTP_PORT, HTTPS_PORT, HTTP_PID, and
#                               HTTP_URL / HTTPS_URL (scheme://host:port)
#   http_server_stop            stop it (also done at exit)
#
# Locations (all serving DOCROOT):
#   /NAME            plain files, byte ranges allowed
#   /norange/NAME    max_ranges 0: the server ignores Range headers
#   /slow/NAME       at most 256 KiB/s per request (after the first
#                    second's 256 KiB)
#   /redirect/NAME   a 302 to /NAME
#   /auth/NAME       HTTP basic auth, user "vdisk", password "s3cret"
#   /cookie/NAME     403 unless the request has the cookie "key=v4lue"
# The https server serves the same with a self-signed certificate for
# 127.0.0.1 made at start (certtool, else openssl).

NGINX=${NGINX:-/usr/sbin/nginx}

_http_make_cert()
{
    local d=$1
    if command -v certtool >/dev/null 2>&1; then
        certtool --generate-privkey --key-type=rsa --bits=2048 \
            --outfile "$d/key.pem" 2>/dev/null
        cat > "$d/cert.cfg" <<EOF
cn = 127.0.0.1
ip_address = 127.0.0.1
expiration_days = 2
tls_www_server
EOF
        certtool --generate-self-signed --load-privkey "$d/key.pem" \
            --template "$d/cert.cfg" --outfile "$d/cert.pem" 2>/dev/null
    else
        openssl req -x509 -newkey rsa:2048 -nodes -days 2 \
            -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
            -keyout "$d/key.pem" -out "$d/cert.pem" 2>/dev/null
    fi
}

_http_write_conf()
{
    local d=$1 root=$2 port=$3 sport=$4 user=""
    # As root, nginx's workers would drop to nobody, who cannot read the
    # test's private tmpdir.
    [ "$(id -u)" = 0 ] && user="user root;"
    cat > "$d/nginx.conf" <<EOF
$user
worker_processes 2;
pid $d/nginx.pid;
error_log $d/error.log;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path $d/tmp-body;
    proxy_temp_path $d/tmp-proxy;
    fastcgi_temp_path $d/tmp-fastcgi;
    uwsgi_temp_path $d/tmp-uwsgi;
    scgi_temp_path $d/tmp-scgi;
    types { }
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 100000;
    server {
        listen 127.0.0.1:$port;
        listen 127.0.0.1:$sport ssl;
        ssl_certificate $d/cert.pem;
        ssl_certificate_key $d/key.pem;
        root $root;
        location /norange/ { alias $root/; max_ranges 0; }
        location /slow/ { alias $root/; limit_rate 256k; }
        location /redirect/ { rewrite ^/redirect/(.*)\$ /\$1 redirect; }
        location /auth/ {
            alias $root/;
            auth_basic "vdisk";
            auth_basic_user_file $d/htpasswd;
        }
        location /cookie/ {
            alias $root/;
            if (\$cookie_key != "v4lue") { return 403; }
        }
    }
}
EOF
    # vdisk:s3cret, hashed with the apr1 scheme nginx understands.
    echo "vdisk:$(openssl passwd -apr1 s3cret)" > "$d/htpasswd"
}

http_server_start()
{
    local root=$1 d=$PWD/nginx try port sport
    [ -x "$NGINX" ] || { echo "$0: test skipped because nginx ($NGINX) is not installed"; exit 77; }
    requires openssl
    mkdir -p "$d"
    _http_make_cert "$d"
    for try in 1 2 3 4 5 6 7 8 9 10; do
        port=$((20000 + RANDOM % 30000))
        sport=$((port + 1))
        _http_write_conf "$d" "$root" "$port" "$sport"
        : > "$d/error.log"
        "$NGINX" -p "$d" -c "$d/nginx.conf" -g 'daemon off;' \
            2>>"$d/error.log" &
        HTTP_PID=$!
        local i
        for i in $(seq 100); do
            if ! kill -0 "$HTTP_PID" 2>/dev/null; then
                break
            fi
            if [ -s "$d/nginx.pid" ] &&
               (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null &&
               (exec 3<>"/dev/tcp/127.0.0.1/$sport") 2>/dev/null; then
                HTTP_PORT=$port
                HTTPS_PORT=$sport
                HTTP_URL=http://127.0.0.1:$port
                HTTPS_URL=https://127.0.0.1:$sport
                cleanup_fn http_server_stop
                return 0
            fi
            sleep 0.05
        done
        kill "$HTTP_PID" 2>/dev/null || true
        wait "$HTTP_PID" 2>/dev/null || true
        grep -q "Address already in use" "$d/error.log" || break
    done
    cat "$d/error.log" >&2
    fail "nginx did not start"
}

http_server_stop()
{
    if [ -n "${HTTP_PID:-}" ]; then
        kill "$HTTP_PID" 2>/dev/null || true
        wait "$HTTP_PID" 2>/dev/null || true
        HTTP_PID=
    fi
}
