#!/usr/bin/env bash
# vdisk serve against real NBD clients: qemu-img/qemu-io over UNIX and TCP,
# nbdinfo (--list, --map for both metadata contexts), nbdcopy both ways,
# several named exports, read-only exports and clean shutdown on SIGTERM.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io python3 timeout
tmpdir

T="timeout 60"

free_port()
{
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_server PIDFILE ARGS...: runs vdisk serve --fork, registers a kill.
start_server()
{
    local pidfile=$1
    shift
    $T "$VDISK" serve --fork --pid-file "$PWD/$pidfile" "$@"
    [ -s "$pidfile" ] || fail "no pid file after --fork"
    cleanup_fn stop_server "$pidfile"
}

# stop_server PIDFILE: SIGTERM, then wait (bounded) for the process to go.
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

# The image: data at 1M and 10M, explicit zeros at 4M, a hole elsewhere.
$QEMU_IMG create -q -f qcow2 img.qcow2 64M
$QEMU_IO -c 'write -P 0xab 1M 1M' -c 'write -z 4M 1M' \
    -c 'write -P 0xcd 10M 64k' img.qcow2 >/dev/null
cp img.qcow2 orig.qcow2

# ---- UNIX socket, qcow2 ----
# -A: the allocation-depth map is read below; --discard=unmap: the
# discard below must reach the image (qemu-nbd ignores them by default).
start_server pid1 -t -A --discard=unmap -f qcow2 -k "$PWD/sock" img.qcow2
U="nbd+unix:///?socket=$PWD/sock"

$T $QEMU_IMG info -f raw "$U" > info.out
grep -q '67108864 bytes' info.out || fail "wrong size in qemu-img info"
$T $QEMU_IMG compare -f raw -F qcow2 "$U" orig.qcow2
$T $QEMU_IO -f raw -c 'read -P 0xab 1M 1M' -c 'read -P 0 4M 1M' \
    -c 'read -P 0xcd 10M 64k' -c 'read -P 0 0 1M' "$U" > io.out
grep -q 'Pattern verification failed' io.out && fail "read back wrong data"

# Writes through NBD land in the image (unaligned ones too).
$T $QEMU_IO -f raw -c 'write -P 0x11 20M 1M' -c 'write -P 0x22 30000 777' \
    -c 'write -z 1M 64k' -c 'discard 10M 64k' -c 'flush' "$U" > w.out
grep -qi 'error\|failed' w.out && fail "write through NBD failed"
$QEMU_IO -f qcow2 -c 'write -P 0x11 20M 1M' -c 'write -P 0x22 30000 777' \
    -c 'write -z 1M 64k' -c 'write -z 10M 64k' orig.qcow2 >/dev/null
$T $QEMU_IMG compare -f raw -F qcow2 "$U" orig.qcow2

# Conversions through the server in both directions.
$T $QEMU_IMG convert -f raw -O qcow2 "$U" copy.qcow2
assert_same_content -f qcow2 -F qcow2 copy.qcow2 orig.qcow2

# Block status: nbdinfo --map against qemu-img map of the same image.
if command -v nbdinfo >/dev/null; then
    $T nbdinfo --map "$U" > map.nbd
    $QEMU_IMG map -U --output=json -f qcow2 img.qcow2 > map.qemu
    python3 - map.nbd map.qemu <<'EOF'
import json, sys
# nbdinfo lines: start length flags-number description
nbd = []
for line in open(sys.argv[1]):
    start, length, flags = line.split()[:3]
    nbd.append((int(start), int(length), int(flags)))
# qemu-img map: zero -> NBD_STATE_ZERO (2), not data -> NBD_STATE_HOLE (1)
qemu = []
for e in json.load(open(sys.argv[2])):
    f = (0 if e["data"] else 1) | (2 if e["zero"] else 0)
    if qemu and qemu[-1][2] == f and qemu[-1][0] + qemu[-1][1] == e["start"]:
        qemu[-1] = (qemu[-1][0], qemu[-1][1] + e["length"], f)
    else:
        qemu.append((e["start"], e["length"], f))
if nbd != qemu:
    print("nbdinfo --map:", nbd, "\nqemu-img map:", qemu, file=sys.stderr)
    sys.exit(1)
EOF
    # qemu:allocation-depth: 1 where the image holds data, 0 elsewhere.
    $T nbdinfo --map=qemu:allocation-depth "$U" > depth.nbd
    grep -q '^ *1048576 *1048576 *1 ' depth.nbd ||
        fail "allocation depth of written data is not 1"
    grep -q '^ *2097152 *2097152 *0 ' depth.nbd ||
        fail "allocation depth of a hole is not 0"

    $T nbdinfo --list "$U" > list.out
    grep -q 'export=""' list.out || fail "default export not listed"
fi

# nbdcopy both ways (out to a raw file, back into the export).
if command -v nbdcopy >/dev/null; then
    $T nbdcopy "$U" out.raw
    $QEMU_IMG compare -f raw -F qcow2 out.raw orig.qcow2
    $QEMU_IO -f raw -c 'write -P 0x5a 0 2M' out.raw >/dev/null
    $T nbdcopy out.raw "$U"
    $T $QEMU_IMG compare -f raw -F raw "$U" out.raw
fi
stop_server pid1 || fail "server did not stop on SIGTERM"
[ -e sock ] && fail "socket not removed at exit"
# After a clean shutdown the image is consistent and holds the data.
$QEMU_IMG check -q img.qcow2
if [ -e out.raw ]; then
    $QEMU_IMG compare -f qcow2 -F raw img.qcow2 out.raw
fi

# ---- TCP, raw, several named exports, one read-only server ----
$QEMU_IMG create -q -f raw a.raw 4M
$QEMU_IMG create -q -f raw b.raw 8M
$QEMU_IO -f raw -c 'write -P 0x61 0 4M' a.raw >/dev/null
port=$(free_port)
start_server pid2 -t -e 4 -b 127.0.0.1 -p "$port" -f raw \
    -x alpha -D "first disk" -x beta a.raw b.raw
$T $QEMU_IO -f raw -c 'read -P 0x61 0 4M' "nbd://127.0.0.1:$port/alpha" \
    > a.out
grep -q 'verification failed' a.out && fail "export alpha read wrong"
$T $QEMU_IO -f raw -c 'write -P 0x62 1M 1M' "nbd://127.0.0.1:$port/beta" \
    >/dev/null
$T $QEMU_IMG info -f raw "nbd://127.0.0.1:$port/beta" | grep -q '8 MiB' ||
    fail "export beta has the wrong size"
expect_status 1 $T $QEMU_IMG info -f raw "nbd://127.0.0.1:$port/nosuch"
if command -v nbdinfo >/dev/null; then
    $T nbdinfo --list "nbd://127.0.0.1:$port" > list2.out
    grep -q 'export="alpha"' list2.out || fail "alpha not listed"
    grep -q 'export="beta"' list2.out || fail "beta not listed"
    grep -q 'first disk' list2.out || fail "description not listed"
    grep -q 'can_multi_conn: true' list2.out ||
        fail "multi-conn not offered with --shared=4"
fi
stop_server pid2
$QEMU_IO -f raw -c 'read -P 0x62 1M 1M' b.raw | grep -q 'verification' &&
    fail "write to beta did not reach b.raw"

# ---- read-only export: writes are refused, nothing changes ----
cp a.raw ro.raw
start_server pid3 -t -r -f raw -k "$PWD/rosock" ro.raw
R="nbd+unix:///?socket=$PWD/rosock"
$T $QEMU_IO -f raw -r -c 'read -P 0x61 0 4M' "$R" | grep -q 'verification' &&
    fail "read-only export read wrong"
if $T $QEMU_IO -f raw -c 'write -P 0 0 64k' "$R" 2>&1 | grep -q 'wrote'; then
    fail "write to a read-only export succeeded"
fi
stop_server pid3
cmp a.raw ro.raw || fail "read-only export was modified"

# ---- without -t the server exits after its first client leaves ----
start_server pid4 -f raw -k "$PWD/once" a.raw
pid=$(cat pid4)
$T $QEMU_IMG info -f raw "nbd+unix:///?socket=$PWD/once" >/dev/null
for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
done
kill -0 "$pid" 2>/dev/null && fail "server without -t kept running"
[ -e pid4 ] && fail "pid file not removed at exit"

# ---- errors are reported ----
expect_status 1 "$VDISK" serve -k "$PWD/x" -l snap1 a.raw
expect_status 1 "$VDISK" serve -k "$PWD/x" nonexistent.qcow2
exit 0
