#!/usr/bin/env bash
# Block jobs side by side: qemu-storage-daemon and `vdisk serve` run the
# same mirror (blockdev-mirror sync=full, completed at READY), backup
# (blockdev-backup sync=full) and active commit (block-commit of the
# active layer, job-complete at READY) of a qcow2 image of 4 GiB with
# 1 GiB allocated, each driven over a QMP UNIX socket, alternately on
# fresh copies of the same images, without and with a guest writing
# through an NBD export of the source (fio's nbd engine, 4 KiB random
# writes at QD16 into a 64 MiB working set, which is small enough for a
# mirror to converge under it). Prints per workload the median job time,
# the guest's write IOPS while the job ran and each daemon's peak RSS,
# with the ratios vdisk/QEMU and the targets of vdisk issue 13 (time at
# most 0.67x, IOPS at least 1x, RSS at most 1x).
#
#   bench/jobs.sh
#
# Environment:
#   BENCH_QUICK=1  512 MiB image with 128 MiB allocated (default: 4 GiB/1 GiB)
#   BENCH_SMOKE=1  64 MiB/16 MiB, one run, for tests/cli/bench-jobs.sh:
#                  checks the script and the jobs' results, not the speed
#   BENCH_RUNS     runs per daemon and workload (default 3, smoke 1)
#   VDISK          the vdisk binary (default: build*/tools/vdisk here)
#   BENCH_DIR      where the scratch directory goes (default /var/tmp;
#                  the full size needs about 4 GiB there)
#   BENCH_KEEP=1   keep the scratch directory
#   BENCH_JOBS     the jobs to run (default "mirror backup commit")
#   BENCH_LOADS    "idle", "fio" or both (default "idle fio")
#
# Job time: from the command that starts the job to the timestamp of its
# BLOCK_JOB_COMPLETED event (for mirror and commit including the
# job-complete sent as soon as READY is seen; the monitor polls every
# 10 ms, in both daemons; each run's line on stderr also gives the time
# of BLOCK_JOB_READY, to tell a slow convergence from a slow pivot). IOPS: fio's per-100-ms IOPS log (in Unix
# time) averaged over the job's span, each interval by its overlap.
# RSS: VmHWM of the daemon when the job is over; the table shows the
# largest of the runs. On ext4 the target's flush before READY (a disk
# write of the whole copy) dominates; BENCH_DIR=/dev/shm measures the
# daemons rather than the disk (docs/jobs.md, "Performance"). The first run of
# each daemon without load is checked: the target (mirror, backup) or
# the base (commit) must show what the source showed (qemu-img compare),
# so a fast but wrong job cannot score. Needs qemu-utils,
# qemu-system-common (qemu-storage-daemon), python3 and fio with the nbd
# engine.
set -u -o pipefail

here=$(cd "$(dirname "$0")" && pwd)
srcdir=$(dirname "$here")
QEMU_IMG=${QEMU_IMG:-qemu-img}

if [ -z "${VDISK:-}" ]; then
    for c in "$srcdir"/build/tools/vdisk "$srcdir"/build*/tools/vdisk; do
        if [ -x "$c" ]; then VDISK=$c; break; fi
    done
fi
if [ -z "${VDISK:-}" ] || [ ! -x "$VDISK" ]; then
    echo "$0: set VDISK to the vdisk binary (no build*/tools/vdisk found)" >&2
    exit 2
fi
for c in "$QEMU_IMG" qemu-io qemu-storage-daemon python3 fio; do
    command -v "$c" >/dev/null ||
        { echo "$0: $c is required" >&2; exit 2; }
done
fio --enghelp=nbd >/dev/null 2>&1 || { echo "$0: fio has no nbd engine" >&2; exit 2; }

if [ "${BENCH_SMOKE:-0}" = 1 ]; then
    size=64 alloc=16 runs=${BENCH_RUNS:-1}
elif [ "${BENCH_QUICK:-0}" = 1 ]; then
    size=512 alloc=128 runs=${BENCH_RUNS:-3}
else
    size=4096 alloc=1024 runs=${BENCH_RUNS:-3}
fi

work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/vdisk-jobs-bench.XXXXXX") || exit 2
cleanup()
{
    if [ "${BENCH_KEEP:-0}" = 1 ]; then
        echo "kept $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The QMP client of the tests (Monitor: start a daemon with its monitor
# on d/qmp.sock, send commands, collect events).
# shellcheck source=../tests/cli/qmp-functions.bash
source "$srcdir/tests/cli/qmp-functions.bash"
cd "$work" && qmp_lib

echo "block jobs: qemu-storage-daemon vs $VDISK serve, ${size} MiB qcow2 with" \
    "${alloc} MiB allocated, $runs run(s) each, in $work"
python3 - "$work" "$VDISK" "$QEMU_IMG" "$size" "$alloc" "$runs" <<'PYEOF'
import os, signal, statistics, subprocess, sys, time
from qmplib import Monitor

work, vdisk, qemu_img = sys.argv[1:4]
size, alloc, runs = (int(x) for x in sys.argv[4:7])
MiB = 1 << 20
HOT = min(64, size // 4)         # the guest's working set, MiB
JOB_SECS = 600                   # a job that takes longer fails its row

def run(*a):
    subprocess.run(a, check=True, stdout=subprocess.DEVNULL)

# The source: ALLOC MiB of data in 1 MiB pieces spread evenly over SIZE
# (a different pattern each), so both the copy and the holes between
# the pieces are exercised. top.qcow2 is the same data as the active
# layer over an empty base.qcow2 (created for each run).
src = os.path.join(work, "src.qcow2")
run(qemu_img, "create", "-q", "-f", "qcow2", src, "%dM" % size)
stride = size // alloc
cmds = []
for i in range(alloc):
    cmds += ["-c", "write -P %d %dM 1M" % (i % 255 + 1, i * stride)]
for k in range(0, len(cmds), 512):
    run("qemu-io", "-f", "qcow2", *cmds[k:k + 512], src)
top = os.path.join(work, "top.qcow2")
run("cp", src, top)
run(qemu_img, "rebase", "-u", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)

def settle():
    # Every run starts with the previous run's writes on the disk, so
    # neither daemon pays for the other's writeback.
    os.sync()
    for _ in range(100):
        dirty = int([l.split()[1] for l in open("/proc/meminfo")
                     if l.startswith("Dirty:")][0])
        if dirty < 8192:
            break
        time.sleep(0.1)

def prepare(job, d):
    run("rm", "-rf", d)
    os.makedirs(d)
    if job == "commit":
        run(qemu_img, "create", "-q", "-f", "qcow2", d + "/base.qcow2", "%dM" % size)
        run("cp", top, d + "/top.qcow2")
    else:
        run("cp", src, d + "/src.qcow2")
        run(qemu_img, "create", "-q", "-f", "qcow2", d + "/tgt.qcow2", "%dM" % size)

def add(m, name, fname, backing=None):
    a = {"driver": "qcow2", "node-name": name,
         "file": {"driver": "file", "filename": "@D@/" + fname}}
    if backing:
        a["backing"] = backing
    r = m.cmd({"execute": "blockdev-add", "arguments": a})
    if "error" in r:
        raise RuntimeError("blockdev-add %s: %s" % (name, r["error"]["desc"]))

def event(m, name):
    for e in m.events:
        if e["event"] == name:
            return e
    return None

def wait_event(m, name, t_end):
    while time.time() < t_end:
        e = event(m, name)
        if e:
            return e
        m.cmd({"execute": "query-jobs"})
        time.sleep(0.01)
    raise RuntimeError("no %s within %d s" % (name, JOB_SECS))

def fio_iops(path, t0, t1):
    # Lines "unix_ms, iops, ddir, ..."; each the mean over the 100 ms
    # before its time. Every interval counts by its overlap with the job.
    ios = 0.0
    for line in open(path):
        f = [x.strip() for x in line.split(",")]
        t = int(f[0]) / 1000.0
        if f[2] == "1":
            ios += int(f[1]) * max(0.0, min(t, t1) - max(t - 0.1, t0))
    return ios / (t1 - t0) if t1 > t0 else None

def one_run(daemon, job, load, check):
    """Returns (seconds, guest IOPS or None, peak RSS KiB)."""
    d = os.path.join(work, "run")
    prepare(job, d)
    settle()
    argv = ["qemu-storage-daemon"] if daemon == "qemu" else [vdisk, "serve"]
    m = Monitor(argv, d)
    fio = None
    try:
        if job == "commit":
            add(m, "base", "base.qcow2")
            add(m, "top", "top.qcow2", "base")
            node = "top"
        else:
            add(m, "src", "src.qcow2")
            add(m, "tgt", "tgt.qcow2")
            node = "src"
        if load:
            for c in ({"execute": "nbd-server-start", "arguments": {
                           "addr": {"type": "unix", "data": {"path": "@D@/nbd.sock"}}}},
                      {"execute": "block-export-add", "arguments": {
                           "type": "nbd", "id": "e", "node-name": node,
                           "name": "disk", "writable": True}}):
                r = m.cmd(c)
                if "error" in r:
                    raise RuntimeError("%s: %s" % (c["execute"], r["error"]["desc"]))
            fio = subprocess.Popen(
                ["fio", "--name=guest", "--ioengine=nbd",
                 "--uri=nbd+unix:///disk?socket=%s/nbd.sock" % d,
                 "--rw=randwrite", "--bs=4k", "--iodepth=16",
                 "--size=%dM" % HOT, "--time_based", "--runtime=3600",
                 "--write_iops_log=%s/fio" % d, "--log_avg_msec=100",
                 "--log_unix_epoch=1", "--output=%s/fio.out" % d],
                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            # Let the guest reach its pace before the job starts.
            time.sleep(1.5)
            if fio.poll() is not None:
                raise RuntimeError("fio exited: " + open(d + "/fio.out").read()[-500:])
        if job == "mirror":
            start = {"execute": "blockdev-mirror", "arguments": {
                "job-id": "j", "device": "src", "target": "tgt", "sync": "full"}}
        elif job == "backup":
            start = {"execute": "blockdev-backup", "arguments": {
                "job-id": "j", "device": "src", "target": "tgt", "sync": "full"}}
        else:
            start = {"execute": "block-commit", "arguments": {
                "job-id": "j", "device": "top"}}
        t0 = time.time()
        r = m.cmd(start)
        if "error" in r:
            raise RuntimeError("%s: %s" % (start["execute"], r["error"]["desc"]))
        t_end = t0 + JOB_SECS
        t_ready = None
        if job != "backup":
            e = wait_event(m, "BLOCK_JOB_READY", t_end)
            t_ready = e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6
            r = m.cmd({"execute": "job-complete", "arguments": {"id": "j"}})
            if "error" in r:
                raise RuntimeError("job-complete: " + r["error"]["desc"])
        e = wait_event(m, "BLOCK_JOB_COMPLETED", t_end)
        if "error" in e.get("data", {}):
            raise RuntimeError("job failed: " + e["data"]["error"])
        t1 = e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6
        iops = None
        if fio:
            fio.send_signal(signal.SIGINT)
            fio.wait(timeout=60)
            fio = None
            iops = fio_iops(d + "/fio_iops.1.log", t0, t1)
        rss = int([l.split()[1] for l in open("/proc/%d/status" % m.proc.pid)
                   if l.startswith("VmHWM:")][0])
        m.cmd({"execute": "quit"})
        m.proc.wait(timeout=60)
    finally:
        if fio:
            fio.kill()
            fio.wait()
        m.close()
    if check:
        a, b = ((src, d + "/base.qcow2") if job == "commit"
                else (d + "/src.qcow2", d + "/tgt.qcow2"))
        c = subprocess.run([qemu_img, "compare", "-q", a, b])
        if c.returncode != 0:
            raise RuntimeError("%s's result differs from the source" % job)
    return t1 - t0, iops, rss, (t_ready - t0 if t_ready else None)

def med(v):
    return statistics.median(v) if v else None

rows = []
jobs = os.environ.get("BENCH_JOBS", "mirror backup commit").split()
loads = [l == "fio" for l in os.environ.get("BENCH_LOADS", "idle fio").split()]
for load in loads:
    for job in jobs:
        name = job + (" + fio" if load else "")
        res = {"qemu": [], "vdisk": []}
        why = None
        for r in range(runs):
            for daemon in ("qemu", "vdisk"):
                try:
                    res[daemon].append(one_run(daemon, job, load, r == 0 and not load))
                except (RuntimeError, subprocess.SubprocessError, OSError, SystemExit) as ex:
                    why = "%s: %s" % (daemon, ex)
                    break
                s, i, k, rd = res[daemon][-1]
                print("  %-14s %-5s %7.2f s %s %6d MiB%s" % (
                    name, daemon, s, "%8.0f IOPS" % i if i else "", k // 1024,
                    "  (READY at %.2f s)" % rd if rd is not None else ""),
                    file=sys.stderr, flush=True)
            if why:
                break
        if why:
            print("  %-14s FAILED (%s)" % (name, why), file=sys.stderr, flush=True)
        rows.append((name, res, why))

def fmt(v, f):
    return f % v if v is not None else "-"

def ratio(a, b):
    return a / b if a is not None and b else None

def mark(r, ok):
    return "" if r is None else (" ok" if ok(r) else " MISS")

print()
print("Medians of %d run(s); ratio = vdisk/QEMU. Targets: time <= 0.67, "
      "IOPS >= 1, RSS <= 1." % runs)
print("%-14s %8s %8s %10s %9s %9s %10s %8s %8s %10s" % (
    "workload", "qemu s", "vdisk s", "ratio", "qemu IOPS", "vdisk IOPS",
    "ratio", "qemu RSS", "vdisk RSS", "ratio"))
print("-" * 106)
bad = 0
for name, res, why in rows:
    if why:
        bad += 1
        print("%-14s FAILED: %s" % (name, why))
        continue
    qt, vt = (med([x[0] for x in res[t]]) for t in ("qemu", "vdisk"))
    qi, vi = (med([x[1] for x in res[t] if x[1] is not None]) for t in ("qemu", "vdisk"))
    qr, vr = (max(x[2] for x in res[t]) / 1024 for t in ("qemu", "vdisk"))
    rt, ri, rr = ratio(vt, qt), ratio(vi, qi), ratio(vr, qr)
    print("%-14s %8.2f %8.2f %10s %9s %10s %10s %7.0fM %8.0fM %10s" % (
        name, qt, vt, fmt(rt, "%.2f") + mark(rt, lambda x: x <= 0.67),
        fmt(qi, "%.0f"), fmt(vi, "%.0f"), fmt(ri, "%.2f") + mark(ri, lambda x: x >= 1),
        qr, vr, fmt(rr, "%.2f") + mark(rr, lambda x: x <= 1)))
sys.exit(1 if bad else 0)
PYEOF
