# Helpers for the tests of the ssh driver (tests/cli/ssh-*.sh) and for
# bench/remote-ssh.sh: a throwaway OpenSSH server and an ssh-agent, both
# started by the caller in its scratch directory and stopped by their own
# PIDs at exit. Sourced after ../functions.sh (which provides tmpdir,
# cleanup_fn and fail); the bench sources it with its own stand-ins.
#
#   ssh_server_start   generate a host key (ed25519) and a user key, write
#                      an sshd_config that accepts only that key for root
#                      on 127.0.0.1, start /usr/sbin/sshd -D -e on a free
#                      high port (retrying on a clash), start an ssh-agent
#                      with the user key loaded (SSH_AUTH_SOCK exported),
#                      and point HOME at the scratch directory so that
#                      neither tool reads the real ~/.ssh. Sets
#                        SSH_PORT        the port
#                        SSH_URI_BASE    ssh://root@127.0.0.1:PORT
#                        SSH_SHA256 SSH_SHA1 SSH_MD5
#                                        the host key's fingerprints (hex)
#                        SSH_DIR         where the images go (absolute)
#                        SSHD_PID SSH_AGENT_PID
#   ssh_test_begin     what every test does first: skip unless root with
#                      sshd, make the scratch directory, start the server;
#                      sets D (the images' directory), NO (the query that
#                      turns the host key check off) and U (the URI of D)
#   ssh_server_stop    stop sshd (by PID) and wait for it
#   ssh_known_hosts [KEY.pub]
#                      write $HOME/.ssh/known_hosts naming the server with
#                      its host key (or with the key in KEY.pub)
#   ssh_session_pids   the PIDs of the processes sshd started for the open
#                      connections (its descendants: the per-connection
#                      sshd processes and their sftp-server), so that a
#                      test can kill or stop a connection by PID
#   gone PID...        kill -9 the processes, quietly: a clean-up for
#                      processes that may have ended already
#   in_home CMD...     run CMD in a private mount namespace where the
#                      user's home directory from the password database
#                      is $HOME: libssh (and OpenSSH) find ~/.ssh there,
#                      not in $HOME, so the known_hosts tests need this
#                      to leave the real ~/.ssh alone; skip (77) when
#                      unshare is not allowed
#
# sshd insists on running as root from an absolute path (it re-executes
# itself); tests skip (77) when not root or when sshd is missing.

ssh_server_requires()
{
    if [ "$(id -u)" != 0 ]; then
        echo "$0: the throwaway sshd must run as root; skipping" >&2
        exit 77
    fi
    local p
    for p in /usr/sbin/sshd ssh-keygen ssh-agent ssh-add; do
        if ! command -v "$p" >/dev/null 2>&1; then
            echo "$0: $p not found (Debian's openssh-server/-client)" >&2
            exit 77
        fi
    done
    if [ ! -x /usr/lib/openssh/sftp-server ]; then
        echo "$0: /usr/lib/openssh/sftp-server not found" >&2
        exit 77
    fi
}

_ssh_hex_fingerprint()
{
    # The host key's blob (second field of the .pub) hashed: the raw
    # form QEMU's host-key-check hash mode compares against.
    awk '{print $2}' "$1" | base64 -d | "$2" | awk '{print $1}'
}

ssh_server_start()
{
    local dir=$PWD/sshd
    mkdir -p "$dir" "$PWD/images"
    SSH_DIR=$PWD/images
    ssh-keygen -q -t ed25519 -N '' -C vdisk-test-host -f "$dir/host_key"
    ssh-keygen -q -t ed25519 -N '' -C vdisk-test-user -f "$dir/user_key"
    cp "$dir/user_key.pub" "$dir/authorized_keys"
    SSH_SHA256=$(_ssh_hex_fingerprint "$dir/host_key.pub" sha256sum)
    SSH_SHA1=$(_ssh_hex_fingerprint "$dir/host_key.pub" sha1sum)
    SSH_MD5=$(_ssh_hex_fingerprint "$dir/host_key.pub" md5sum)

    # Neither vdisk nor qemu-img may read the real ~/.ssh (libssh reads
    # its config, known_hosts and default identities from $HOME/.ssh).
    export HOME=$PWD/home
    mkdir -p "$HOME/.ssh"
    chmod 700 "$HOME/.ssh"

    # The agent first, so that its clean-up runs after sshd's.
    eval "$(ssh-agent -s -a "$dir/agent.sock")" >/dev/null
    cleanup_fn kill "$SSH_AGENT_PID"
    ssh-add -q "$dir/user_key" 2>/dev/null

    # Debian's sshd refuses to start without its privilege separation
    # directory (compiled in; no option moves it); a system without a
    # running sshd may not have it.
    if [ ! -d /run/sshd ]; then
        mkdir -p /run/sshd
        chmod 755 /run/sshd
    fi

    local try port
    for try in 1 2 3 4 5 6 7 8; do
        port=$((20000 + RANDOM % 30000))
        cat >"$dir/sshd_config" <<EOF
Port $port
ListenAddress 127.0.0.1
HostKey $dir/host_key
PidFile $dir/sshd.pid
AuthorizedKeysFile $dir/authorized_keys
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
AllowUsers root
Subsystem sftp /usr/lib/openssh/sftp-server
LogLevel ERROR
MaxStartups 100
MaxSessions 100
EOF
        /usr/sbin/sshd -D -e -f "$dir/sshd_config" 2>>"$dir/sshd.log" &
        SSHD_PID=$!
        # Up when the port answers with an SSH banner; gone when the port
        # was taken (sshd exits at once).
        local i
        for i in $(seq 100); do
            if ! kill -0 "$SSHD_PID" 2>/dev/null; then
                break
            fi
            if ssh-keyscan -p "$port" -T 1 127.0.0.1 >/dev/null 2>&1; then
                SSH_PORT=$port
                SSH_URI_BASE=ssh://root@127.0.0.1:$port
                cleanup_fn ssh_server_stop
                return 0
            fi
            sleep 0.05
        done
        kill "$SSHD_PID" 2>/dev/null || true
        wait "$SSHD_PID" 2>/dev/null || true
    done
    cat "$dir/sshd.log" >&2
    fail "sshd did not start"
}

ssh_test_begin()
{
    ssh_server_requires
    # The referee needs QEMU's ssh driver (Debian's qemu-block-extra),
    # the tool its own (built only with libssh).
    if ! "$QEMU_IMG" --help | grep -q '^Supported formats:.* ssh\b'; then
        echo "$0: qemu-img has no ssh driver (qemu-block-extra)" >&2
        exit 77
    fi
    if ! "$VDISK" --help | grep -q '^Supported formats:.* ssh\b'; then
        echo "$0: vdisk was built without libssh" >&2
        exit 77
    fi
    tmpdir
    ssh_server_start
    D=$SSH_DIR
    NO='?host_key_check=no'
    U=$SSH_URI_BASE$D
}

ssh_server_stop()
{
    if [ -n "${SSHD_PID:-}" ] && kill -0 "$SSHD_PID" 2>/dev/null; then
        kill "$SSHD_PID" 2>/dev/null
        wait "$SSHD_PID" 2>/dev/null || true
    fi
    SSHD_PID=
}

ssh_known_hosts()
{
    printf '[127.0.0.1]:%s %s\n' "$SSH_PORT" \
        "$(awk '{print $1, $2}' "${1:-$PWD/sshd/host_key.pub}")" \
        >"$HOME/.ssh/known_hosts"
}

ssh_session_pids()
{
    local todo=$SSHD_PID p c
    while [ -n "$todo" ]; do
        set -- $todo
        todo=
        for p; do
            for c in $(pgrep -P "$p" || true); do
                echo "$c"
                todo="$todo $c"
            done
        done
    done
}

gone()
{
    kill -9 "$@" 2>/dev/null || true
}

in_home()
{
    local home
    home=$(getent passwd "$(id -u)" | cut -d: -f6)
    unshare -m sh -c 'mount --make-rprivate / && mount --bind "$1" "$2" &&
                      shift 2 && exec "$@"' sh "$HOME" "$home" "$@"
}

in_home_requires()
{
    if ! command -v unshare >/dev/null 2>&1 ||
       ! unshare -m true 2>/dev/null; then
        echo "$0: unshare -m not allowed here; skipping" >&2
        exit 77
    fi
}
