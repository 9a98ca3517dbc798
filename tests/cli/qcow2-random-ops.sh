#!/usr/bin/env bash
# Randomized qcow2 operations on twins: qemu-io and qemu-img work on q/,
# vdisk io and vdisk on v/. Each image gets a random geometry (cluster
# size 512 B to 2 MiB, extended L2, compat 0.10 or 1.1, refcount width,
# lazy refcounts, no backing file or a qcow2 or raw one longer or
# shorter than the image) and a random sequence of writes (aligned,
# unaligned, from a pattern file), zero writes with and without unmap,
# compressed writes, discards, resizes (grow, --shrink, to sizes that
# are 512-multiples but not cluster-aligned) and internal snapshots
# (create, apply, delete); several commands in one session, aio writes in
# flight together; for a quarter of the images reads and writes go
# through NBD (qemu-nbd exports q/, vdisk serve v/, qemu-io or vdisk io
# the client). After every step both twins must succeed or
# fail together, have the same size and snapshot list and read the same
# (qemu-img compare), and qemu-img check must find v/ clean; at the end of
# each image every snapshot reads the same in both twins and each tool's
# map of each twin is the other tool's. Only what QEMU promises is
# compared: contents, not allocation. VDISK_RANDOM_SEED reproduces a run;
# runtime is bounded (~30 s).
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-nbd python3
tmpdir

python3 - "$VDISK" "$QEMU_IMG" "$QEMU_IO" "${VDISK_RANDOM_SEED:-}" <<'EOF'
import atexit, json, os, random, shutil, subprocess, sys, time

vdisk, qimg, qio, seed = sys.argv[1:5]
qnbd = "qemu-nbd"
seed = int(seed) if seed else random.randrange(1 << 30)
print("seed", seed, flush=True)
rng = random.Random(seed)
deadline = time.time() + 30
K, M = 1024, 1024 * 1024
log = []            # the steps of the current image, printed on failure
# Per image: the twins' layouts parted on a known difference; a twin
# was left damaged (the image ends); a step failed in both twins.
tainted = damaged = both_failed = ended = False


def fail(msg):
    unserve()
    sys.exit("FAIL (seed %d): %s\nsteps of this image:\n  %s" % (
        seed, msg, "\n  ".join(log)))


def run(*args, ok=(0,)):
    p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if p.returncode not in ok:
        fail("%s -> %d\n%s%s" % (" ".join(args), p.returncode,
                                 p.stdout.decode(), p.stderr.decode()))
    return p


def info(path):
    return json.loads(run(qimg, "info", "-U", "--output=json",
                          path).stdout)


def snapshots(image_info):
    return [(s["id"], s["name"], s["vm-state-size"])
            for s in image_info.get("snapshots", [])]


def merged_map(tool, path, offsets=True):
    """The image's map as @tool prints it, adjacent extents that say the
    same merged (without host offsets unless @offsets)."""
    out = []
    for e in json.loads(run(tool, "map", "-U", "--output=json",
                            path).stdout):
        if not offsets:
            e.pop("offset", None)
        if e["data"]:
            # Holes of the host file under data clusters (fallocated,
            # never written): ext4 reports an unwritten extent as a hole
            # or as data depending on what the page cache holds, so
            # this changes from one map to the next.
            e.pop("zero")
        if out:
            last = out[-1]
            same = all(last.get(k) == e.get(k) for k in
                       ("depth", "present", "zero", "data", "compressed"))
            if same and "offset" in e and "offset" in last:
                same = last["offset"] + last["length"] == e["offset"]
            if same and last["start"] + last["length"] == e["start"]:
                last["length"] += e["length"]
                continue
        out.append(e)
    return out


def allocated(path, off, ln):
    """Whether a cluster of the range is allocated in the image itself
    (data, compressed, or zero with a host offset)."""
    return any(e["depth"] == 0 and (e["data"] or "offset" in e)
               for e in json.loads(run(qimg, "map", "-U", "--output=json",
                                       "--start-offset=%d" % off,
                                       "--max-length=%d" % ln,
                                       path).stdout))


servers = []        # qemu-nbd and vdisk serve while the twins are exported


def uri(d):
    return "nbd+unix:///?socket=%s/%s.sock" % (os.getcwd(), d)


def serve():
    """Export q/ with qemu-nbd and v/ with vdisk serve (both with
    qemu-nbd's options) for the io steps that follow."""
    if servers:
        return
    for d, tool in (("q", [qnbd]), ("v", [vdisk, "serve"])):
        if os.path.exists(d + ".sock"):
            os.unlink(d + ".sock")
        servers.append(subprocess.Popen(
            tool + ["-t", "-f", "qcow2", "--discard=unmap", "-k",
                    os.path.abspath(d + ".sock"), d + "/img.qcow2"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    limit = time.time() + 20
    while not (os.path.exists("q.sock") and os.path.exists("v.sock")):
        if time.time() > limit or any(p.poll() is not None for p in servers):
            fail("the NBD servers did not start")
        time.sleep(0.02)


def unserve():
    """Stop the servers (SIGTERM: each flushes and closes its image)."""
    while servers:
        p = servers.pop()
        p.terminate()
        try:
            if p.wait(timeout=20) and p.args[0] == vdisk:
                fail("vdisk serve exited %d on SIGTERM" % p.returncode)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            fail("%s did not stop on SIGTERM" % p.args[0])


atexit.register(unserve)


def check_twins(what):
    if servers:
        # Exported: both read through NBD; check and snapshots wait
        # until the servers have closed the images.
        for d in ("q", "v"):
            info_ = json.loads(run(qimg, "info", "--output=json",
                                   uri(d)).stdout)
            if d == "q":
                qs = info_["virtual-size"]
            elif info_["virtual-size"] != qs:
                fail("after %s: export size %d (qemu-nbd) vs %d (vdisk)" % (
                    what, qs, info_["virtual-size"]))
        p = run(qimg, "compare", "-f", "raw", "-F", "raw", uri("q"),
                uri("v"), ok=(0, 1))
        if p.returncode:
            fail("after %s: the exports differ\n%s" % (what,
                                                        p.stdout.decode()))
        return qs
    qi, vi = info("q/img.qcow2"), info("v/img.qcow2")
    qs, vs = qi["virtual-size"], vi["virtual-size"]
    if qs != vs:
        fail("after %s: size %d (qemu) vs %d (vdisk)" % (what, qs, vs))
    p = run(qimg, "compare", "-U", "q/img.qcow2", "v/img.qcow2", ok=(0, 1))
    if p.returncode:
        fail("after %s: the twins differ\n%s" % (what, p.stdout.decode()))
    if snapshots(qi) != snapshots(vi):
        fail("after %s: snapshots %s (qemu) vs %s (vdisk)" % (
            what, snapshots(qi), snapshots(vi)))
    global damaged, both_failed
    p = run(qimg, "check", "v/img.qcow2", ok=(0, 1, 2, 3))
    if both_failed and not p.returncode:
        # vdisk refuses some steps before writing anything (e.g. a
        # snapshot that would overflow a narrow refcount) where QEMU
        # fails half-way and leaves its twin damaged: the image ends.
        both_failed = False
        if run(qimg, "check", "q/img.qcow2", ok=(0, 1, 2, 3)).returncode:
            damaged = True
    if p.returncode:
        # Allowed only where QEMU leaves the very same: a snapshot that
        # fails on a refcount overflow (2-bit refcounts) leaks what it
        # had counted already and leaves an L2 table COPIED with a
        # refcount of 2, in both. The image ends there.
        pq = run(qimg, "check", "q/img.qcow2", ok=(0, 1, 2, 3))
        if pq.returncode == p.returncode and pq.stdout == p.stdout:
            damaged = True
            return qs
        fail("after %s: qemu-img check v/img.qcow2 -> %d\n%s%s" % (
            what, p.returncode, p.stdout.decode(), p.stderr.decode()))
    return qs


def twin(qargs, vargs, what, known=None):
    """Run one step on both twins; they must succeed or fail together,
    unless known(qemu_result, vdisk_result) accepts the difference (and
    may bring the twins back in step)."""
    log.append(what)
    pq = subprocess.run(qargs, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE)
    pv = subprocess.run(vargs, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE)
    if pv.returncode not in (0, 1):
        fail("%s: vdisk exited %d\n%s" % (what, pv.returncode,
                                          pv.stderr.decode()))
    if (pq.returncode == 0) != (pv.returncode == 0) and \
            not (known and known(pq, pv)):
        fail("%s: qemu -> %d, vdisk -> %d\nqemu: %s%s\nvdisk: %s%s" % (
            what, pq.returncode, pv.returncode, pq.stdout.decode(),
            pq.stderr.decode(), pv.stdout.decode(), pv.stderr.decode()))
    global both_failed
    both_failed = both_failed or (pq.returncode != 0 and pv.returncode != 0)
    return pq.returncode == 0 and pv.returncode == 0


def io(cmds, known=None):
    """One qemu-io session of one or several commands on each twin:
    on the image, or for an image whose io goes over NBD, on its export
    (vdisk's by qemu-io or by vdisk io)."""
    cmds = [cmds] if isinstance(cmds, str) else cmds
    args = sum((["-c", c] for c in cmds), [])
    what = "io " + " ".join("-c '%s'" % c for c in cmds)
    if over_nbd and known is None:
        serve()
        return twin([qio, "-f", "raw"] + args + [uri("q")],
                    nbd_client + ["-f", "raw"] + args + [uri("v")],
                    "nbd " + what)
    unserve()
    return twin([qio] + args + ["q/img.qcow2"],
                [vdisk, "io"] + args + ["v/img.qcow2"], what, known)


def img(args, known=None):
    unserve()
    return twin([qimg] + args + ["q/img.qcow2"],
                [vdisk] + args + ["v/img.qcow2"], " ".join(args), known)


def geometry():
    cs = rng.choice([512, 1 * K, 2 * K, 4 * K, 4 * K, 8 * K, 16 * K, 32 * K,
                     64 * K, 64 * K, 64 * K, 128 * K, 256 * K, 512 * K, M,
                     2 * M])
    opts = ["cluster_size=%d" % cs]
    if rng.random() < 0.25:
        opts.append("compat=0.10")
    else:
        if cs >= 16 * K and rng.random() < 0.4:
            opts.append("extended_l2=on")
        if rng.random() < 0.4:
            opts.append("refcount_bits=%d" % rng.choice([1, 2, 4, 8, 32,
                                                         64]))
        if rng.random() < 0.3:
            opts.append("lazy_refcounts=on")
    return cs, ",".join(opts)


def unaligned_size(cs, top):
    """A 512-multiple up to @top, cluster-aligned only by chance."""
    if rng.random() < 0.3:
        n = rng.randint(1, max(1, top // cs)) * cs
        return max(512, n + rng.choice([0, 512, -512]))
    return rng.randint(1, top // 512) * 512


def make_backing(size):
    kind = rng.choice(["qcow2", "qcow2", "raw"])
    name = "base." + kind
    opts = "cluster_size=%d" % rng.choice([4 * K, 64 * K]) \
        if kind == "qcow2" else "preallocation=off"
    # Data everywhere but in a few holes, so that whatever shows through
    # where it should not is seen.
    cmds = []
    off = 0
    while off < size:
        ln = min(size - off, rng.choice([4 * K, 64 * K, 300 * K, M]))
        if rng.random() < 0.8:
            cmds += ["-c", "write -q -P %d %d %d" % (rng.randrange(1, 256),
                                                    off, ln)]
        off += ln
    # Made twice the same way rather than copied, which would fill the
    # holes of a raw file (and so change its map).
    for d in ("q", "v"):
        run(qimg, "create", "-q", "-f", kind, "-o", opts, d + "/" + name,
            str(size))
        if cmds:
            run(qio, "-f", kind, *cmds, d + "/" + name)
    return name, kind


with open("pattern.bin", "wb") as f:
    # Repeated by qemu-io to fill the buffer; an odd period, half
    # compressible, so that data moved to a wrong offset is seen.
    f.write(bytes(rng.randrange(256) for _ in range(1531)) + bytes(1000))


def random_range(size, cs):
    a = rng.random()
    if a < 0.3:
        off = rng.randrange(0, size)
    elif a < 0.7:
        off = rng.randrange(0, size) & ~511
    else:
        off = rng.randrange(0, (size + cs - 1) // cs) * cs
        off = min(off, (size - 1) & ~511)
    b = rng.random()
    if b < 0.3:
        ln = rng.randint(1, 8 * K)
    elif b < 0.6:
        ln = rng.randint(1, 4) * cs + rng.choice([0, 0, 512, -512, 1, -1])
    else:
        ln = rng.randint(1, 512 * K)
    if a >= 0.3 and b >= 0.3 and rng.random() < 0.7:
        ln = max(512, ln & ~511)
    return off, max(1, min(ln, size - off))


def simple_command(op, off, ln):
    if op == "write":
        if rng.random() < 0.4:
            return "write -q -s pattern.bin %d %d" % (off, ln)
        return "write -q -P %d %d %d" % (rng.randrange(256), off, ln)
    if op == "zero":
        return "write -q -z%s %d %d" % (rng.choice(["", " -u"]), off, ln)
    return "discard -q %d %d" % (off, ln)


images = steps = 0
while time.time() < deadline and images < 100:
    images += 1
    log = []
    for d in ("q", "v"):
        shutil.rmtree(d, ignore_errors=True)
        os.mkdir(d)
    cs, opts = geometry()
    refcount_bits = int(opts.split("refcount_bits=")[1].split(",")[0]) \
        if "refcount_bits=" in opts else 16
    size = unaligned_size(cs, max(4 * M, 3 * cs))
    backing = None
    if rng.random() < 0.6:
        bsize = max(512, size + rng.choice([-1, 1]) * rng.randint(1, 64) *
                    rng.choice([512, 4 * K, cs]))
        backing = make_backing(bsize)
        log.append("backing %s, %d bytes" % (backing[1], bsize))
    qargs = ["create", "-q", "-f", "qcow2", "-o", opts]
    if backing:
        qargs += ["-b", backing[0], "-F", backing[1]]
    log.append("create %s %d" % (" ".join(qargs[3:]), size))
    run(qimg, *qargs, "q/img.qcow2", str(size))
    run(vdisk, *qargs, "v/img.qcow2", str(size))
    check_twins("create")
    # A quarter of the images have their reads and writes go through
    # NBD servers: qemu-nbd on q/, vdisk serve on v/.
    over_nbd = rng.random() < 0.25
    nbd_client = rng.choice([[qio], [vdisk, "io"]])
    if over_nbd:
        log.append("io over NBD, vdisk's export read by %s" %
                   os.path.basename(nbd_client[0]))
    counter = 0
    snap_size = {}
    tainted = damaged = both_failed = ended = False
    for _ in range(rng.randint(8, 30)):
        if time.time() > deadline or damaged:
            break
        steps += 1
        op = rng.choice(["write"] * 6 + ["zero"] * 3 + ["compress"] * 2 +
                        ["discard"] * 2 + ["resize"] * 2 + ["snapshot"] +
                        ["session", "aio"])
        if op in ("write", "zero", "discard"):
            io(simple_command(op, *random_range(size, cs)))
        elif op == "session":
            # Several commands in one open image: its caches (L2 tables,
            # refcount blocks) live across them.
            cmds, cur = [], size
            for _ in range(rng.randint(2, 12)):
                if rng.random() < 0.15 and cur % cs == 0 and \
                        not backing and not over_nbd and \
                        not snapshots(info("q/img.qcow2")):
                    # The image resized while open (qemu-io's truncate,
                    # which may shrink): from and to cluster-aligned
                    # sizes, where QEMU's grow shows no stale bytes.
                    cur = rng.randint(1, max(2, 2 * cur // cs)) * cs
                    cmds.append("truncate %d" % cur)
                else:
                    cmds.append(simple_command(
                        rng.choice(["write", "write", "zero", "discard"]),
                        *random_range(cur, cs)))
            io(cmds)
        elif op == "aio":
            # Requests in flight together on disjoint ranges (sharing
            # clusters and L2 tables), then a flush.
            ends = sorted(rng.sample(range(0, size + 1, 512),
                                     min(size // 512, rng.randint(2, 12))))
            reqs = [(off, end, rng.choice(["", "", " -z", " -z -u"]))
                    for off, end in zip(ends[::2], ends[1::2]) if end > off]
            cmds = []
            for off, end, kind in reqs:
                # QEMU 7.2 widens a zero write that covers part of a
                # cluster reading as zeros to the whole cluster after
                # looking at it once, and so wipes (and frees, leaving
                # its refcount 0) a write in flight to the rest of the
                # cluster; its twin would be wrong. Zero writes get
                # clusters of their own.
                if kind and any(o != off and o // cs <= (end - 1) // cs and
                                off // cs <= (e - 1) // cs
                                for o, e, _ in reqs):
                    kind = ""
                pat = "" if kind else " -P %d" % rng.randrange(256)
                cmds.append("aio_write -q%s%s %d %d" % (kind, pat, off,
                                                       end - off))
            io(cmds + ["aio_flush"])
        elif op == "compress":
            # Whole clusters, or the partial one at the end (QEMU refuses
            # anything else, as vdisk does).
            first = rng.randrange(0, (size + cs - 1) // cs)
            n = rng.randint(1, 3)
            off = first * cs
            ln = min(n * cs, size - off)
            src = rng.choice(["-s pattern.bin", "-P %d" % rng.randrange(256)])
            cmd = "write -q -c %s %d %d" % (src, off, ln)
            unserve()
            if refcount_bits < 16 and allocated("q/img.qcow2", off, ln):
                # The layouts would part (below), and a narrow refcount
                # overflows on a snapshot in one twin only.
                continue

            def over_allocated(pq, pv, cmd=cmd, src=src, off=off, ln=ln):
                # Kept on purpose (docs/qcow2.md): QEMU fails a compressed
                # write over an allocated cluster with EIO, vdisk
                # compresses. The same data written plainly on q/.
                if pv.returncode or b"Input/output error" not in \
                        pq.stdout + pq.stderr:
                    return False
                run(qio, "-c", "write -q %s %d %d" % (src, off, ln),
                    "q/img.qcow2")
                global tainted
                tainted = True
                return True
            io(cmd, over_allocated)
        elif op == "resize":
            if rng.random() < 0.5:
                new = size + unaligned_size(cs, max(2 * M, 2 * cs))
            else:
                new = unaligned_size(cs, size)
            unserve()
            args = ["resize", "-q"]
            if new < size or rng.random() < 0.1:
                args.append("--shrink")

            def cannot_zero(pq, pv, old=size, new=new):
                # Where a longer backing file would show through, QEMU
                # 7.2 refuses to grow an image it cannot zero with zero
                # flags (v2 has none; nor can it zero part of a
                # compressed cluster); vdisk writes zeros. Its new range
                # must read as zeros; then it is shrunk back.
                if pv.returncode or b"Failed to zero out new clusters" \
                        not in pq.stderr:
                    return False
                run(qio, "-r", "-c", "read -q -P 0 %d %d" % (old, new - old),
                    "v/img.qcow2")
                run(vdisk, "resize", "-q", "--shrink", "v/img.qcow2",
                    str(old))
                global tainted
                tainted = True
                return True
            if twin([qimg] + args + ["q/img.qcow2", str(new)],
                    [vdisk] + args + ["v/img.qcow2", str(new)],
                    " ".join(args) + " " + str(new), cannot_zero) \
                    and new > size:
                # Kept on purpose (tests/cli/qcow2-resize.sh): QEMU 7.2
                # leaves what a shrink cut off in the last partial
                # cluster, and a grow shows it again; vdisk zeroes the
                # rest of that cluster. Zeroed on q/ likewise.
                end = min(new, (size + cs - 1) // cs * cs)
                if end > size:
                    tainted = True
                    run(qio, "-c", "write -q -z %d %d" % (size, end - size),
                        "q/img.qcow2")
        elif op == "snapshot":
            names = [s[1] for s in snapshots(info("q/img.qcow2"))]
            a = rng.random()
            if a < 0.5 or not names:
                counter += 1
                if img(["snapshot", "-c", "s%d" % counter]):
                    snap_size["s%d" % counter] = size
            elif a < 0.75:
                name = rng.choice(names)

                def cannot_zero_apply(pq, pv, name=name):
                    # QEMU 7.2 grows the image to the snapshot's size
                    # before loading it and refuses where it cannot zero
                    # the new range, as resize does above; vdisk applies
                    # it. vdisk's active layer must then read as the
                    # snapshot (as far as qemu-img shows it on the QEMU
                    # twin, at that image's size), and the image ends:
                    # no QEMU twin can follow.
                    if pv.returncode or b"Failed to zero out new clusters" \
                            not in pq.stderr:
                        return False
                    views = []
                    for d, args in (("q", ["-l", name]), ("v", [])):
                        run(qimg, "convert", "-U", "-O", "raw", *args,
                            d + "/img.qcow2", d + "/applied.raw")
                        with open(d + "/applied.raw", "rb") as f:
                            views.append(f.read()[:snap_size[name]])
                    n = min(len(views[0]), len(views[1]))
                    if views[0][:n] != views[1][:n] or \
                            len(views[1]) != snap_size[name]:
                        fail("snapshot -a %s: vdisk's image does not read "
                             "as the snapshot" % name)
                    global ended
                    ended = True
                    return True
                img(["snapshot", "-a", name], cannot_zero_apply)
            else:
                img(["snapshot", "-d", rng.choice(names)])
        if ended:
            break
        size = check_twins(log[-1] if log else op)
    if ended:
        print("NOTE: image %d ends at a step QEMU refuses and vdisk does "
              "(checked above): %s" % (images, log[-1]), flush=True)
        continue

    # The end of an image: snapshots read the same, and both tools map
    # each twin alike.
    if servers:
        unserve()
        check_twins("the servers' exit")
    for _, name, _ in snapshots(info("q/img.qcow2")):
        views = []
        for d in ("q", "v"):
            run(qimg, "convert", "-U", "-O", "raw", "-l", name,
                d + "/img.qcow2", d + "/snap.raw")
            with open(d + "/snap.raw", "rb") as f:
                # qemu-img reads a snapshot at the image's current size;
                # past the snapshot's own it shows whatever its last
                # cluster holds past the old end (QEMU's copy on write
                # fills it from a longer backing file, vdisk's with zeros).
                views.append(f.read()[:snap_size[name]])
        if views[0] != views[1]:
            fail("snapshot %s differs" % name)
    for d in ("q", "v"):
        qm = merged_map(qimg, d + "/img.qcow2")
        vm = merged_map(vdisk, d + "/img.qcow2")
        if qm != vm:
            fail("%s/img.qcow2: vdisk map differs from qemu-img map:\n%s" % (
                d, "\n".join("%s\n  vs %s" % (a, b) for a, b in
                             zip(qm + [None] * len(vm), vm + [None] * len(qm))
                             if a != b)))
    if not tainted:
        qm = merged_map(qimg, "q/img.qcow2", False)
        vm = merged_map(qimg, "v/img.qcow2", False)
        if qm != vm:
            print("NOTE: twins map differently: image %d %s\n  %s\n  %s" % (images, log, [x for x in qm if x not in vm][:3], [x for x in vm if x not in qm][:3]), flush=True)
    p = run(vdisk, "compare", "-U", "q/img.qcow2", "v/img.qcow2", ok=(0, 1))
    if p.returncode:
        fail("vdisk compare finds the twins differ\n%s" % p.stdout.decode())

print("ok: %d images, %d steps" % (images, steps))
EOF
