#!/usr/bin/env bash
# Randomized backing chains: chains of depth 1 to 8 (layers of different
# sizes and cluster sizes) get random overlapping writes at random layers,
# then random rebase (safe, onto a lower layer or onto nothing), commit
# (-d, -b) and convert (flatten, -B) steps. Two twins are kept: qemu-io
# and qemu-img work on q/, vdisk io and vdisk on v/. After every step every
# layer of both twins must read the same, the top must read as before for
# the operations that promise it, and qemu-img check must pass.
# VDISK_RANDOM_SEED reproduces a run; runtime is bounded (~30 s).
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io python3
tmpdir

python3 - "$VDISK" "$QEMU_IMG" "$QEMU_IO" "${VDISK_RANDOM_SEED:-}" <<'EOF'
import os, random, shutil, subprocess, sys, time

vdisk, qimg, qio, seed = sys.argv[1:5]
seed = int(seed) if seed else random.randrange(1 << 30)
print("seed", seed, flush=True)
rng = random.Random(seed)
deadline = time.time() + 30


def run(*args, ok=(0,)):
    p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if p.returncode not in ok:
        sys.exit("FAIL (seed %d): %s -> %d\n%s%s" % (
            seed, " ".join(args), p.returncode, p.stdout.decode(),
            p.stderr.decode()))
    return p


def content(path):
    """The visible content of an image, read by qemu-img."""
    run(qimg, "convert", "-U", "-O", "raw", path, "dump.raw")
    with open("dump.raw", "rb") as f:
        data = f.read()
    os.unlink("dump.raw")
    return data


def check_twins(chain, what):
    for name in chain:
        p = run(qimg, "compare", "-U", "q/" + name, "v/" + name, ok=(0, 1))
        if p.returncode:
            sys.exit("FAIL (seed %d): %s differs after %s\n%s" % (
                seed, name, what, p.stdout.decode()))
        run(qimg, "check", "-q", "v/" + name)


def random_writes(chain, n):
    for _ in range(n):
        name = rng.choice(chain)
        vsize = sizes[name]
        off = rng.randrange(0, vsize) & ~511 if rng.random() < 0.5 \
            else rng.randrange(0, vsize)
        ln = rng.randint(1, min(200000, vsize - off))
        pat = rng.randrange(1, 255)
        if rng.random() < 0.2:
            off &= ~511
            ln = max(512, ln & ~511)
            ln = min(ln, (vsize - off) & ~511) or 512
            if off + ln > vsize:
                continue
            cmd = "write -z %d %d" % (off, ln)
        else:
            cmd = "write -P %d %d %d" % (pat, off, ln)
        run(qio, "-c", cmd, "q/" + name)
        run(vdisk, "io", "-c", cmd, "v/" + name)


runs = steps = 0
while time.time() < deadline and runs < 40:
    runs += 1
    for d in ("q", "v"):
        shutil.rmtree(d, ignore_errors=True)
        os.mkdir(d)
    depth = rng.randint(1, 8)
    chain, sizes = [], {}
    for i in range(depth + 1):
        name = "l%d.qcow2" % i
        size = rng.choice([1, 2, 3]) * 512 * 1024 + rng.choice([0, 512, 65536])
        cs = rng.choice([4096, 65536])
        opts = "cluster_size=%d" % cs
        if cs == 65536 and rng.random() < 0.3:
            opts += ",extended_l2=on"
        for d, tool in (("q", qimg), ("v", vdisk)):
            args = [tool, "create", "-q", "-f", "qcow2", "-o", opts]
            if chain:
                args += ["-b", chain[-1], "-F", "qcow2"]
            run(*(args + [d + "/" + name, str(size)]))
        chain.append(name)
        sizes[name] = size
    random_writes(chain, rng.randint(3, 12))
    check_twins(chain, "the writes")

    for step in range(3):
        steps += 1
        top = chain[-1]
        before = content("q/" + top)
        op = rng.choice(["rebase", "rebase", "commit", "convert"])
        if op == "rebase":
            target = rng.choice(chain[:-1] + [""])
            args = ["rebase", "-b", target] + (["-F", "qcow2"] if target else [])
            args.append(top)
            new_chain = (chain[:chain.index(target) + 1] if target else []) \
                + [top]
        elif op == "commit" and len(chain) > 1:
            args = ["commit"]
            base_i = rng.randrange(0, len(chain) - 1)
            if base_i != len(chain) - 2 or rng.random() < 0.3:
                args += ["-b", chain[base_i]]
            elif rng.random() < 0.5:
                args += ["-d"]
            args.append(top)
            new_chain = chain
        else:
            op = "convert"
            keep = len(chain) > 1 and rng.random() < 0.5
            args = ["convert", "-O", "qcow2"]
            if keep:
                args += ["-B", chain[-2], "-F", "qcow2"]
            args += [top, "conv%d.qcow2" % steps]
            new_chain = chain
        what = " ".join(args)
        for d, tool in (("q", qimg), ("v", vdisk)):
            p = subprocess.run([tool] + args, cwd=d, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
            if p.returncode:
                sys.exit("FAIL (seed %d): %s %s -> %d: %s" % (
                    seed, tool, what, p.returncode, p.stderr.decode()))
        if op == "convert":
            out = "conv%d.qcow2" % steps
            if content("v/" + out) != before:
                sys.exit("FAIL (seed %d): %s changed the content" % (seed, what))
            check_twins([out], what)
        elif content("v/" + top) != before:
            qsame = content("q/" + top) == before
            sys.exit("FAIL (seed %d): %s changed what the top reads "
                     "(qemu-img's twin: %s)" %
                     (seed, what, "unchanged" if qsame else "changed too"))
        if op == "commit" and "-b" in args:
            # The base now holds what the top showed (up to the top's size).
            base = args[args.index("-b") + 1]
            got = content("v/" + base)[:len(before)]
            if got != before[:len(got)]:
                sys.exit("FAIL (seed %d): %s: base differs from the top" %
                         (seed, what))
        chain = new_chain
        check_twins(chain, what)
        # The base of a commit may have grown.
        for name in chain:
            info = run(qimg, "info", "-U", "--output=json", "v/" + name).stdout
            import json
            sizes[name] = json.loads(info)["virtual-size"]
        if op == "commit" and "-b" in args:
            break       # the layers in between no longer read correctly
        random_writes(chain, rng.randint(1, 5))
        check_twins(chain, "more writes")

print("ok: %d chains, %d operations" % (runs, steps))
EOF
