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
# For the job tests (a chain base <- mid <- top of qcow2 images with data
# in every layer, the same script against both daemons):
#   make_chain(d, qemu_img)     creates it in d, and d/before.raw, what
#                               the top shows before any job
#   add_chain(m)                blockdev-add of the three as base, mid, top
#   wait_status(m, job, want)   polls query-jobs until the job's status
#                               is in want (None: gone)
#   wait_progress(m)            until the (only) job has copied a piece
#                               and sleeps for its speed limit
#   chain_state(d, qemu_img)    the top's chain (qemu-img info), whether
#                               it shows before.raw, whether check is clean
#   compare_jobs(scenarios, top, vdisk, qemu_img)
#                               runs each scenario f(m, d, log) once in
#                               each daemon on a fresh chain and compares
#                               the logged replies, the event sequences
#                               and chain_state; returns the differences
#                               (a scenario whose top shows other data
#                               afterwards on purpose sets f.top_changes;
#                               f.post(d), if set, returns more log
#                               entries made once the daemon has exited;
#                               f.events_by_job compares each job's events
#                               apart, for jobs running side by side)
#
# Each test prints what it compared and exits non-zero on a difference.

qmp_lib()
{
cat > qmplib.py <<'PYEOF'
import json, os, re, socket, subprocess, time

class _NoAnswer(Exception):
    pass

class Monitor:
    def __init__(self, argv, d, extra=()):
        # QEMU's daemon (the referee, not what is tested) once took the
        # greeting and then did not answer qmp_capabilities for 60 s
        # with nothing in its log, on a quiet machine: started again
        # once. vdisk's own daemon gets no second chance.
        tries = 2 if os.path.basename(argv[0]) == "qemu-storage-daemon" else 1
        for attempt in range(tries):
            try:
                self._start(argv, d, extra, retry=attempt + 1 < tries)
                return
            except _NoAnswer:
                self.close()

    def _start(self, argv, d, extra, retry):
        self.d = d
        self.argv = list(argv)
        self.retry = retry
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
        # Separate reader and writer: a text file open for both drops
        # what it has read ahead (events that came with a reply) when it
        # is written to next.
        self.f = self.sock.makefile("r")
        self.fw = self.sock.makefile("w")
        self.events = []
        self.greeting = json.loads(self.f.readline())
        self.cmd('{"execute": "qmp_capabilities"}')
        self.retry = False

    def cmd(self, req):
        if not isinstance(req, str):
            req = json.dumps(req)
        self.fw.write(req.replace("@D@", self.d) + "\n")
        self.fw.flush()
        while True:
            try:
                line = self.f.readline()
            except TimeoutError:
                self.proc.kill()
                if self.retry:
                    print("%s: no answer to %s within 60 s: started again"
                          % (self.argv[0], req[:200]), flush=True)
                    raise _NoAnswer()
                raise SystemExit("%s: no answer to %s within 60 s; its log: %s"
                                 % (self.argv[0], req[:200], open(os.path.join(self.d, "log")).read()[-2000:]))
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

def _run(*a):
    subprocess.run(a, check=True, stdout=subprocess.DEVNULL)

def make_chain(d, qemu_img):
    os.makedirs(d)
    _run(qemu_img, "create", "-q", "-f", "qcow2", d + "/base.qcow2", "4M")
    _run("qemu-io", "-c", "write -P 0x11 0 2M", d + "/base.qcow2")
    _run(qemu_img, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F",
         "qcow2", d + "/mid.qcow2")
    _run("qemu-io", "-c", "write -P 0x22 1M 1M", "-c",
         "write -P 0x23 3M 512k", d + "/mid.qcow2")
    _run(qemu_img, "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F",
         "qcow2", d + "/top.qcow2")
    _run("qemu-io", "-c", "write -P 0x33 1536k 64k", d + "/top.qcow2")
    _run(qemu_img, "convert", "-O", "raw", d + "/top.qcow2", d + "/before.raw")

def add_chain(m):
    for n, b in (("base", None), ("mid", "base"), ("top", "mid")):
        a = {"driver": "qcow2", "node-name": n,
             "file": {"driver": "file", "filename": "@D@/%s.qcow2" % n}}
        if b:
            a["backing"] = b
        m.cmd({"execute": "blockdev-add", "arguments": a})

def wait_status(m, job, want, secs=60):
    end = time.time() + secs
    while time.time() < end:
        r = m.cmd({"execute": "query-jobs"})["return"]
        st = [j["status"] for j in r if j["id"] == job]
        if (st[0] if st else None) in want:
            return st[0] if st else None
        time.sleep(0.02)
    raise SystemExit("job %s never reached %s" % (job, want))

def wait_progress(m, secs=60):
    # QEMU copies its first piece before the start command returns.
    end = time.time() + secs
    while time.time() < end:
        r = m.cmd({"execute": "query-block-jobs"})["return"]
        if r and r[0]["offset"] > 0 and not r[0]["busy"]:
            return
        time.sleep(0.02)
    raise SystemExit("the job made no progress")

def chain_state(d, qemu_img):
    info = subprocess.run([qemu_img, "info", "--backing-chain", "--output=json",
                           d + "/top.qcow2"], capture_output=True, text=True).stdout
    chain = [norm([i["filename"], i.get("backing-filename"),
                   i.get("backing-filename-format")], d)
             for i in json.loads(info)]
    cmp = subprocess.run([qemu_img, "compare", "-f", "raw", "-F", "qcow2",
                          d + "/before.raw", d + "/top.qcow2"],
                         capture_output=True, text=True)
    chk = subprocess.run([qemu_img, "check", d + "/top.qcow2"],
                         capture_output=True, text=True)
    return chain, cmp.returncode, chk.returncode

def bitmap_digests(img):
    """{name: sha256} of every bitmap of qcow2 image @img as
    qemu-storage-daemon computes them (x-debug-block-dirty-bitmap-sha256),
    and their BlockDirtyInfo without the digests."""
    m = Monitor(["qemu-storage-daemon", "--blockdev",
                 "qcow2,node-name=n,read-only=on,file.driver=file,"
                 "file.filename=" + img], img + ".qsd")
    r = m.cmd({"execute": "query-named-block-nodes", "arguments": {"flat": True}})
    infos = [x.get("dirty-bitmaps", []) for x in r["return"] if x["node-name"] == "n"][0]
    out = {}
    for bm in infos:
        h = m.cmd({"execute": "x-debug-block-dirty-bitmap-sha256",
                   "arguments": {"node": "n", "name": bm["name"]}})
        out[bm["name"]] = h.get("return", h.get("error"))
    m.cmd({"execute": "quit"})
    m.proc.wait(timeout=30)
    m.close()
    return out, infos

def compare_jobs(scenarios, top, vdisk, qemu_img):
    failed = []
    for sc in scenarios:
        before = len(failed)
        res = {}
        for name, argv in (("qemu", ["qemu-storage-daemon"]),
                           ("vdisk", [vdisk, "serve"])):
            d = os.path.join(top, "%s-%s" % (sc.__name__, name))
            make_chain(d, qemu_img)
            m = Monitor(argv, d)
            log = []
            sc(m, d, log)
            m.cmd({"execute": "quit"})
            m.proc.wait(timeout=60)
            m.close()
            if getattr(sc, "post", None):
                log += sc.post(d)
            evs = [(e["event"], norm(e.get("data"), d)) for e in m.events]
            if getattr(sc, "events_by_job", False):
                # Jobs running side by side interleave their events as
                # timing goes: compare each job's own sequence.
                by = {}
                for ev, data in evs:
                    key = (data or {}).get("id") or (data or {}).get("device")
                    by.setdefault(str(key), []).append((ev, data))
                evs = sorted(by.items())
            res[name] = ([outcome(x, d) if isinstance(x, dict) and
                          ("error" in x or x.get("return") == {})
                          else norm(x, d) for x in log],
                         evs, chain_state(d, qemu_img))
        q, v = res["qemu"], res["vdisk"]
        for i, (a, b) in enumerate(zip(q[0], v[0])):
            dd = diff(a, b)
            if dd:
                failed.append("%s reply %d: %s" % (sc.__name__, i, dd))
        if len(q[0]) != len(v[0]):
            failed.append("%s: %d vs %d replies" % (sc.__name__, len(q[0]), len(v[0])))
        if q[1] != v[1]:
            failed.append("%s events:\n  qemu  %s\n  vdisk %s" % (sc.__name__, q[1], v[1]))
        if q[2] != v[2]:
            failed.append("%s images: qemu %s, vdisk %s" % (sc.__name__, q[2], v[2]))
        if (v[2][1] != 0 and not getattr(sc, "top_changes", False)) or v[2][2] != 0:
            failed.append("%s: vdisk's top differs from before (compare %d) or "
                          "check fails (%d)" % (sc.__name__, v[2][1], v[2][2]))
        print("%-12s %2d replies, %2d events, chain of %d: %s" % (
            sc.__name__, len(v[0]), len(v[1]), len(v[2][0]),
            "same" if len(failed) == before else "DIFFERENT"))
    return failed
PYEOF
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
}
