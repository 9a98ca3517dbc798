# Helpers for the QMP tests that run one script against
# qemu-storage-daemon and `vdisk serve`: sourcing this file (after
# ../functions.sh and tmpdir) writes a Python module, qmplib, into the
# scratch directory and puts it on PYTHONPATH, so a test's Python
# (a heredoc) can `from qmplib import *`:
#
#   Monitor(argv, d, extra=[])  starts a daemon whose QMP socket is
#                               d/qmp.sock (stderr in d/log), negotiates
#   m.cmd(req)                  sends a request (text or object; "@D@"
#                               stands for the daemon's directory) and
#                               returns the reply, events set aside in
#                               m.events
#   m.close()                   kills the daemon
#   norm(x, d)                  x with the directory d replaced by "@D@"
#   shape(x)                    the key sets and JSON types of x
#   diff(a, b, ignore=())       the differences of two values, member by
#                               member, as a list of lines; lists of
#                               objects with a "node-name" (or "id") are
#                               matched by it, members named in ignore
#                               are skipped
#   outcome(reply, d)           ("return",) or ("error", class, text)
#
# Each test prints what it compared and exits non-zero on a difference.

qmp_lib()
{
cat > qmplib.py <<'PYEOF'
import json, os, re, socket, subprocess, time

class Monitor:
    def __init__(self, argv, d, extra=()):
        self.d = d
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, "qmp.sock")
        if os.path.exists(path):
            os.unlink(path)
        self.proc = subprocess.Popen(
            list(argv) + list(extra) +
            ["--chardev", "socket,id=qmpmon,path=%s,server=on,wait=off" % path,
             "--monitor", "chardev=qmpmon"],
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(d, "log"), "w"))
        # The socket file appears at bind(), before listen(): retry a
        # refused connection (slow under the sanitizers) for 20 s.
        for _ in range(800):
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(60)
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if self.proc.poll() is not None:
                    raise SystemExit("%s exited: %s" % (argv[0], open(os.path.join(d, "log")).read()))
                time.sleep(0.025)
        self.f = self.sock.makefile("rw")
        self.events = []
        self.greeting = json.loads(self.f.readline())
        self.cmd('{"execute": "qmp_capabilities"}')

    def cmd(self, req):
        if not isinstance(req, str):
            req = json.dumps(req)
        self.f.write(req.replace("@D@", self.d) + "\n")
        self.f.flush()
        while True:
            line = self.f.readline()
            if not line:
                raise SystemExit("monitor of %s closed" % self.d)
            msg = json.loads(line)
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

def norm(x, d):
    if isinstance(x, dict):
        return {k: norm(v, d) for k, v in x.items()}
    if isinstance(x, list):
        return [norm(v, d) for v in x]
    if isinstance(x, str):
        return x.replace(d, "@D@")
    return x

def shape(x):
    if isinstance(x, dict):
        return {k: shape(v) for k, v in x.items()}
    if isinstance(x, list):
        return [shape(v) for v in x]
    if isinstance(x, bool):
        return "bool"
    if isinstance(x, int):
        return "int"
    return type(x).__name__

AUTO = re.compile(r"^#block[0-9]+$")

def _key(x):
    # Nodes named by the block layer (#blockNNN) differ between the two
    # by construction: they are matched by what they open instead.
    if isinstance(x, dict):
        n = x.get("node-name") or x.get("id")
        if n and AUTO.match(n):
            return "%s:%s:%s" % (n[:6], x.get("drv"), x.get("file"))
        return n
    return None

def diff(a, b, ignore=(), path=""):
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k in ignore:
                continue
            if k not in a or k not in b:
                out.append("%s.%s only in %s" % (path, k, "qemu" if k in a else "vdisk"))
            else:
                out += diff(a[k], b[k], ignore, path + "." + k)
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return ["%s: %d vs %d elements" % (path, len(a), len(b))]
        if a and all(_key(x) for x in a + b):
            a = sorted(a, key=_key)
            b = sorted(b, key=_key)
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += diff(x, y, ignore, "%s[%s]" % (path, _key(x) or i))
        return out
    if type(a) != type(b) and not (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                   and not isinstance(a, bool) and not isinstance(b, bool)):
        return ["%s: %r vs %r" % (path, a, b)]
    if isinstance(a, str) and AUTO.match(a) and AUTO.match(b):
        return []
    return [] if a == b else ["%s: %r vs %r" % (path, a, b)]

def outcome(msg, d):
    if "error" in msg:
        return ("error", msg["error"]["class"], msg["error"]["desc"].replace(d, "@D@"))
    return ("return",)
PYEOF
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
}
