#!/usr/bin/env bash
# qcow2 allocation as QEMU 7.2 lays it out: the same seeded writes, zero
# writes (with and without -u), partial-cluster zero writes and discards
# done by qemu-io on one image and `vdisk io` on another must leave the
# same `qemu-img map --output=json`, `qemu-img check` and `qemu-img info`
# (zero clusters for zero writes on v3, ZERO|allocated clusters kept and
# filled in place, v2 zero writes turned into discards without a backing
# file, contiguous runs, L2 tables created by discards, metadata
# preallocation, extended L2, external data files, backing files).
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io python3
tmpdir

SIZE=$((4 * 1024 * 1024))

# gen SEED: qemu-io commands, one per line.
gen()
{
    python3 - "$1" "$SIZE" <<'PY'
import random, sys
r = random.Random(int(sys.argv[1]))
size = int(sys.argv[2])
for _ in range(14):
    k = r.random()
    off = r.choice([0, 512, 4096, 65536, 99840, 1 << 20, 3 << 20])
    off += r.randrange(0, 8) * r.choice([512, 4096, 65536])
    ln = r.choice([512, 1024, 4096, 65536, 131072, 300 * 512, 1 << 20])
    off = min(off, size - 512)
    ln = min(ln, size - off)
    if k < 0.4:
        print("write -P %d %d %d" % (r.randrange(1, 255), off, ln))
    elif k < 0.6:
        print("write -z %d %d" % (off, ln))
    elif k < 0.75:
        print("write -z -u %d %d" % (off, ln))
    elif k < 0.9:
        print("discard %d %d" % (off, ln))
    else:
        print("write -P 3 %d 512" % off)
PY
}

# report IMG: what the comparison looks at.
report()
{
    $QEMU_IMG map --output=json "$1"
    $QEMU_IMG check "$1" || true
    $QEMU_IMG info --output=json "$1" |
        python3 -c 'import json, sys
d = json.load(sys.stdin)
for k in ("filename", "actual-size", "full-backing-filename"):
    d.pop(k, None)
d.get("format-specific", {}).get("data", {}).pop("data-file", None)
print(json.dumps(d, sort_keys=True, indent=1))'
}

# run SEED CREATE_OPTS [backing]
run()
{
    local seed=$1 opts=$2 back=${3:-} cmds=() line t
    while IFS= read -r line; do
        cmds+=(-c "$line")
    done < <(gen "$seed")
    if [ -n "$back" ]; then
        rm -f back.qcow2
        $QEMU_IMG create -q -f qcow2 back.qcow2 $SIZE
        $QEMU_IO -c "write -q -P 9 0 $SIZE" -c "write -q -z 1M 64k" \
            back.qcow2
    fi
    for t in q v; do
        rm -f $t.qcow2 $t.data
        $QEMU_IMG create -q -f qcow2 ${opts:+-o ${opts//@/$t}} \
            ${back:+-b back.qcow2 -F qcow2} $t.qcow2 $SIZE
    done
    $QEMU_IO "${cmds[@]}" q.qcow2 >/dev/null
    "$VDISK" io "${cmds[@]}" v.qcow2 >/dev/null
    report q.qcow2 >q.report 2>&1
    report v.qcow2 >v.report 2>&1
    if ! diff -u q.report v.report; then
        printf '%s\n' "${cmds[@]}"
        fail "seed $seed, options '$opts' ${back:+(with a backing file)}:" \
             "allocation differs from qemu-io's"
    fi
}

# Hand-picked cases first: each is one rule.
for opts in "" compat=0.10 extended_l2=on; do
    seqs=(
        # partial zero writes on unallocated, zero and data clusters
        "write -z 3M 4k|write -z -u 64k 64k|write -z 64k 4k|write -P 1 128k 4k|write -z 132k 4k"
        # v2 zero writes become discards; whole and unaligned
        "write -P 1 0 128k|write -z 0 64k|write -z 3000 100|write -z 1M 3000"
        # discards create their L2 table
        "discard 0 64k|discard 2M 64k"
    )
    for s in "${seqs[@]}"; do
        cmds=()
        IFS='|' read -ra parts <<<"$s"
        for c in "${parts[@]}"; do cmds+=(-c "$c"); done
        for t in q v; do
            rm -f $t.qcow2
            $QEMU_IMG create -q -f qcow2 ${opts:+-o $opts} $t.qcow2 $SIZE
        done
        $QEMU_IO "${cmds[@]}" q.qcow2 >/dev/null
        "$VDISK" io "${cmds[@]}" v.qcow2 >/dev/null
        report q.qcow2 >q.report 2>&1
        report v.qcow2 >v.report 2>&1
        diff -u q.report v.report ||
            fail "'$s' on options '$opts' differs from qemu-io"
    done
done

# Preallocated clusters: zero writes keep them (ZERO|allocated), writes
# fill them in place, copy-on-write areas are zeroed in the file.
for opts in preallocation=metadata preallocation=metadata,extended_l2=on \
            preallocation=falloc; do
    for t in q v; do
        rm -f $t.qcow2
        $QEMU_IMG create -q -f qcow2 -o $opts $t.qcow2 $SIZE
    done
    cmds=(-c "write -z 0 128k" -c "write -P 1 0 4k" -c "write -P 2 100k 4k"
          -c "write -z -u 1M 128k" -c "write -P 3 1M 4k" -c "discard 2M 64k")
    $QEMU_IO "${cmds[@]}" q.qcow2 >/dev/null
    "$VDISK" io "${cmds[@]}" v.qcow2 >/dev/null
    report q.qcow2 >q.report 2>&1
    report v.qcow2 >v.report 2>&1
    diff -u q.report v.report || fail "preallocated clusters ($opts)"
done

# Seeded mixes over many image shapes.
for opts in "" compat=0.10 extended_l2=on cluster_size=4k,refcount_bits=1; do
    run 1 "$opts"
    run 2 "$opts" backing
done
for opts in preallocation=metadata data_file=@.data \
            data_file=@.data,data_file_raw=on; do
    run 3 "$opts"
done
