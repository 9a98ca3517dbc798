# NBD servers for the nbd client tests (tests/cli/nbd-client*.sh and
# bench/remote-nbd.sh): qemu-nbd, nbdkit and vdisk serve started on
# 127.0.0.1 at a free port (retried on a clash) or on a UNIX socket in the
# current directory, each stopped by its own PID in a cleanup function
# (TLS credentials: tls-functions.bash). Source after ../functions.sh
# (tests) or on its own (bench: define cleanup_fn).

# A port nobody listens on now (the server may still lose a race for it:
# the starters retry).
nbds_free_port()
{
    local p i
    for ((i = 0; i < 20; i++)); do
        p=$((20000 + RANDOM % 40000))
        # Nothing answers there (bash's /dev/tcp: no python start-up).
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

# nbds_stop PIDFILE: SIGTERM, then SIGKILL after 5 s; waits until gone.
nbds_stop()
{
    local pid i
    [ -s "$1" ] || return 0
    pid=$(cat "$1")
    rm -f "$1"
    kill "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null
    return 0
}

# nbds_kill PIDFILE: SIGKILL (a server dying), waits until gone.
nbds_kill()
{
    local pid i
    [ -s "$1" ] || return 0
    pid=$(cat "$1")
    rm -f "$1"
    kill -9 "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
}

# _nbds_start NAME PIDFILE PORT-OR-EMPTY CMD...: runs a daemonising CMD
# (it forks once listening and writes PIDFILE), registers the stop.
# With PORT-OR-EMPTY "-": CMD takes a port as "@PORT@" and a free one is
# tried up to 5 times; the port is left in NBDS_PORT.
_nbds_start()
{
    local name=$1 pidfile=$2 want=$3 try port args a i
    shift 3
    for ((try = 0; try < 5; try++)); do
        port=
        args=()
        if [ "$want" = - ]; then
            port=$(nbds_free_port)
        elif [ -n "$want" ]; then
            port=$want
        fi
        for a in "$@"; do
            args+=("${a//@PORT@/$port}")
        done
        rm -f "$pidfile"
        if timeout 30 "${args[@]}" 2>> "$name.log"; then
            # The daemon may write its PID file after its parent exits.
            for ((i = 0; i < 50; i++)); do
                [ -s "$pidfile" ] && break
                sleep 0.1
            done
            NBDS_PORT=$port
            cleanup_fn nbds_stop "$pidfile"
            [ -s "$pidfile" ] && return 0
            break
        fi
        [ "$want" = - ] || break
    done
    echo "could not start $name: $(tail -3 "$name.log")" >&2
    return 1
}

# nbds_qemu_nbd PIDFILE PORT|-|'' ARGS...: qemu-nbd --fork (-t: several
# clients one after the other; port '' for -k SOCKET in ARGS).
nbds_qemu_nbd()
{
    local pidfile=$1 port=$2
    shift 2
    if [ -n "$port" ]; then
        _nbds_start qemu-nbd "$pidfile" "$port" qemu-nbd --fork -t \
            --pid-file="$PWD/$pidfile" -b 127.0.0.1 -p @PORT@ "$@"
    else
        _nbds_start qemu-nbd "$pidfile" "" qemu-nbd --fork -t \
            --pid-file="$PWD/$pidfile" "$@"
    fi
}

# nbds_nbdkit PIDFILE PORT|- ARGS...: nbdkit on 127.0.0.1 (it forks once
# listening).
nbds_nbdkit()
{
    local pidfile=$1 port=$2
    shift 2
    _nbds_start nbdkit "$pidfile" "$port" nbdkit -P "$PWD/$pidfile" \
        -i 127.0.0.1 -p @PORT@ "$@"
}

# nbds_vdisk_serve PIDFILE PORT|- ARGS...: vdisk serve --fork on
# 127.0.0.1.
nbds_vdisk_serve()
{
    local pidfile=$1 port=$2
    shift 2
    _nbds_start vdisk-serve "$pidfile" "$port" "$VDISK" serve --fork \
        --pid-file "$PWD/$pidfile" -t -b 127.0.0.1 -p @PORT@ "$@"
}

# Skips (77) a test when vdisk was built without libnbd (no nbd driver).
nbds_requires_client()
{
    "$VDISK" --help > help.out
    if ! grep -qw nbd help.out; then
        echo "$0: test skipped because vdisk was built without libnbd"
        exit 77
    fi
}
