#!/usr/bin/env bash
# Hostile and broken NBD clients (bad magic, huge or unknown options, bad
# flags, truncated requests, requests past the end or over the size limit,
# unknown commands, clients vanishing mid-write) get the error the spec
# asks for or lose their own connection only: the server keeps serving
# other clients and the image does not change.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io python3 timeout
tmpdir

$QEMU_IMG create -q -f qcow2 img.qcow2 16M
$QEMU_IO -c 'write -P 0x77 0 16M' img.qcow2 >/dev/null
cp img.qcow2 orig.qcow2

timeout 30 "$VDISK" serve --fork --pid-file "$PWD/pid" -t -e 0 -f qcow2 \
    -k "$PWD/sock" img.qcow2
stop()
{
    local pid i
    pid=$(cat pid 2>/dev/null) || return 0
    kill "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "$pid"
}
cleanup_fn stop

cat > client.py <<'EOF'
import os, socket, struct, subprocess, sys

SOCK = sys.argv[1]
URI = "nbd+unix:///?socket=" + SOCK
SIZE = 16 << 20
INIT, OPTS, REPM = 0x4e42444d41474943, 0x49484156454F5054, 0x3e889045565a9
REQ, SIMPLE, STRUCT = 0x25609513, 0x67446698, 0x668e33ef
OPT_GO, OPT_SR, OPT_SET_META, OPT_ABORT = 7, 8, 10, 2
ERR_UNSUP, ERR_TOO_BIG, ERR_INVALID = 0x80000001, 0x80000009, 0x80000003
READ, WRITE, DISC, FLUSH, TRIM, CACHE, ZEROES, BS = range(8)

def check(cond, what):
    if not cond:
        print("FAIL:", what, file=sys.stderr)
        sys.exit(1)

def recvn(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError("closed after %d of %d bytes" % (len(b), n))
        b += c
    return b

def connect(flags=3):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(SOCK)
    m1, m2, hf = struct.unpack(">QQH", recvn(s, 18))
    check(m1 == INIT and m2 == OPTS and hf & 1, "greeting")
    s.sendall(struct.pack(">I", flags))
    return s

def opt(s, o, data=b""):
    s.sendall(struct.pack(">QII", OPTS, o, len(data)) + data)

def reply(s):
    magic, o, t, n = struct.unpack(">QIII", recvn(s, 20))
    check(magic == REPM, "option reply magic")
    return o, t, recvn(s, n)

def go(s, name=b"", structured=False, meta=()):
    if structured:
        opt(s, OPT_SR)
        check(reply(s)[1] == 1, "structured reply ack")
    if meta:
        q = b"".join(struct.pack(">I", len(m)) + m for m in meta)
        opt(s, OPT_SET_META, struct.pack(">I", len(name)) + name +
            struct.pack(">I", len(meta)) + q)
        while reply(s)[1] != 1:
            pass
    opt(s, OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    while True:
        o, t, d = reply(s)
        if t == 1:
            return
        check(t == 3, "GO reply type %x" % t)

def req(s, typ, off, length, flags=0, cookie=7, data=b""):
    s.sendall(struct.pack(">IHHQQI", REQ, flags, typ, cookie, off, length)
              + data)

def simple(s, cookie=7):
    magic, err, c = struct.unpack(">IIQ", recvn(s, 16))
    check(magic == SIMPLE and c == cookie, "simple reply header")
    return err

def chunk(s):
    magic, fl, t, c, n = struct.unpack(">IHHQI", recvn(s, 20))
    check(magic == STRUCT, "structured reply magic")
    return fl, t, c, recvn(s, n)

def closed(s):
    """True when the server closed the connection."""
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, socket.timeout):
        return False

def healthy():
    """Another client can still read the right data."""
    out = subprocess.run(["timeout", "30", "qemu-io", "-f", "raw", "-c",
                          "read -P 0x77 0 1M", URI],
                         capture_output=True, text=True)
    check(out.returncode == 0 and "verification failed" not in out.stdout
          and "read 1048576/1048576" in out.stdout,
          "server no longer serves: " + out.stdout + out.stderr)

# 1. Bad option magic: the connection dies, nothing else.
s = connect()
s.sendall(struct.pack(">QII", 0x1234, OPT_GO, 0))
check(closed(s), "bad magic closes the connection")
healthy()

# 2. Unknown client flags.
s = connect(flags=0x80)
check(closed(s), "unknown client flags close the connection")
healthy()

# 3. Huge option length: dropped without reading 4 GiB.
s = connect()
s.sendall(struct.pack(">QII", OPTS, OPT_GO, 0xffffffff))
check(closed(s), "huge option closes the connection")
healthy()

# 4. Oversized but skippable option: TOO_BIG, then the session goes on.
s = connect()
opt(s, 12345, b"x" * 200000)
check(reply(s)[1] == ERR_TOO_BIG, "oversized option gets TOO_BIG")
# 5. Unknown option: UNSUP, the session goes on.
opt(s, 4242, b"abc")
check(reply(s)[1] == ERR_UNSUP, "unknown option gets UNSUP")
# GO with a name length beyond the option: INVALID.
opt(s, OPT_GO, struct.pack(">I", 1000) + b"ab")
check(reply(s)[1] == ERR_INVALID, "bad GO name length gets INVALID")
go(s)
# 6. Read past the end: EINVAL; write past the end: ENOSPC and the
#    payload is consumed (the next request still parses).
req(s, READ, SIZE - 512, 1024)
check(simple(s) == 22, "read past the end gets EINVAL")
req(s, WRITE, SIZE - 512, 1024, data=b"\0" * 1024)
check(simple(s) == 28, "write past the end gets ENOSPC")
req(s, READ, 1 << 63, 1)
check(simple(s) == 22, "read at a huge offset gets EINVAL")
# 7. Oversized read: EINVAL, connection stays.
req(s, READ, 0, 64 << 20)
check(simple(s) == 22, "oversized read gets EINVAL")
# 8. Unknown command and unknown flags: EINVAL.
req(s, 99, 0, 512)
check(simple(s) == 22, "unknown command gets EINVAL")
req(s, READ, 0, 512, flags=0x80)
check(simple(s) == 22, "unknown flag gets EINVAL")
req(s, READ, 0, 512, flags=4)   # DF without structured replies
check(simple(s) == 22, "DF without structured replies gets EINVAL")
req(s, BS, 0, 512)
check(simple(s) == 22, "block status without contexts gets EINVAL")
# A valid read still works and returns the data.
req(s, READ, 4096, 512, cookie=99)
check(simple(s, 99) == 0, "read after errors")
check(recvn(s, 512) == b"\x77" * 512, "read data")
# 9. Oversized write: EINVAL, then the server hangs up (it cannot skip
#    32 MiB+ of payload it refuses to buffer).
req(s, WRITE, 0, 64 << 20)
check(simple(s) == 22, "oversized write gets EINVAL")
check(closed(s), "oversized write closes the connection")
healthy()

# 10. Truncated request header, then gone.
s = connect()
go(s)
s.sendall(struct.pack(">IHH", REQ, 0, WRITE))
s.close()
healthy()

# 11. Vanishing in the middle of a write payload: nothing is written.
s = connect()
go(s)
req(s, WRITE, 0, 1 << 20, data=b"\xee" * 1000)
s.close()
healthy()

# 12. Structured replies: errors come as ERROR chunks, block status with
#     REQ_ONE gives one extent no longer than asked.
s = connect()
go(s, structured=True, meta=(b"base:allocation",))
req(s, READ, SIZE, 512)
fl, t, c, d = chunk(s)
check(t == 0x8001 and fl & 1, "structured read error is an ERROR chunk")
check(struct.unpack(">I", d[:4])[0] == 22, "ERROR chunk carries EINVAL")
req(s, BS, 0, 4096, flags=8)
fl, t, c, d = chunk(s)
check(t == 5 and fl & 1 and len(d) == 12, "REQ_ONE gives one extent")
check(struct.unpack(">I", d[4:8])[0] <= 4096, "extent within the request")
req(s, READ, 0, 65536, flags=4)   # DF: exactly one data chunk
fl, t, c, d = chunk(s)
check(t == 1 and fl & 1 and len(d) == 8 + 65536, "DF read is one chunk")
req(s, DISC, 0, 0)
check(closed(s), "DISC closes the connection")

# 13. The old way in: NBD_OPT_EXPORT_NAME, without NO_ZEROES (124 bytes
#     of padding follow the size and flags); an unknown name hangs up.
s = connect(flags=1)
opt(s, 1, b"")
size, tflags = struct.unpack(">QH", recvn(s, 10))
check(size == SIZE and tflags & 1, "EXPORT_NAME reply")
check(recvn(s, 124) == b"\0" * 124, "EXPORT_NAME zero padding")
req(s, READ, 0, 512, cookie=5)
check(simple(s, 5) == 0 and recvn(s, 512) == b"\x77" * 512,
      "read after EXPORT_NAME")
s = connect()
opt(s, 1, b"nosuch")
check(closed(s), "EXPORT_NAME of an unknown export hangs up")
# A plain newstyle client may not send other options.
s = connect(flags=0)
opt(s, OPT_SR)
check(closed(s), "option other than EXPORT_NAME without fixed newstyle")

# 14. Many connections that never finish the handshake do not block
#     others (--shared=0: unlimited).
idle = [connect() for _ in range(8)]
healthy()
for s in idle:
    s.close()
# 15. Many requests in one send, good and bad mixed (the server takes
#     small requests already received in batches and sends their replies
#     together): every cookie is answered once, with its own error or
#     data, in both reply modes. The writes store what is already there.
for structured in (False, True):
    s = connect()
    go(s, structured=structured)
    expect, batch = {}, b""
    for i in range(96):
        cookie, off = 1000 + i, (i * 37 % 256) * 65536
        k = i % 8
        if k == 3:      # past the end
            batch += struct.pack(">IHHQQI", REQ, 0, READ, cookie, SIZE, 4096)
            expect[cookie] = 22
        elif k == 5:    # a write: its payload follows in the same send
            batch += struct.pack(">IHHQQI", REQ, 0, WRITE, cookie, off,
                                 4096) + b"\x77" * 4096
            expect[cookie] = 0
        elif k == 6:    # a bad flag on a write: payload read, EINVAL
            batch += struct.pack(">IHHQQI", REQ, 0x40, WRITE, cookie, off,
                                 512) + b"\x11" * 512
            expect[cookie] = 22
        elif k == 7:    # not a READ or WRITE: ends a batch
            batch += struct.pack(">IHHQQI", REQ, 0, FLUSH if i % 16 else 99,
                                 cookie, 0, 0)
            expect[cookie] = 0 if i % 16 else 22
        else:
            batch += struct.pack(">IHHQQI", REQ, 0, READ, cookie, off, 4096)
            expect[cookie] = "data"
    s.sendall(batch)
    seen = set()
    while len(seen) < len(expect):
        magic = struct.unpack(">I", recvn(s, 4))[0]
        if magic == STRUCT:
            fl, t, c, n = struct.unpack(">HHQI", recvn(s, 16))
            d = recvn(s, n)
            check(structured and fl & 1, "one chunk per reply here (DONE)")
            if t == 1:
                err, data = 0, d[8:]
            elif t == 0:
                err, data = 0, None
            else:
                check(t == 0x8001, "chunk type %x" % t)
                err, data = struct.unpack(">I", d[:4])[0], None
        else:
            # Structured replies are for reads and errors; other
            # successes may stay simple (the spec allows it).
            check(magic == SIMPLE, "reply magic %x" % magic)
            err, c = struct.unpack(">IQ", recvn(s, 12))
            data = recvn(s, 4096) if expect.get(c) == "data" and not err \
                else None
        check(c in expect and c not in seen, "cookie %d answered once" % c)
        seen.add(c)
        if expect[c] == "data":
            check(err == 0 and data == b"\x77" * 4096,
                  "pipelined read %d: error %d" % (c, err))
        else:
            check(err == expect[c], "pipelined request %d: error %d, not %d"
                  % (c, err, expect[c]))
    req(s, DISC, 0, 0)
    check(closed(s), "DISC after the pipelined requests")
healthy()
print("all bad-input cases passed")
EOF
timeout 240 python3 client.py "$PWD/sock"
stop
# Nothing above was allowed to change the image.
$QEMU_IMG compare -f qcow2 -F qcow2 img.qcow2 orig.qcow2
$QEMU_IMG check -q img.qcow2
exit 0
