#!/usr/bin/env bash
# A randomized sequence of writes, zero writes, discards and snapshot
# create/apply/delete on qcow2 images with 512 B, 64 KiB and 2 MiB
# clusters, the whole disk compared after every step with a model that
# keeps one copy of the content per snapshot; qemu-img check must find no
# error and no leak at the end. SNAPSHOT_RANDOM_SEED replays a run,
# SNAPSHOT_RANDOM_STEPS (100) sets its length.
source "$(dirname "$0")/../functions.sh"
requires qemu-img python3
tmpdir

python3 - "$VDISK" "$QEMU_IMG" "${SNAPSHOT_RANDOM_SEED:-$RANDOM}" <<'EOF'
import os, random, subprocess, sys

vdisk, qemu_img, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
# Steps per cluster size (a new seed each run: coverage adds up across
# runs; SNAPSHOT_RANDOM_STEPS for a longer one by hand).
STEPS = int(os.environ.get("SNAPSHOT_RANDOM_STEPS", "100"))
print("seed", seed)
rng = random.Random(seed)

def run(*args):
    r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if r.returncode != 0:
        sys.exit("FAIL (seed %d): %s -> %d\n%s%s" % (
            seed, " ".join(args), r.returncode, r.stdout.decode(),
            r.stderr.decode()))
    return r.stdout.decode()

def contents(img, snap=None):
    args = [vdisk, "convert", "-O", "raw"]
    if snap:
        args += ["-l", snap]
    run(*args, img, "out.raw")
    with open("out.raw", "rb") as f:
        return f.read()

for cluster, size in ((512, 1 << 20), (65536, 4 << 20), (2 << 20, 16 << 20)):
    img = "r%d.qcow2" % cluster
    run(qemu_img, "create", "-f", "qcow2", "-o",
        "cluster_size=%d" % cluster, img, str(size))
    model = bytearray(size)
    snaps = {}          # name -> bytes at creation
    counter = 0
    for step in range(STEPS):
        op = rng.choice(["write"] * 4 + ["zero", "discard", "create",
                         "create", "apply", "delete"])
        what = op
        if op in ("write", "zero"):
            # Sector-aligned, from a piece of a cluster to several.
            off = rng.randrange(0, size // 512) * 512
            ln = rng.choice([512, 4096, cluster, 3 * cluster, 65536])
            ln = min(ln, size - off)
            if op == "write":
                pat = rng.randrange(1, 256)
                run(vdisk, "io", "-c", "write -P %d %d %d" % (pat, off, ln), img)
                model[off:off + ln] = bytes([pat]) * ln
            else:
                run(vdisk, "io", "-c", "write -z %d %d" % (off, ln), img)
                model[off:off + ln] = bytes(ln)
            what = "%s %d+%d" % (op, off, ln)
        elif op == "discard":
            # Whole clusters only: those read back as zeros.
            first = rng.randrange(0, size // cluster)
            n = min(rng.randrange(1, 4), size // cluster - first)
            off, ln = first * cluster, n * cluster
            run(vdisk, "io", "-c", "discard %d %d" % (off, ln), img)
            model[off:off + ln] = bytes(ln)
            what = "discard %d+%d" % (off, ln)
        elif op == "create":
            counter += 1
            name = "s%d" % counter
            run(vdisk, "snapshot", "-c", name, img)
            snaps[name] = bytes(model)
            what = "create " + name
        elif op == "apply" and snaps:
            name = rng.choice(sorted(snaps))
            run(vdisk, "snapshot", "-a", name, img)
            model = bytearray(snaps[name])
            what = "apply " + name
        elif op == "delete" and snaps:
            name = rng.choice(sorted(snaps))
            run(vdisk, "snapshot", "-d", name, img)
            del snaps[name]
            what = "delete " + name
        if contents(img) != bytes(model):
            sys.exit("FAIL (seed %d): %s step %d (%s): content differs"
                     % (seed, img, step, what))
        if step % 50 == 49 and snaps:
            name = rng.choice(sorted(snaps))
            if contents(img, name) != snaps[name]:
                sys.exit("FAIL (seed %d): %s snapshot %s differs"
                         % (seed, img, name))
    r = subprocess.run([qemu_img, "check", img], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT)
    out = r.stdout.decode()
    if r.returncode != 0 or "No errors were found" not in out:
        sys.exit("FAIL (seed %d): qemu-img check %s:\n%s" % (seed, img, out))
    listed = run(qemu_img, "snapshot", "-l", img).split("\n")[2:]
    names = sorted(l.split()[1] for l in listed if l.strip())
    if names != sorted(snaps):
        sys.exit("FAIL (seed %d): %s: qemu-img lists %s, model %s"
                 % (seed, img, names, sorted(snaps)))
    for name in sorted(snaps):
        run(qemu_img, "convert", "-O", "raw", "-l", name, img, "q.raw")
        with open("q.raw", "rb") as f:
            if f.read() != snaps[name]:
                sys.exit("FAIL (seed %d): %s: qemu-img reads snapshot %s "
                         "differently" % (seed, img, name))
    print(img, "ok,", len(snaps), "snapshots left")
EOF
