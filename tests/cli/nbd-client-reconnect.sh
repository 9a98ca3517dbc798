#!/usr/bin/env bash
# The nbd client when its server dies: with reconnect-delay, a convert
# reading from (and one writing to) a qemu-nbd that is killed and
# restarted mid-copy (and an nbdkit, which offers multi-conn) finishes
# with every byte right, no request lost;
# past the delay, or without one, the copy fails with an error and exit
# status 1, never a hang.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/nbd-servers.bash"
requires qemu-img qemu-nbd python3 timeout
tmpdir

T="timeout 60"
nbds_requires_client

head -c $((24 << 20)) /dev/urandom > src.raw
truncate -s 32M src.raw
P=$(nbds_free_port)
start() { nbds_qemu_nbd pid "$P" -f raw "$@" || fail "qemu-nbd on $P"; }
opts() {
    echo "driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=127.0.0.1,file.server.port=$P$1"
}

# run_killed WHAT CMD...: runs CMD in the background (a rate-limited
# convert), kills the server 0.5 s in and checks CMD was still running,
# restarts it after RESTART_AFTER seconds (none when empty), waits for CMD
# (bounded); leaves its exit status in ST.
run_killed()
{
    local what=$1 c
    shift
    "$@" > run.out 2>&1 &
    c=$!
    sleep 0.5
    kill -0 $c 2>/dev/null || fail "$what: finished before the server died"
    nbds_kill pid
    if [ -n "$RESTART_AFTER" ]; then
        sleep "$RESTART_AFTER"
        kill -0 $c 2>/dev/null || fail "$what: gave up while the server was down: $(cat run.out)"
        start "$IMG"
    fi
    ST=0
    wait $c || ST=$?
    [ "$ST" = 124 ] && fail "$what: hung"
    return 0
}

# Reading: killed and back within reconnect-delay.
IMG=src.raw
start "$IMG"
RESTART_AFTER=1
run_killed "read" $T "$VDISK" convert -r 12M -O raw --image-opts \
    "$(opts ,file.reconnect-delay=10)" out.raw
[ "$ST" = 0 ] || fail "convert across a server restart: exit $ST: $(cat run.out)"
cmp src.raw out.raw || fail "convert across a server restart: data differs"

# Writing: every write lands, also those in flight when the server died.
truncate -s 32M dst.raw
nbds_stop pid
IMG=dst.raw
start "$IMG"
run_killed "write" $T "$VDISK" convert -n -r 12M src.raw \
    --target-image-opts "$(opts ,file.reconnect-delay=10)"
[ "$ST" = 0 ] || fail "write across a server restart: exit $ST: $(cat run.out)"
nbds_stop pid
cmp src.raw dst.raw || fail "write across a server restart: data lost"

# nbdkit offers multi-conn: every connection is replaced.
if command -v nbdkit >/dev/null; then
    start() { nbds_nbdkit pid "$P" --readonly file "$IMG" || fail "nbdkit on $P"; }
    IMG=src.raw
    start
    rm -f out.raw
    run_killed "multi-conn" $T "$VDISK" convert -r 12M -O raw --image-opts \
        "$(opts ,file.reconnect-delay=10)" out.raw
    [ "$ST" = 0 ] || fail "multi-conn restart: exit $ST: $(cat run.out)"
    cmp src.raw out.raw || fail "multi-conn restart: data differs"
    nbds_stop pid
    start() { nbds_qemu_nbd pid "$P" -f raw "$@" || fail "qemu-nbd on $P"; }
fi

# No reconnect-delay: the first loss is final, exit 1 with a message.
start src.raw
RESTART_AFTER=
rm -f out.raw
run_killed "no delay" $T "$VDISK" convert -r 12M -O raw --image-opts \
    "$(opts)" out.raw
[ "$ST" = 1 ] || fail "server killed, no reconnect-delay: exit $ST: $(cat run.out)"
grep -q 'error while reading' run.out || fail "no delay: $(cat run.out)"

# A delay that runs out: fails after it, not before, not never.
start src.raw
SECONDS=0
run_killed "delay runs out" $T "$VDISK" convert -r 12M -O raw --image-opts \
    "$(opts ,file.reconnect-delay=2)" out.raw
[ "$ST" = 1 ] || fail "reconnect-delay ran out: exit $ST: $(cat run.out)"
[ "$SECONDS" -ge 2 ] || fail "gave up before reconnect-delay passed"
grep -q 'error while reading' run.out || fail "delay ran out: $(cat run.out)"

# vdisk io names the server in its message.
expect_status 1 $T "$VDISK" io -f raw -c 'read 0 64k' \
    "nbd://127.0.0.1:$P" 2> io.err
grep -q "127.0.0.1:$P" io.err || fail "no server: $(cat io.err)"

# open-timeout: the server may come up while the client waits.
cleanup_fn nbds_stop pid
(sleep 1; start src.raw) &
starter=$!
$T "$VDISK" info --image-opts "$(opts ,file.open-timeout=10)" > late.out ||
    fail "open-timeout: $(cat late.out)"
wait $starter
grep -q '32 MiB' late.out || fail "open-timeout: $(cat late.out)"
nbds_stop pid
exit 0
