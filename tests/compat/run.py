#!/usr/bin/env python3
# The compatibility runner: QEMU's tools against vdisk's QEMU names.
"""The compatibility runner: QEMU's four tools against vdisk's four names.

Every case file (tests/compat/*.cases) is a script of tool invocations.
It runs twice, in the same freshly made scratch directory: once with
QEMU's qemu-img, qemu-io, qemu-nbd and qemu-storage-daemon, once with
vdisk's symlinks of those names first on PATH. For every compared line
the standard output, the standard error and the exit status of the two
runs must match once paths, timings and throughput figures (and the
version line) are filtered, and disk sizes (what the filesystem reports a
file occupies, which varies by a block between two runs of the same tool)
are taken as equal within 16 KiB; the differences kept on purpose are
listed, with the reason each is better for users, in
tests/compat/known-differences and reported apart from the failures.

Syntax of a case file (one invocation per line, run by bash in the
scratch directory, whose absolute path is also $DIR):

    # a comment                (blank lines are ignored too)
    qemu-img info a.qcow2      compared: stdout, stderr, exit status
    $ qemu-img create ...      set-up: run with QEMU's tools in both runs,
                               not compared, must exit 0
    = qemu-img info a.qcow2    compared, but with QEMU's tools in both runs:
                               a client of a server under test, or a look
                               at what the tool under test left behind
    @bg NAME SOCKET COMMAND    start COMMAND (the tool under test) in the
                               background and wait until the file SOCKET
                               exists (or the command exits)
    @stop NAME                 send it SIGTERM; its stdout, stderr and exit
                               status are compared, as the @bg line's

A line ending in a backslash continues on the next. A line may use
pipes, redirections and several tools. A server started with --fork must
be stopped by the script itself (e.g. `kill $(cat s.pid)`); as a safety
net, each run ends by killing the processes named in the scratch
directory's *.pid files.

Usage: run.py [--vdisk DIR] [--qemu DIR] [--known FILE] [--keep]
              [--jobs N] [-v] CASEFILE...
    --vdisk DIR   the directory of vdisk's qemu-* symlinks
                  (default: $VDISK_QEMU_COMPAT)
    --qemu DIR    where QEMU's tools are (default: where PATH finds qemu-img)
    --keep        keep the scratch directories (their paths are printed)
Exit status: 0 when every compared line matches or is a listed known
difference and every listed difference still exists, 1 otherwise, 77
when QEMU's tools are missing.
"""

import argparse
import difflib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

TOOLS = ("qemu-img", "qemu-io", "qemu-nbd", "qemu-storage-daemon")
LINE_TIMEOUT = 15       # seconds for one invocation
READY_TIMEOUT = 15      # seconds for a background server's socket
STOP_TIMEOUT = 15       # seconds for a server to exit after SIGTERM


# ---- reading the case files ----

class Case:
    """One line of a case file."""

    def __init__(self, path, lineno, kind, text, cmd, name=None, sock=None):
        self.path = path          # the case file
        self.lineno = lineno      # its first line
        self.kind = kind          # run, setup, ref, bg, stop
        self.text = text          # the line as written (the key of
                                  # known-differences)
        self.cmd = cmd
        self.name = name          # bg/stop: the server's name
        self.sock = sock          # bg: the file that says it is ready

    def where(self):
        return "%s:%d" % (os.path.basename(self.path), self.lineno)


def read_cases(path):
    cases, bgs = [], {}
    with open(path) as f:
        lines = f.read().split("\n")
    i = 0
    while i < len(lines):
        lineno = i + 1
        line = lines[i]
        i += 1
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + lines[i].strip()
            i += 1
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text.startswith("$ "):
            cases.append(Case(path, lineno, "setup", text, text[2:]))
        elif text.startswith("= "):
            cases.append(Case(path, lineno, "ref", text, text[2:]))
        elif text.startswith("@bg "):
            parts = text.split(None, 3)
            if len(parts) < 4:
                raise SyntaxError("%s:%d: @bg NAME SOCKET COMMAND"
                                  % (path, lineno))
            c = Case(path, lineno, "bg", text, parts[3], parts[1], parts[2])
            bgs[parts[1]] = c
            cases.append(c)
        elif text.startswith("@stop "):
            name = text.split(None, 1)[1].strip()
            if name not in bgs:
                raise SyntaxError("%s:%d: @stop of unknown server '%s'"
                                  % (path, lineno, name))
            cases.append(Case(path, lineno, "stop", text, None, name))
        elif text.startswith("@"):
            raise SyntaxError("%s:%d: unknown directive: %s"
                              % (path, lineno, text))
        else:
            cases.append(Case(path, lineno, "run", text, text))
    return cases


def read_known(path):
    """known-differences: one or more case lines (at column 0), then the
    reason, indented. Returns {case text: reason}."""
    known, pending, reason = {}, [], []

    def flush():
        if pending:
            if not reason:
                raise SyntaxError("%s: no reason given for: %s"
                                  % (path, pending[0]))
            for p in pending:
                known[p] = " ".join(reason)
        pending.clear()
        reason.clear()

    if not os.path.exists(path):
        return known
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip() or line.startswith("#"):
                continue
            if line[0] in " \t":
                reason.append(line.strip())
            else:
                if reason:
                    flush()
                pending.append(line.strip())
    flush()
    return known


# ---- filtering ----

def make_filter(scratch, bindirs):
    subs = [
        # qemu-io's statistics: keep bytes and ops, not time and rates.
        # (Past an hour the time has no " sec".)
        (re.compile(r"^(.*(?: bytes?|B), \d+ ops); [0-9:.]+(?: sec)? "
                    r"\(.*\)$", re.M),
         r"\1; TIME sec (RATE)"),
        (re.compile(r"^(\d+),(\d+),[0-9:.]+,[0-9.]+,[0-9.]+$", re.M),
         r"\1,\2,TIME,RATE,RATE"),
        # qemu-img bench.
        (re.compile(r"^Run completed in [0-9.]+ seconds\.$", re.M),
         "Run completed in TIME seconds."),
        # Snapshot dates and VM clocks (qemu-img snapshot -l, info).
        (re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"), "DATE"),
        (re.compile(r'"date-(sec|nsec)": \d+'), r'"date-\1": N'),
        # The version line: the release and the build say who answers.
        (re.compile(r"^(qemu-img|qemu-io|qemu-storage-daemon) version "
                    r"\d+\.\d+\.\d+( \(.*\))?$", re.M),
         r"\1 version VERSION"),
        (re.compile(r"^qemu-nbd \d+\.\d+\.\d+( \(.*\))?$", re.M),
         "qemu-nbd VERSION"),
    ]
    paths = [(scratch, "$DIR")] + [(d, "$BINDIR") for d in bindirs]

    def filt(text):
        for p, name in paths:
            text = text.replace(p, name)
        for rx, rep in subs:
            text = rx.sub(rep, text)
        return text
    return filt


# ---- running one pass ----

class Result:
    def __init__(self, out, err, rc):
        self.out, self.err, self.rc = out, err, rc


def decode(b):
    return b.decode("utf-8", "backslashreplace")


def run_pass(cases, scratch, tool_path, ref_path, log):
    """Runs every case in @scratch; returns {index: Result} for compared
    lines and a list of set-up failures."""
    results, problems, servers = {}, [], {}
    env_base = dict(os.environ, DIR=scratch, LC_ALL="C")

    def env_for(path):
        return dict(env_base, PATH=path)

    for idx, c in enumerate(cases):
        if c.kind in ("run", "ref", "setup"):
            path = tool_path if c.kind == "run" else ref_path
            start = time.monotonic()
            r = run_line(c.cmd, scratch, env_for(path))
            log.append((c, time.monotonic() - start))
            if c.kind == "setup":
                if r.rc != 0:
                    problems.append("%s: set-up failed (status %s): %s\n%s%s"
                                    % (c.where(), r.rc, c.cmd, r.out, r.err))
            else:
                results[idx] = r
        elif c.kind == "bg":
            outf = tempfile.TemporaryFile()
            errf = tempfile.TemporaryFile()
            p = subprocess.Popen(["bash", "-c", "exec " + c.cmd],
                                 cwd=scratch, env=env_for(tool_path),
                                 stdin=subprocess.DEVNULL, stdout=outf,
                                 stderr=errf, start_new_session=True)
            servers[c.name] = (p, outf, errf, idx)
            sock = os.path.join(scratch, c.sock)
            deadline = time.monotonic() + READY_TIMEOUT
            while (not os.path.exists(sock) and p.poll() is None and
                   time.monotonic() < deadline):
                time.sleep(0.01)
        elif c.kind == "stop":
            p, outf, errf, bidx = servers.pop(c.name)
            results[bidx] = stop_server(p, outf, errf)
    for name, (p, outf, errf, bidx) in servers.items():
        results[bidx] = stop_server(p, outf, errf)
        problems.append("server '%s' was never stopped (@stop %s)"
                        % (name, name))
    kill_pid_files(scratch)
    return results, problems


def run_line(cmd, cwd, env):
    # Files rather than pipes: a daemon the line forks may keep them open,
    # and only the line's own process is waited for.
    with tempfile.TemporaryFile() as outf, tempfile.TemporaryFile() as errf:
        p = subprocess.Popen(["bash", "-c", cmd], cwd=cwd, env=env,
                             stdin=subprocess.DEVNULL, stdout=outf,
                             stderr=errf, start_new_session=True)
        try:
            rc = p.wait(LINE_TIMEOUT)
        except subprocess.TimeoutExpired:
            # The whole process group: a pipeline's other members too.
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = "timeout after %ds" % LINE_TIMEOUT
        outf.seek(0)
        errf.seek(0)
        return Result(decode(outf.read()), decode(errf.read()), rc)


def stop_server(p, outf, errf):
    if p.poll() is None:
        try:
            os.kill(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    outf.seek(0)
    errf.seek(0)
    r = Result(decode(outf.read()), decode(errf.read()), p.returncode)
    outf.close()
    errf.close()
    return r


def kill_pid_files(scratch):
    for name in os.listdir(scratch):
        if not name.endswith(".pid"):
            continue
        try:
            with open(os.path.join(scratch, name)) as f:
                pid = int(f.read().split()[0])
            os.kill(pid, signal.SIGKILL)
        except (ValueError, IndexError, OSError):
            pass


# ---- one case file: two passes and the comparison ----

def run_file(path, args, filt_dirs):
    cases = read_cases(path)
    root = tempfile.mkdtemp(prefix="vdisk-compat.")
    scratch = os.path.join(root, "work")
    base_path = os.environ.get("PATH", "")
    ref_path = args.qemu + os.pathsep + base_path
    vdisk_path = args.vdisk + os.pathsep + ref_path
    passes = {}
    log = []
    t0 = time.monotonic()
    for tag, tool_path in (("qemu", ref_path), ("vdisk", vdisk_path)):
        os.mkdir(scratch)
        res, problems = run_pass(cases, scratch, tool_path, ref_path, log)
        passes[tag] = (res, problems)
        # The same absolute path in both passes: messages that quote it
        # match without filtering; the finished tree is kept apart.
        os.rename(scratch, os.path.join(root, tag))
    elapsed = time.monotonic() - t0
    filt = make_filter(scratch, filt_dirs)
    if args.keep:
        print("%s: scratch directories kept in %s" % (path, root))
    else:
        shutil.rmtree(root, ignore_errors=True)
    return cases, passes, elapsed, log, filt


# What the filesystem says a file occupies (st_blocks) varies by a block
# or two between two runs of the same tool (ext4 allocates extent-tree
# blocks as the file's extents happen to fall), so the disk sizes of
# qemu-img info and the actual-size of its JSON are equal within this.
DISK_SIZE_SLACK = 16 * 1024
DISK_SIZES = (
    re.compile(r"(disk size: )(\d+(?:\.\d+)?) ([KMGT]i)?B"),
    re.compile(r'("actual-size": )(\d+)()'),
)
UNITS = {None: 1, "": 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30,
         "Ti": 1 << 40}


def reconcile_disk_sizes(qtext, vtext):
    """vdisk's disk sizes replaced by QEMU's where they are within the
    slack (and only where both texts have the same number of them)."""
    for rx in DISK_SIZES:
        qm, vm = list(rx.finditer(qtext)), list(rx.finditer(vtext))
        if len(qm) != len(vm):
            continue
        out, pos = [], 0
        for a, b in zip(qm, vm):
            qa = float(a.group(2)) * UNITS[a.group(3)]
            vb = float(b.group(2)) * UNITS[b.group(3)]
            # The human form has three significant digits: its own
            # rounding counts as slack too.
            slack = DISK_SIZE_SLACK + (0.01 * qa if a.group(3) else 0)
            if abs(qa - vb) <= slack:
                out.append(vtext[pos:b.start()] + a.group(0))
                pos = b.end()
        out.append(vtext[pos:])
        vtext = "".join(out)
    return vtext


def compare(c, q, v, filt):
    """Returns the differences of one compared line as text, or ''."""
    out = []
    for what, a, b in (("stdout", q.out, v.out), ("stderr", q.err, v.err)):
        fa, fb = filt(a), reconcile_disk_sizes(filt(a), filt(b))
        if fa != fb:
            out.append("    %s:\n" % what)
            for d in difflib.unified_diff(fa.splitlines(), fb.splitlines(),
                                          "qemu", "vdisk", lineterm="", n=2):
                out.append("      " + d + "\n")
    if q.rc != v.rc:
        out.append("    exit status: qemu %s, vdisk %s\n" % (q.rc, v.rc))
    return "".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vdisk", default=os.environ.get("VDISK_QEMU_COMPAT"))
    ap.add_argument("--qemu")
    ap.add_argument("--known")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()

    if not args.qemu:
        found = shutil.which("qemu-img")
        if not found:
            print("compat: QEMU's qemu-img is not on PATH: skipped")
            return 77
        args.qemu = os.path.dirname(os.path.realpath(found))
    for t in TOOLS:
        if not os.access(os.path.join(args.qemu, t), os.X_OK):
            print("compat: %s/%s is missing: skipped" % (args.qemu, t))
            return 77
    if not args.vdisk:
        sys.exit("compat: --vdisk DIR or VDISK_QEMU_COMPAT is needed")
    args.vdisk = os.path.abspath(args.vdisk)
    for t in TOOLS:
        if not os.access(os.path.join(args.vdisk, t), os.X_OK):
            sys.exit("compat: %s/%s is missing" % (args.vdisk, t))
    if not args.known:
        args.known = os.path.join(os.path.dirname(os.path.abspath(
            args.files[0])), "known-differences")
    known = read_known(args.known)
    filt_dirs = [args.vdisk, args.qemu]

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as ex:
        runs = list(ex.map(lambda f: (f, run_file(f, args, filt_dirs)),
                           args.files))

    failures, knowns, problems = [], [], []
    total = matched = 0
    seen_texts = set()
    for path, (cases, passes, elapsed, log, filt) in runs:
        qres, qprob = passes["qemu"]
        vres, vprob = passes["vdisk"]
        problems += ["qemu run: " + p for p in qprob]
        problems += ["vdisk run: " + p for p in vprob]
        for idx, c in enumerate(cases):
            if c.kind not in ("run", "ref", "bg"):
                continue
            seen_texts.add(c.text)
            total += 1
            diff = compare(c, qres[idx], vres[idx], filt)
            if not diff and isinstance(qres[idx].rc, str):
                # Both runs timing out is no match: the line waits on
                # something (a server on a TCP port) and costs the budget.
                problems.append("%s: timed out in both runs (a server "
                                "belongs in @bg): %s" % (c.where(), c.text))
                continue
            if not diff:
                matched += 1
                if c.text in known:
                    problems.append("%s: listed in known-differences but "
                                    "now matches QEMU (remove the entry): %s"
                                    % (c.where(), c.text))
            elif c.text in known:
                knowns.append((c, diff, known[c.text]))
            else:
                failures.append((c, diff))
        if args.verbose:
            slow = sorted(log, key=lambda x: -x[1])[:5]
            print("%s: %d lines, both runs %.1f s; slowest: %s"
                  % (os.path.basename(path), len(cases), elapsed,
                     ", ".join("%s %.2fs" % (c.where(), t) for c, t in slow)))
    # Entries for lines no case file has are stale, when every case file
    # beside known-differences ran.
    kdir = os.path.dirname(os.path.abspath(args.known))
    all_files = {os.path.join(kdir, f) for f in os.listdir(kdir)
                 if f.endswith(".cases")}
    if all_files <= {os.path.abspath(f) for f in args.files}:
        for text in sorted(set(known) - seen_texts):
            problems.append("known-differences lists a line no case file "
                            "has: " + text)

    if knowns:
        print("== known differences (kept on purpose, see %s)"
              % os.path.basename(args.known))
        for c, diff, reason in knowns:
            print("KNOWN %s: %s" % (c.where(), c.text))
            print("    why: %s" % reason)
            if args.verbose:
                sys.stdout.write(diff)
    if failures:
        print("== differences from QEMU")
        for c, diff in failures:
            print("FAIL %s: %s" % (c.where(), c.text))
            sys.stdout.write(diff)
    if problems:
        print("== problems")
        for p in problems:
            print("ERROR " + p)
    print("compat: %d compared, %d match, %d known differences, "
          "%d failures%s" % (total, matched, len(knowns), len(failures),
                             ", %d problems" % len(problems)
                             if problems else ""))
    return 1 if failures or problems else 0


if __name__ == "__main__":
    sys.exit(main())
