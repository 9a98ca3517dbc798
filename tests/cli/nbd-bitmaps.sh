#!/usr/bin/env bash
# Dirty bitmaps over NBD (the qemu:dirty-bitmap:NAME metadata context of
# ../shared/specs/nbd-qemu-extensions.rst), the peers as referees:
#  1. qemu-nbd -B and `vdisk serve -B` on twin qcow2 images with persistent
#     bitmaps made by qemu-img bitmap and qemu-io: the contexts nbdinfo
#     lists, each bitmap's extents (nbdinfo --map), the extents after
#     writes through the export, the bitmaps stored at exit (qemu-img info
#     and qemu-storage-daemon's sha256 of each), and the refusals.
#  2. block-export-add bitmaps (names and {node, name}) and nbd-server-add
#     bitmap in qemu-storage-daemon and vdisk serve, one QMP script: the
#     replies, errors (unknown, busy, read-only export of a recording
#     bitmap, inconsistent), the busy flag while exported, the maps.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-nbd qemu-storage-daemon nbdinfo python3 timeout
source "$(dirname "$0")/qmp-functions.bash"
tmpdir
qmp_lib

mkimg() {
    "$QEMU_IMG" create -q -f qcow2 "$1" 16M
    "$QEMU_IMG" bitmap --add "$1" b1
    "$QEMU_IMG" bitmap --add -g 4096 "$1" b2
    qemu-io -c 'write -P 1 1M 64k' -c 'write -P 2 5000k 3k' "$1" >/dev/null
    "$QEMU_IMG" bitmap --disable "$1" b2
    qemu-io -c 'write -P 3 8M 128k' "$1" >/dev/null
}

# Starts a server ($1: qemu or vdisk) on $2.qcow2, socket $2.sock, with
# the remaining arguments; waits for the socket. Sets SRV_PID.
start_server() {
    local who=$1 img=$2
    shift 2
    rm -f "$img.sock"
    if [ "$who" = qemu ]; then
        qemu-nbd -t -k "$PWD/$img.sock" "$@" "$img.qcow2" 2>"$img.log" &
    else
        "$VDISK" serve -t -k "$PWD/$img.sock" "$@" "$img.qcow2" 2>"$img.log" &
    fi
    SRV_PID=$!
    for _ in $(seq 200); do
        [ -S "$img.sock" ] && return 0
        kill -0 $SRV_PID 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}

stop_server() {
    kill "$SRV_PID" 2>/dev/null
    wait "$SRV_PID" 2>/dev/null || true
    SRV_PID=
}
cleanup_fn() { [ -n "${SRV_PID:-}" ] && kill "$SRV_PID" 2>/dev/null; }

uri() { echo "nbd+unix:///?socket=$PWD/$1.sock"; }

# What a client sees of image $1 served by $2 with options $3...
observe() {
    local img=$1 who=$2
    shift 2
    start_server "$who" "$img" "$@" || fail "$who did not start: $(cat "$img.log")"
    nbdinfo --list "$(uri "$img")" | sed -n '/contexts:/,/is_/p' | grep -v 'is_'
    for b in b1 b2; do
        echo "map $b"
        nbdinfo --map=qemu:dirty-bitmap:$b "$(uri "$img")" 2>/dev/null ||
            echo "no context qemu:dirty-bitmap:$b"
    done
    if [ "${WRITE:-}" ]; then
        qemu-io -f raw -c 'write -P 4 3M 4k' -c 'write -z 12M 1M' \
            -c 'discard 1M 64k' "$(uri "$img")" >/dev/null ||
            fail "writes through $who failed"
        echo "after writes"
        for b in b1 b2; do
            nbdinfo --map=qemu:dirty-bitmap:$b "$(uri "$img")" 2>/dev/null ||
                echo "no context qemu:dirty-bitmap:$b"
        done
    fi
    stop_server
}

# The sha256 of each bitmap as qemu-storage-daemon computes it.
digests() {
    python3 -c 'import sys; from qmplib import bitmap_digests as d; print(d(sys.argv[1]))' "$1"
}

n=0
for opts in "-r -B b1 -B b2" "-B b2 -B b1" "-r -B b1"; do
    for w in "" 1; do
        case "$opts" in -r*) [ "$w" ] && continue ;; esac
        n=$((n + 1))
        mkimg q$n.qcow2
        cp q$n.qcow2 v$n.qcow2
        WRITE=$w observe q$n qemu $opts >q$n.out
        WRITE=$w observe v$n vdisk $opts >v$n.out
        diff -u q$n.out v$n.out || fail "$opts${w:+ with writes}: what the clients see differs"
        "$QEMU_IMG" info --output=json v$n.qcow2 | python3 -c '
import json,sys; print(json.load(sys.stdin)["format-specific"]["data"].get("bitmaps"))' >v$n.info
        "$QEMU_IMG" info --output=json q$n.qcow2 | python3 -c '
import json,sys; print(json.load(sys.stdin)["format-specific"]["data"].get("bitmaps"))' >q$n.info
        diff -u q$n.info v$n.info || fail "$opts: bitmaps stored differ"
        "$QEMU_IMG" check -q v$n.qcow2 || fail "$opts: check fails after vdisk serve"
        digests q$n.qcow2 >q$n.sha
        digests v$n.qcow2 >v$n.sha
        diff -u q$n.sha v$n.sha || fail "$opts: bitmap contents differ after the servers exited"
        grep -q "dirty" q$n.out || fail "$opts: nothing dirty: the test saw nothing"
    done
done
echo "qemu-nbd -B: $n configurations, same contexts, maps and stored bitmaps"

# Refusals: an unknown bitmap; each leaves the image byte-identical.
mkimg q.qcow2
cp q.qcow2 v.qcow2
cksum_before=$(cksum <v.qcow2)
for opts in "-B nope" "-B b1 -B nope"; do
    rc=0
    timeout 20 qemu-nbd -k "$PWD/q.sock" $opts q.qcow2 2>q.log || rc=$?
    [ $rc = 1 ] || fail "qemu-nbd $opts: exit status $rc"
    rc=0
    timeout 20 "$VDISK" serve -k "$PWD/v.sock" $opts v.qcow2 2>v.log || rc=$?
    [ $rc = 1 ] || fail "vdisk serve $opts: exit status $rc"
    q=$(sed 's/^qemu-nbd: //' q.log)
    v=$(sed 's/^vdisk serve: //' v.log)
    [ "$q" = "$v" ] || fail "$opts: qemu-nbd says '$q', vdisk '$v'"
done
[ "$cksum_before" = "$(cksum <v.qcow2)" ] || fail "a refused export changed the image"

# 2. QMP.
timeout 300 python3 - "$PWD" "$VDISK" "$QEMU_IMG" <<'PYEOF' || fail "QMP bitmap exports differ from qemu-storage-daemon"
import subprocess, sys
from qmplib import *

top, vdisk, qemu_img = sys.argv[1], sys.argv[2], sys.argv[3]

def C(m, log, cmd, **args):
    log.append(m.cmd({"execute": cmd, "arguments": args}))

def nbd_map(d, log, export, ctx):
    r = subprocess.run(["nbdinfo", "--map=" + ctx,
                        "nbd+unix:///%s?socket=%s/nbd.sock" % (export, d)],
                       capture_output=True, text=True)
    log.append([r.returncode, r.stdout])

def bitmaps(m, log):
    r = m.cmd({"execute": "query-named-block-nodes", "arguments": {"flat": True}})
    log.append({n["node-name"]: n.get("dirty-bitmaps") for n in r["return"]
                if not n["node-name"].startswith("#")})

def exports(m, d, log):
    add_chain(m)
    C(m, log, "nbd-server-start", addr={"type": "unix",
                                        "data": {"path": "@D@/nbd.sock"}})
    C(m, log, "block-dirty-bitmap-add", node="top", name="t1")
    C(m, log, "block-dirty-bitmap-add", node="mid", name="m1",
      granularity=4096, disabled=True)
    C(m, log, "block-dirty-bitmap-add", node="top", name="off", disabled=True)
    # Refused: unknown names, a recording bitmap on a read-only export of
    # a writable node, an unknown node, a bad element.
    C(m, log, "block-export-add", type="nbd", id="x1", **{"node-name": "top"},
      bitmaps=["nope"])
    C(m, log, "block-export-add", type="nbd", id="x2", **{"node-name": "top"},
      bitmaps=["t1"])
    C(m, log, "block-export-add", type="nbd", id="x3", **{"node-name": "top"},
      bitmaps=[{"node": "ghost", "name": "t1"}])
    C(m, log, "block-export-add", type="nbd", id="x4", **{"node-name": "top"},
      bitmaps=[{"node": "mid", "name": "t1"}])
    C(m, log, "block-export-add", type="nbd", id="x5", **{"node-name": "top"},
      bitmaps=[{"node": "mid"}])
    C(m, log, "block-export-add", type="nbd", id="x6", **{"node-name": "top"},
      bitmaps=[7])
    bitmaps(m, log)
    # A writable export with a bitmap found below (m1 on mid), one by
    # node and name, and one on top.
    C(m, log, "block-export-add", type="nbd", id="e", **{"node-name": "top"},
      writable=True, bitmaps=["t1", {"node": "mid", "name": "m1"}, "off"])
    bitmaps(m, log)
    # Busy while exported.
    C(m, log, "block-dirty-bitmap-remove", node="top", name="t1")
    C(m, log, "block-dirty-bitmap-clear", node="mid", name="m1")
    C(m, log, "block-dirty-bitmap-add", node="top", name="spare")
    C(m, log, "block-dirty-bitmap-merge", node="top", target="spare",
      bitmaps=["t1"])
    C(m, log, "block-dirty-bitmap-merge", node="mid", target="m1",
      bitmaps=[{"node": "top", "name": "spare"}])
    C(m, log, "block-export-add", type="nbd", id="e2", **{"node-name": "top"},
      name="again", writable=True, bitmaps=["t1"])
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 5 64k 4k",
                    "-c", "write -z 2M 192k", "-c", "discard 3M 64k",
                    "nbd+unix:///top?socket=%s/nbd.sock" % d],
                   check=True, stdout=subprocess.DEVNULL)
    for ctx in ("qemu:dirty-bitmap:t1", "qemu:dirty-bitmap:m1",
                "qemu:dirty-bitmap:off", "qemu:dirty-bitmap:nope"):
        nbd_map(d, log, "top", ctx)
    # Not vacuous: the writes show in t1's map, m1 (disabled) is clean.
    if "1  dirty" not in log[-4][1] or "dirty" in log[-3][1].replace("clean", ""):
        raise SystemExit("%s: unexpected maps %r" % (m.argv[0], log[-4:]))
    bitmaps(m, log)
    C(m, log, "block-export-del", id="e")
    bitmaps(m, log)
    C(m, log, "block-dirty-bitmap-remove", node="top", name="t1")
    # The legacy command: a disabled bitmap on a read-only export.
    C(m, log, "nbd-server-add", device="top", name="legacy", bitmap="off")
    C(m, log, "nbd-server-add", device="top", name="legacy2", bitmap="nope")
    bitmaps(m, log)
    nbd_map(d, log, "legacy", "qemu:dirty-bitmap:off")
    C(m, log, "nbd-server-remove", name="legacy")
exports.top_changes = True

failed = compare_jobs([exports], top, vdisk, qemu_img)
for f in failed:
    print(f)
sys.exit(1 if failed else 0)
PYEOF
echo "QMP bitmap exports: same as qemu-storage-daemon"
