#!/usr/bin/env bash
# The QMP monitor under hostile clients: commands before negotiation,
# malformed JSON, a line over the 1 MiB limit, deep nesting, NUL bytes,
# a client that vanishes mid-line or before reading its reply, and many
# clients at once. Each client gets QEMU's error replies and the daemon
# keeps serving everyone else.
source "$(dirname "$0")/../functions.sh"
requires python3 timeout
tmpdir

timeout 120 "$VDISK" serve --qmp "unix:$PWD/qmp.sock" > daemon.log 2>&1 &
daemon=$!
cleanup_fn sh -c "kill $daemon 2>/dev/null; true"

timeout 100 python3 - "$PWD/qmp.sock" <<'PYEOF' || fail "bad input broke the monitor"
import json, socket, sys, threading, time

path = sys.argv[1]

def connect():
    s = socket.socket(socket.AF_UNIX)
    for _ in range(100):
        try:
            s.connect(path)
            break
        except OSError:
            time.sleep(0.05)
    s.settimeout(30)
    f = s.makefile("rb", buffering=0)
    f.sock = s
    assert "QMP" in json.loads(f.readline())
    return s, f

def send(f, raw):
    # A raw socket file may write short: sendall never does.
    f.sock.sendall(raw if isinstance(raw, bytes) else raw.encode())

def reply(f):
    while True:
        r = json.loads(f.readline())
        if "event" not in r:
            return r

def err(f, raw, cls="GenericError"):
    send(f, raw)
    r = reply(f)
    assert "error" in r and r["error"]["class"] == cls, (raw[:80], r)
    return r["error"]["desc"]

s, f = connect()
# Before negotiation only qmp_capabilities runs.
d = err(f, '{"execute": "query-version"}\n', "CommandNotFound")
assert "qmp_capabilities" in d, d
send(f, '{"execute": "qmp_capabilities"}\n')
assert reply(f) == {"return": {}}

err(f, '{"execute": \n')
err(f, 'not json at all\n')
err(f, '[1, 2, 3]\n')
err(f, '"just a string"\n')
err(f, '{"execute": 42}\n')
err(f, '{"execute": "quit", "arguments": [1]}\n')
err(f, '{"arguments": {}}\n')
err(f, '{"execute": "query-version", "bogus": 1}\n')
err(f, '{"execute": "nope", "id": 1}\n', "CommandNotFound")
err(f, '{"execute": "blockdev-add", "arguments": {"driver": "qcow2"}}\n')
err(f, '{"execute": "blockdev-add", "arguments": {"driver": "vmdk"}}\n')
err(f, '{"execute": "blockdev-add", "arguments": {"driver": "file", '
       '"node-name": "x", "filename": "/nonexistent/file"}}\n')
err(f, '{"execute": "blockdev-del", "arguments": {"node-name": 7}}\n')
err(f, '{"execute": "block-export-del", "arguments": {"id": "x", '
       '"mode": "gentle"}}\n')
err(f, '[' * 100000 + ']' * 100000 + '\n')
err(f, b'{"execute": "qu\x00it"}\n')
err(f, b'\xff\xfe\x80{}\n')
# A line over the limit is refused once, then the session goes on.
err(f, '{"execute": "query-version", "id": "' + 'x' * (2 << 20) + '"}\n')
send(f, '\n\n   \n{"execute": "query-version", "id": 5}\n')
r = reply(f)
assert r["id"] == 5 and "qemu" in r["return"], r

# A client that leaves mid-line, and one that leaves before its reply.
s2, f2 = connect()
send(f2, '{"execute": "qmp_capabilities"}\n{"execute": "query-ver')
s2.close()
s3, f3 = connect()
send(f3, '{"execute": "qmp_capabilities"}\n'
         '{"execute": "query-named-block-nodes"}\n' * 50)
s3.shutdown(socket.SHUT_RDWR)
s3.close()

# Many clients at once, each running commands.
def worker(i, bad):
    try:
        c, cf = connect()
        send(cf, '{"execute": "qmp_capabilities"}\n')
        assert reply(cf) == {"return": {}}
        for j in range(20):
            send(cf, '{"execute": "query-commands", "id": %d}\n' % j)
            r = reply(cf)
            assert r["id"] == j and len(r["return"]) > 5, r
        c.close()
    except Exception as e:
        bad.append(repr(e))

bad = []
ts = [threading.Thread(target=worker, args=(i, bad)) for i in range(8)]
for t in ts:
    t.start()
for t in ts:
    t.join()
assert not bad, bad

# The first client is still served.
send(f, '{"execute": "query-block-exports"}\n')
assert reply(f) == {"return": []}
send(f, '{"execute": "quit"}\n')
assert reply(f) == {"return": {}}
PYEOF

for ((i = 0; i < 100; i++)); do
    kill -0 "$daemon" 2>/dev/null || break
    sleep 0.1
done
kill -0 "$daemon" 2>/dev/null && fail "daemon still running after quit"
wait "$daemon" || fail "daemon exited with status $?"
exit 0
