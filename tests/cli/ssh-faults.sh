#!/usr/bin/env bash
# Faults of the ssh driver against a throwaway sshd: authentication
# failures (no agent, an agent without the key, a user the server
# refuses) with QEMU's messages; a server killed mid-convert and a server
# that stops answering (SIGSTOP) give an error naming the server within
# the timeout, never a hang; a broken session fails its later requests.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
source "$(dirname "$0")/ssh-server.bash"
requires qemu-img
ssh_test_begin
# Random data, so that convert writes (and is rate-limited) throughout.
head -c $((8 * 1024 * 1024)) /dev/urandom >"$D/a.raw"

# Authentication: only the agent's key is authorised.
(unset SSH_AUTH_SOCK; same info "$U/a.raw$NO")
grep -q 'failed to authenticate' v.out || fail "no agent: not refused"
empty=$(ssh-agent -s -a "$PWD/empty-agent.sock" |
        sed -n 's/^SSH_AGENT_PID=\([0-9]*\);.*/\1/p')
cleanup_fn gone "$empty"
SSH_AUTH_SOCK=$PWD/empty-agent.sock same info "$U/a.raw$NO"
grep -q 'failed to authenticate' v.out || fail "empty agent: not refused"
same info "ssh://nobody@127.0.0.1:$SSH_PORT$D/a.raw$NO"

# Waits (at most 20 s) until FILE has data (allocated blocks: convert
# creates its target at full size first): the request stream is under
# way, past the open.
has_data()
{
    local i
    for i in $(seq 200); do
        if [ -e "$1" ] && [ "$(stat -c %b "$1")" -gt 0 ]; then
            return 0
        fi
        sleep 0.1
    done
    fail "nothing was written to $1"
}

# Starts a convert of the image (one 2 MiB chunk read at a time and its
# writes rate-limited, so that it runs for seconds) into $2 with its
# stderr in $3, waits until it has written data and sends signal $1 to
# the server's processes of the connection ($pids); $conv is the
# convert's PID.
convert_then()
{
    "$VDISK" convert -m 1 -r 1M -O raw "$U/a.raw$NO" "$2" 2>"$3" &
    conv=$!
    cleanup_fn gone "$conv"
    has_data "$2"
    pids=$(ssh_session_pids)
    cleanup_fn gone $pids
    kill "-$1" $pids
}

# The server dies in the middle of a convert: a clear error naming the
# image, exit 1, no hang.
export VDISK_SSH_TIMEOUT=3
start=$SECONDS
convert_then KILL out.raw err.txt
expect_status 1 wait "$conv"
cat err.txt
grep -q "^WARNING: $U/a.raw: ssh server 127.0.0.1:$SSH_PORT closed" err.txt ||
    fail "the error does not name the image"
[ $((SECONDS - start)) -lt 15 ] || fail "convert took too long to fail"

# The server stops answering (its connection processes stopped): the
# watchdog's timeout ends the request.
start=$SECONDS
convert_then STOP out2.raw err2.txt
expect_status 1 wait "$conv"
kill -CONT $pids
cat err2.txt
grep -q "did not answer a read request within 3 s" err2.txt ||
    fail "a silent server did not time out"
[ $((SECONDS - start)) -lt 15 ] || fail "the timeout took too long"

# A server that accepts the connection but never speaks (sshd stopped):
# the open times out too.
start=$SECONDS
kill -STOP "$SSHD_PID"
expect_status 1 "$VDISK" info "$U/a.raw$NO" 2>err3.txt
kill -CONT "$SSHD_PID"
cat err3.txt
grep -q "ssh server 127.0.0.1:$SSH_PORT did not answer within 3 s" err3.txt ||
    fail "a silent server did not time out at open"
[ $((SECONDS - start)) -lt 10 ] || fail "the open's timeout took too long"

# A session whose server went away mid-session: every later request of
# the same open fails at once (the first one read, then the kill).
"$VDISK" io -f raw -c 'read 0 64k' -c 'sleep 3000' -c 'read 0 64k' \
    -c 'read 64k 64k' "$U/a.raw$NO" >io.out 2>&1 &
io=$!
cleanup_fn gone "$io"
has_data io.out
pids=$(ssh_session_pids)
kill -9 $pids
wait "$io" || true
cat io.out
[ "$(grep -c 'failed' io.out)" = 2 ] || fail "later reads did not fail"
exit 0
