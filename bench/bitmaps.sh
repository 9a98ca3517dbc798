#!/usr/bin/env bash
# Dirty bitmaps side by side: qemu-storage-daemon and `vdisk serve`, the
# same QMP set-up in each, alternately:
#  1. the cost of recording: fio (nbd engine) 4 KiB random writes at QD32
#     for BENCH_SECS seconds into a raw image of 1 GiB in BENCH_DIR,
#     exported by the daemon with 0, 1 and 8 enabled bitmaps on its node
#     (64 KiB granularity); prints the median IOPS, each daemon's loss
#     against its own 0-bitmap figure and the ratio vdisk/QEMU; and,
#     less noisy, each daemon's CPU time per write (user + system, the
#     process's CPU clock over fio's run, the kernel's socket and file
#     work included) and the bitmaps' cost by that measure (issue 14's
#     target: under 3% at 8); the same again over BENCH_QD1_IOS
#     (default 30000) writes at QD1 right after; and the same QD1
#     figure with 0 and 8 bitmaps in turn in one daemon (bitmaps added
#     and removed), BENCH_RUNS rounds, as a median ratio: what the
#     load moves least;
#  2. a 1 TiB sparse disk (null-co) with BENCH_EXTENTS dirty extents
#     spread over it (written through the export): the time of
#     block-dirty-bitmap-merge of that bitmap into an empty one, and the
#     time nbdinfo takes to read the whole qemu:dirty-bitmap map
#     (--map over 1 TiB), the fastest of 5 tries per run; medians over
#     the runs and ratios;
#  3. when valgrind is there (not in BENCH_SMOKE): the user-space
#     instructions per write of each daemon under callgrind with 0 and 8
#     bitmaps, BENCH_IOS (default 20000) fio writes with a fixed seed
#     (the kernel's share is not counted; the machine's load still moves
#     the total a little, through how requests batch), and for vdisk the
#     instructions of marking itself (vd_dirty_mark and its callees, with
#     callgrind_annotate), which it does not move.
#
#   bench/bitmaps.sh
#
# Environment: BENCH_PARTS (default 123: which parts to run), BENCH_CG
# (default "qemu vdisk": the daemons part 3 counts),
# BENCH_RUNS (default 3), BENCH_SECS (default 10), BENCH_IOS,
# BENCH_EXTENTS (default 2000), BENCH_DIR (default /dev/shm), VDISK (the
# vdisk binary; default build*/tools/vdisk here), BENCH_SMOKE=1 (one
# short run of each on a 64 MiB image, for tests/cli/bench-bitmaps.sh: checks the script
# and that every figure was measured, not the speed). Needs
# qemu-storage-daemon, qemu-io, fio with the nbd engine, nbdinfo, python3.
set -u -o pipefail

here=$(cd "$(dirname "$0")" && pwd)
srcdir=$(dirname "$here")
if [ -z "${VDISK:-}" ]; then
    for c in "$srcdir"/build/tools/vdisk "$srcdir"/build*/tools/vdisk; do
        if [ -x "$c" ]; then VDISK=$c; break; fi
    done
fi
[ -n "${VDISK:-}" ] && [ -x "$VDISK" ] ||
    { echo "$0: set VDISK to the vdisk binary" >&2; exit 2; }
for c in qemu-io qemu-storage-daemon python3 fio nbdinfo; do
    command -v "$c" >/dev/null || { echo "$0: $c is required" >&2; exit 2; }
done
fio --enghelp=nbd >/dev/null 2>&1 || { echo "$0: fio has no nbd engine" >&2; exit 2; }

if [ "${BENCH_SMOKE:-0}" = 1 ]; then
    runs=1 secs=2 extents=50 disk=64M qd1_ios=1000
else
    runs=${BENCH_RUNS:-3} secs=${BENCH_SECS:-10} extents=${BENCH_EXTENTS:-2000}
    qd1_ios=${BENCH_QD1_IOS:-30000}
    disk=1G
fi
# In memory by default: the daemons' flush at exit would otherwise wait
# for the disk to take fio's writes, and the figure is the bitmaps' cost,
# not the disk's.
dflt=/var/tmp
[ -d /dev/shm ] && [ -w /dev/shm ] && dflt=/dev/shm
work=$(mktemp -d "${BENCH_DIR:-$dflt}/vdisk-bitmaps-bench.XXXXXX") || exit 2
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM

# shellcheck source=../tests/cli/qmp-functions.bash
source "$srcdir/tests/cli/qmp-functions.bash"
cd "$work" && qmp_lib

echo "dirty bitmaps: qemu-storage-daemon vs $VDISK serve, $runs run(s)," \
    "fio ${secs} s, $extents extents over 1 TiB"
python3 - "$work" "$VDISK" "$runs" "$secs" "$extents" "$disk" "$qd1_ios" <<'PYEOF'
import json, os, statistics, subprocess, sys, time
from qmplib import Monitor

work, vdisk = sys.argv[1:3]
runs, secs, extents = (int(x) for x in sys.argv[3:6])
disk = sys.argv[6]
qd1_ios = int(sys.argv[7])
daemons = {"qemu": ["qemu-storage-daemon"], "vdisk": [vdisk, "serve"]}

def cmd(m, execute, **args):
    r = m.cmd({"execute": execute, "arguments": args})
    if "error" in r:
        raise SystemExit("%s %s: %s" % (m.argv[0], execute, r["error"]["desc"]))
    return r["return"]

def serve(m, node, bitmaps=(), start=True):
    if start:
        cmd(m, "nbd-server-start", addr={"type": "unix", "data": {"path": "@D@/nbd.sock"}})
    cmd(m, "block-export-add", type="nbd", id="e", **{"node-name": node},
        name="disk", writable=True, bitmaps=list(bitmaps))

def export_raw(m, nb):
    """disk.raw as node n with @nb recording bitmaps, exported."""
    cmd(m, "blockdev-add", driver="raw", **{"node-name": "n"},
        file={"driver": "file", "filename": "@D@/disk.raw"})
    for i in range(nb):
        cmd(m, "block-dirty-bitmap-add", node="n", name="b%d" % i,
            granularity=65536)
    serve(m, "n")

def cpu_seconds(pid):
    """User + system CPU time of process @pid so far, all its threads
    (the dead ones too): the process's CPU clock, what
    clock_getcpuclockid() gives in C (Linux numbers it -(pid+1)*8 + 2),
    to the nanosecond; else /proc/PID/stat, in clock ticks (10 ms)."""
    try:
        return time.clock_gettime(((~pid) << 3) | 2)
    except OSError:
        pass
    with open("/proc/%d/stat" % pid) as f:
        # The fields after the command name, which may hold spaces.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

def fio_write(d, pid, qd1_ios=0):
    """fio's IOPS, and the daemon's CPU time per write in microseconds:
    at QD32 for secs seconds, or at QD1 for @qd1_ios writes."""
    cpu0 = cpu_seconds(pid)
    how = (["--iodepth=1", "--number_ios=%d" % qd1_ios] if qd1_ios else
           ["--iodepth=32", "--time_based", "--runtime=%d" % secs])
    out = subprocess.run(
        ["fio", "--name=w", "--ioengine=nbd", "--uri=nbd+unix:///disk?socket=%s/nbd.sock" % d,
         "--rw=randwrite", "--bs=4k", *how, "--size=" + disk,
         "--output-format=json"],
        capture_output=True, text=True, check=True).stdout
    cpu = cpu_seconds(pid) - cpu0
    # fio may print notes before its JSON.
    w = json.loads(out[out.index("{"):])["jobs"][0]["write"]
    if not w["total_ios"]:
        raise SystemExit("fio wrote nothing")
    return w["iops"], 1e6 * cpu / w["total_ios"]

def recording(daemon, nb):
    d = os.path.join(work, "rec")
    subprocess.run(["rm", "-rf", d], check=True)
    os.makedirs(d)
    subprocess.run(["truncate", "-s", disk, d + "/disk.raw"], check=True)
    m = Monitor(daemons[daemon], d)
    try:
        export_raw(m, nb)
        iops, cpu = fio_write(d, m.proc.pid)
        # Then one request at a time: each write is then the same
        # syscalls, where at QD32 how many requests one wake-up serves
        # follows the machine's load, and so does the CPU per write.
        _, cpu1 = fio_write(d, m.proc.pid, qd1_ios)
        if nb:
            info = cmd(m, "query-named-block-nodes", flat=True)
            counts = [b["count"] for x in info if x["node-name"] == "n"
                      for b in x.get("dirty-bitmaps", [])]
            if len(counts) != nb or min(counts) == 0:
                raise SystemExit("%s: a bitmap recorded nothing" % daemon)
        return iops, cpu, cpu1
    finally:
        cmd(m, "quit")
        m.proc.wait(timeout=60)
        m.close()

def paired(daemon):
    """The daemon's CPU time per QD1 write with no bitmap and with 8,
    in one process, round after round (the order swapped every round):
    the medians of each, and the median of the rounds' ratios, which a
    change of the machine's load between two processes cannot move."""
    d = os.path.join(work, "pair")
    subprocess.run(["rm", "-rf", d], check=True)
    os.makedirs(d)
    subprocess.run(["truncate", "-s", disk, d + "/disk.raw"], check=True)
    m = Monitor(daemons[daemon], d)
    def phase(nb):
        for i in range(nb):
            cmd(m, "block-dirty-bitmap-add", node="n", name="b%d" % i,
                granularity=65536)
        # Every granule dirty first, as after a while of writes: the
        # figure is the steady cost of recording.
        subprocess.run(
            ["fio", "--name=w", "--ioengine=nbd",
             "--uri=nbd+unix:///disk?socket=%s/nbd.sock" % d,
             "--rw=write", "--bs=64k", "--iodepth=8", "--size=" + disk],
            capture_output=True, check=True)
        cpu = fio_write(d, m.proc.pid, qd1_ios)[1]
        for i in range(nb):
            cmd(m, "block-dirty-bitmap-remove", node="n", name="b%d" % i)
        return cpu
    try:
        export_raw(m, 0)
        per = {0: [], 8: []}
        ratios = []
        for r in range(runs):
            for nb in ((0, 8) if r % 2 == 0 else (8, 0)):
                per[nb].append(phase(nb))
            ratios.append(per[8][-1] / per[0][-1])
        return med(per[0]), med(per[8]), med(ratios)
    finally:
        cmd(m, "quit")
        m.proc.wait(timeout=60)
        m.close()

def big(daemon):
    d = os.path.join(work, "big")
    subprocess.run(["rm", "-rf", d], check=True)
    m = Monitor(daemons[daemon], d)
    try:
        cmd(m, "blockdev-add", driver="null-co", **{"node-name": "n"}, size=1 << 40)
        cmd(m, "block-dirty-bitmap-add", node="n", name="src", granularity=65536)
        cmd(m, "block-dirty-bitmap-add", node="n", name="dst", granularity=65536)
        serve(m, "n")
        step = (1 << 40) // extents
        io = []
        for i in range(extents):
            io += ["-c", "write %d 4k" % (i * step + (i % 7) * 65536)]
        for k in range(0, len(io), 1000):
            subprocess.run(["qemu-io", "-f", "raw", *io[k:k + 1000],
                            "nbd+unix:///disk?socket=%s/nbd.sock" % d],
                           check=True, stdout=subprocess.DEVNULL)
        # Each figure is the fastest of 5 tries: the machine is shared,
        # and a try is short enough for one scheduling hiccup to double it.
        merge = []
        for _ in range(5):
            cmd(m, "block-dirty-bitmap-clear", node="n", name="dst")
            t0 = time.perf_counter()
            cmd(m, "block-dirty-bitmap-merge", node="n", target="dst", bitmaps=["src"])
            merge.append(time.perf_counter() - t0)
        merge = min(merge)
        # An exported bitmap is busy, so it cannot be merged from: the
        # map is read through a second export made afterwards.
        cmd(m, "block-export-del", id="e")
        while cmd(m, "query-block-exports"):
            time.sleep(0.01)
        serve(m, "n", ["src"], start=False)
        export = []
        for _ in range(5):
            t0 = time.perf_counter()
            out = subprocess.run(["nbdinfo", "--map=qemu:dirty-bitmap:src",
                                  "nbd+unix:///disk?socket=%s/nbd.sock" % d],
                                 capture_output=True, text=True, check=True).stdout
            export.append(time.perf_counter() - t0)
        export = min(export)
        dirty = sum(1 for l in out.splitlines() if l.split()[-1] == "dirty")
        if dirty != extents:
            raise SystemExit("%s: %d dirty extents in the map, want %d" % (daemon, dirty, extents))
        return merge, export
    finally:
        cmd(m, "quit")
        m.proc.wait(timeout=60)
        m.close()

med = statistics.median
parts = os.environ.get("BENCH_PARTS", "123")
if "1" in parts:
    # Round after round of every case, so that a change of the
    # machine's load falls on all of them alike.
    res = {(daemon, nb): [] for nb in (0, 1, 8) for daemon in ("qemu", "vdisk")}
    for _ in range(runs):
        for nb in (0, 1, 8):
            for daemon in ("qemu", "vdisk"):
                res[(daemon, nb)].append(recording(daemon, nb))
    def fig(daemon, nb, i):
        return med(x[i] for x in res[(daemon, nb)])
    print("\n4 KiB random writes at QD32 over NBD, median IOPS (loss vs 0 bitmaps)")
    print("%-10s %14s %14s %8s" % ("bitmaps", "qemu", "vdisk", "v/q"))
    for nb in (0, 1, 8):
        q, v = fig("qemu", nb, 0), fig("vdisk", nb, 0)
        q0, v0 = fig("qemu", 0, 0), fig("vdisk", 0, 0)
        print("%-10d %7.0f (%+4.1f%%) %7.0f (%+4.1f%%) %8.2f" % (
            nb, q, 100 * (q / q0 - 1), v, 100 * (v / v0 - 1), v / q))
    # The daemon's CPU time per write moves less with the other load on
    # a shared machine than IOPS do: it counts the work done, not the
    # waits; at QD1 it is steadier still (see recording()).
    for i, what in ((1, "the same runs"),
                    (2, "then %d writes at QD1" % qd1_ios)):
        print("\n%s, median daemon CPU time per write in us (user+system;"
              " cost vs 0 bitmaps)" % what)
        print("%-10s %14s %14s %8s" % ("bitmaps", "qemu", "vdisk", "v/q"))
        for nb in (0, 1, 8):
            q, v = fig("qemu", nb, i), fig("vdisk", nb, i)
            q0, v0 = fig("qemu", 0, i), fig("vdisk", 0, i)
            print("%-10d %7.2f (%+4.1f%%) %7.2f (%+4.1f%%) %8.2f" % (
                nb, q, 100 * (q / q0 - 1), v, 100 * (v / v0 - 1), v / q))
    print("\n%d writes at QD1 with 0 and with 8 bitmaps in turn in one daemon,"
          " %d rounds:\nmedian CPU time per write in us and median ratio of"
          " each round's two" % (qd1_ios, runs))
    print("%-8s %10s %10s %8s" % ("daemon", "0 bitmaps", "8 bitmaps", "cost"))
    for daemon in ("qemu", "vdisk"):
        c0, c8, ratio = paired(daemon)
        print("%-8s %10.2f %10.2f %+7.1f%%" % (daemon, c0, c8, 100 * (ratio - 1)))
if "2" in parts:
    bg = {"qemu": [], "vdisk": []}
    for _ in range(runs):
        for daemon in ("qemu", "vdisk"):
            bg[daemon].append(big(daemon))
    print("\n1 TiB disk, %d dirty extents, medians in ms" % extents)
    for i, what in enumerate(("block-dirty-bitmap-merge", "nbdinfo --map of the bitmap")):
        q = med(x[i] for x in bg["qemu"]) * 1000
        v = med(x[i] for x in bg["vdisk"]) * 1000
        print("%-30s qemu %8.1f  vdisk %8.1f  v/q %5.2f" % (what, q, v, v / q))

# 3. The recording cost in instructions, which the machine's noise does
# not move: each daemon under callgrind serves fio's 4 KiB random writes
# (a fixed seed) twice, N and 2N writes, with 0 and 8 bitmaps; the
# difference of the totals is the user-space instructions of N writes,
# start-up and shut-down cancelled out. The kernel's share of a write
# (socket, file) is not counted, so the fraction is an upper bound of
# the bitmaps' share of the CPU time.
import shutil
if ("3" in parts and shutil.which("valgrind") and
        os.environ.get("BENCH_SMOKE", "0") != "1"):
    n_ios = int(os.environ.get("BENCH_IOS", "20000"))
    def instructions(daemon, nb, ios):
        d = os.path.join(work, "cg")
        subprocess.run(["rm", "-rf", d], check=True)
        os.makedirs(d)
        subprocess.run(["truncate", "-s", "256M", d + "/disk.raw"], check=True)
        out = os.path.join(d, "cg.out")
        m = Monitor(["valgrind", "--tool=callgrind", "--callgrind-out-file=" + out,
                     *daemons[daemon]], d)
        try:
            export_raw(m, nb)
            subprocess.run(
                ["fio", "--name=w", "--ioengine=nbd",
                 "--uri=nbd+unix:///disk?socket=%s/nbd.sock" % d,
                 "--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=256M",
                 "--randrepeat=1", "--randseed=42", "--number_ios=%d" % ios,
                 "--output-format=json"],
                capture_output=True, text=True, check=True)
        finally:
            cmd(m, "quit")
            m.proc.wait(timeout=300)
            m.close()
        total = mark = 0
        for name in os.listdir(d):
            if name.startswith("cg.out"):
                for line in open(os.path.join(d, name)):
                    if line.startswith("summary:") or line.startswith("totals:"):
                        total = max(total, int(line.split()[1]))
                # vdisk's marking of a write (its dirty trackers and
                # named bitmaps), callees included: a count of its own
                # that the rest of the path's variations do not move.
                if daemon == "vdisk" and shutil.which("callgrind_annotate"):
                    ann = subprocess.run(
                        ["callgrind_annotate", "--inclusive=yes",
                         "--threshold=100", os.path.join(d, name)],
                        capture_output=True, text=True).stdout
                    for line in ann.splitlines():
                        if ":vd_dirty_mark [" in line:
                            mark += int(line.split()[0].replace(",", ""))
        if not total:
            raise SystemExit("%s: no callgrind totals" % daemon)
        return total, mark
    print("\nuser-space instructions per 4 KiB write over NBD (callgrind, %d writes)" % n_ios)
    print("%-8s %12s %12s %10s" % ("daemon", "0 bitmaps", "8 bitmaps", "cost"))
    for daemon in os.environ.get("BENCH_CG", "qemu vdisk").split():
        per, mark = {}, {}
        for nb in (0, 8):
            (t2, m2), (t1, m1) = (instructions(daemon, nb, 2 * n_ios),
                                  instructions(daemon, nb, n_ios))
            per[nb], mark[nb] = (t2 - t1) / n_ios, (m2 - m1) / n_ios
        print("%-8s %12.0f %12.0f %+9.1f%%" % (daemon, per[0], per[8],
                                              100 * (per[8] / per[0] - 1)))
        if mark[8]:
            print("%-8s %12.0f %12.0f   (vd_dirty_mark, callees included)" % (
                "  mark", mark[0], mark[8]))
PYEOF
