# Helpers shared by the qcow2 crash tests (qcow2-crash.sh,
# qcow2-crash-points.sh): a seeded workload of write/flush cycles for
# `vdisk io` and a verifier that decides from the writer's output which
# cycles were acknowledged by a flush and checks that their data survived.
#
#   crash_gen SEED CYCLES >cmds       the vdisk io commands, one per line
#   crash_verify SEED CYCLES OUT IMG  checks IMG (converted to raw with
#                                     qemu-img) against the model of the
#                                     acknowledged prefix of OUT (the
#                                     writer's merged stdout and stderr)
#   crash_check_clean IMG             qemu-img check: leaks allowed, no
#                                     corruption
#   crash_count_writes OPTS           creates img.qcow2 with OPTS, runs
#                                     the workload in ARGS through blkdebug
#                                     into OUT=out and prints the number
#                                     of writes it made
#   crash_at OPTS N MODE              creates img.qcow2 with OPTS and runs
#                                     the workload in ARGS with the power
#                                     cut after write N (crash-unflushed
#                                     MODE), its output in out
#
# A cycle is one operation on one 64 KiB slot (write, zero write with or
# without unmap, discard of the slot), then `flush`, then `length`, whose
# output line ("64 MiB") marks the end of the cycle. A cycle is
# acknowledged when its length line appears and no error came before it.
# The writer runs its commands in order and nothing after the crash
# reaches the disk (kill -9, or blkdebug's crash-action=fail), so only the
# cycle right after the acknowledged prefix may have been torn: every
# other slot must read exactly as the model of the prefix says.

CRASH_IMG_SIZE=$((64 * 1024 * 1024))

_crash_py()
{
    python3 - "$@" <<'PY'
import random, sys

SLOTS, SLOT = 48, 65536
STRIDE = 1 << 20              # slots spread over many L2 tables

def ops(seed, cycles):
    r = random.Random(seed)
    out = []
    for _ in range(cycles):
        s = r.randrange(SLOTS)
        base = s * STRIDE + (s % 4) * SLOT
        k = r.random()
        if k < 0.2:
            a, b = 0, SLOT
        else:
            a = r.randrange(SLOT // 512) * 512
            if r.random() < 0.3:
                a += r.randrange(512)
            b = min(SLOT, a + r.choice([512, 1000, 4096, 8192, 30000]))
        if k < 0.65:
            out.append((s, "write", base, a, b, r.randrange(1, 256)))
        elif k < 0.85:
            out.append((s, "zero", base, a, b, r.random() < 0.5))
        else:
            out.append((s, "discard", base, 0, SLOT, None))
    return out

def gen(seed, cycles):
    for s, kind, base, a, b, arg in ops(seed, cycles):
        if kind == "write":
            print("write -P 0x%02x %d %d" % (arg, base + a, b - a))
        elif kind == "zero":
            print("write -z %s%d %d" % ("-u " if arg else "", base + a, b - a))
        else:
            print("discard %d %d" % (base, SLOT))
        print("flush")
        print("length")

def acked(out_name):
    n = 0
    bad = False
    with open(out_name, errors="replace") as f:
        for line in f:
            line = line.strip()
            if line.endswith(" MiB") and line[0].isdigit():
                if bad:
                    break
                n += 1
            elif ("fail" in line or "rror" in line or "blkdebug" in line
                  or line.startswith("vdisk:")):
                bad = True
    return n

def verify(seed, cycles, out_name, raw_name):
    o = ops(seed, cycles)
    n = acked(out_name)
    model = {s: bytearray(SLOT) for s in range(SLOTS)}
    for i, (s, kind, base, a, b, arg) in enumerate(o[:n]):
        if kind == "write":
            model[s][a:b] = bytes([arg]) * (b - a)
        else:
            model[s][a:b] = bytes(b - a)
    checked = 0
    with open(raw_name, "rb") as f:
        for s in range(SLOTS):
            if n < len(o) and o[n][0] == s:
                continue
            base = s * STRIDE + (s % 4) * SLOT
            f.seek(base)
            got = f.read(SLOT)
            if got != bytes(model[s]):
                for j in range(SLOT):
                    if got[j] != model[s][j]:
                        break
                sys.exit("slot %d (offset %d): byte %d is 0x%02x, want 0x%02x "
                         "(acknowledged cycles: %d)"
                         % (s, base, j, got[j], model[s][j], n))
            checked += 1
    print("acknowledged cycles: %d of %d, slots verified: %d" % (n, cycles, checked))

if sys.argv[1] == "gen":
    gen(int(sys.argv[2]), int(sys.argv[3]))
else:
    verify(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
PY
}

crash_gen()
{
    _crash_py gen "$1" "$2"
}

crash_verify()
{
    local seed=$1 cycles=$2 out=$3 img=$4
    "$QEMU_IMG" convert -U -f qcow2 -O raw "$img" verify.raw
    _crash_py verify "$seed" "$cycles" "$out" verify.raw
    rm -f verify.raw
}

crash_check_clean()
{
    local st=0
    "$QEMU_IMG" check -f qcow2 "$1" >check.out 2>&1 || st=$?
    # 0: clean; 3: leaked clusters only (allowed after a crash).
    if [ "$st" != 0 ] && [ "$st" != 3 ]; then
        cat check.out
        fail "qemu-img check found corruption in $1 (status $st)"
    fi
}

# crash_load_args FILE: the lines of FILE as -c arguments in ARGS.
crash_load_args()
{
    ARGS=()
    local line
    while IFS= read -r line; do
        ARGS+=(-c "$line")
    done <"$1"
}

crash_count_writes()
{
    rm -f img.qcow2
    "$VDISK" create -q -f qcow2 -o "$1" img.qcow2 "$CRASH_IMG_SIZE"
    "$VDISK" io --image-opts "${ARGS[@]}" \
        "driver=qcow2,file.driver=blkdebug,file.filename=img.qcow2,file.stats=on" \
        >out 2>&1
    sed -n 's/^blkdebug: \([0-9]*\) writes.*/\1/p' out
}

crash_at()
{
    local opts=$1 n=$2 mode=$3
    rm -f img.qcow2
    "$VDISK" create -q -f qcow2 -o "$opts" img.qcow2 "$CRASH_IMG_SIZE"
    "$VDISK" io --image-opts "${ARGS[@]}" \
        "driver=qcow2,file.driver=blkdebug,file.filename=img.qcow2,file.crash-write=$n,file.crash-action=fail,file.crash-unflushed=$mode,file.crash-seed=$n" \
        >out 2>&1 || true
}
