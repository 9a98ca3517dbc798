#!/usr/bin/env bash
# The throttle filter under fio through NBD exports of `vdisk serve`:
# over 10 s a byte rate and an operation rate hold the configured limits
# within 5% (iops-size too), two nodes of one group share its budget
# evenly, a burst (*-max, *-max-length) lasts as long and goes as fast as
# QEMU's leaky bucket says and as qemu-storage-daemon's does with the
# same limits, a request larger than the burst completes (never fails),
# and a qom-set of the limits takes effect at once. Every expectation is
# computed from the configured limits; docs/throttle.md has the model.
source "$(dirname "$0")/../functions.sh"
requires fio python3 timeout qemu-storage-daemon qemu-io
requires_run fio --enghelp=nbd
tmpdir

MiB=1048576
daemons=()
stop_all()
{
    local p
    for p in "${daemons[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    for p in "${daemons[@]}"; do
        wait "$p" 2>/dev/null || true
    done
    daemons=()
}
cleanup_fn stop_all

# start NAME PROGRAM GROUP... : a daemon (vdisk serve or
# qemu-storage-daemon, the same command line) with a QMP monitor on
# NAME.qmp and an NBD server on NAME.sock. Each GROUP is
# "ID:NODES:LIMITS": throttle group ID with LIMITS (comma-separated
# limits.* options) and NODES throttle nodes ID-1.. in it, each over a
# null-co node and exported under its node name.
start()
{
    local name=$1 prog=$2 g id nodes limits i args=() exports=()
    shift 2
    for g in "$@"; do
        IFS=: read -r id nodes limits <<< "$g"
        args+=(--object "throttle-group,id=$id,$limits")
        for ((i = 1; i <= nodes; i++)); do
            args+=(--blockdev "driver=null-co,node-name=n-$id-$i,size=1073741824"
                   --blockdev "driver=throttle,node-name=$id-$i,throttle-group=$id,file=n-$id-$i")
            exports+=(--export "type=nbd,id=e-$id-$i,node-name=$id-$i,name=$id-$i,writable=on")
        done
    done
    # qemu-storage-daemon wants the server before the exports.
    args+=(--nbd-server "addr.type=unix,addr.path=$PWD/$name.sock"
           "${exports[@]}")
    rm -f "$name.sock" "$name.qmp"
    if [ "$prog" = vdisk ]; then
        set -- "$VDISK" serve
    else
        set -- qemu-storage-daemon
    fi
    timeout 120 "$@" "${args[@]}" \
        --chardev "socket,id=m,path=$PWD/$name.qmp,server=on,wait=off" \
        --monitor chardev=m > "$name.log" 2>&1 &
    daemons+=($!)
    for ((i = 0; i < 100; i++)); do
        [ -S "$name.sock" ] && return 0
        sleep 0.05
    done
    cat "$name.log"
    fail "$prog did not start"
}

# fio_job JOB SOCK EXPORT SECONDS RW BS [DEPTH]: one fio job section
# (its bandwidth log, one sample per quarter second, is JOB_bw.N.log,
# N the job's number in its file).
fio_job()
{
    cat <<EOF
[$1]
ioengine=nbd
uri=nbd+unix:///$3?socket=$PWD/$2
rw=$5
bs=$6
iodepth=${7:-4}
time_based=1
runtime=$4
size=1G
write_bw_log=$1
log_avg_msec=250
EOF
}

# run_fio FILE: runs the job file (its jobs at the same time); prints
# "JOB BYTES IOS RUNTIME_MS" per job (reads and writes summed).
run_fio()
{
    timeout 60 fio --output-format=json --output="$1.json" "$1" > /dev/null ||
        { cat "$1.json"; fail "fio $1 failed"; }
    python3 - "$1.json" <<'PYEOF'
import json, sys
text = open(sys.argv[1]).read()
d = json.loads(text[text.index("{"):])
for j in d["jobs"]:
    if j["error"]:
        sys.exit("fio job %s: error %d" % (j["jobname"], j["error"]))
    b = j["read"]["io_bytes"] + j["write"]["io_bytes"]
    n = j["read"]["total_ios"] + j["write"]["total_ios"]
    print(j["jobname"], b, n, j["job_runtime"])
PYEOF
}

# within VALUE EXPECTED PERCENT WHAT
within()
{
    python3 -c "
import sys
v, e, p = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
ok = abs(v - e) <= e * p / 100
print('%s: %.1f, expected %.1f (%+.2f%%) %s' % (sys.argv[4], v, e, 100 * (v - e) / e, 'ok' if ok else 'OUT OF RANGE'))
sys.exit(0 if ok else 1)" "$1" "$2" "$3" "$4" || fail "$4 outside ±$3%"
}

# expected RATE MS: what RATE moves in MS milliseconds. A bucket without
# a burst rate holds a tenth of a second of its rate before requests
# wait, so T seconds move (T + 0.1) * RATE.
expected()
{
    python3 -c "print($1 * ($2 / 1000 + 0.1))"
}

# ---- 10 s: a byte rate shared by two nodes; operation rates -----------

# Two daemons at once: group "b" (bps-total=4M) with two nodes, a
# writer and a reader; group "i" (iops-read=200) with 4k random reads
# and group "s" (iops-write=100, iops-size=16k) with 64k writes, each of
# which counts as four operations.
start r vdisk "b:2:limits.bps-total=$((4 * MiB))" \
    "i:1:limits.iops-read=200" \
    "s:1:limits.iops-write=100,limits.iops-size=16384"
{
    fio_job w r.sock b-1 10 write 64k
    fio_job rd r.sock b-2 10 read 64k
    fio_job io r.sock i-1 10 randread 4k
    fio_job sz r.sock s-1 10 write 64k
} > rates.fio
run_fio rates.fio > rates.out
stop_all
read -r _ bw _ msw < <(grep '^w ' rates.out)
read -r _ br _ _ < <(grep '^rd ' rates.out)
read -r _ _ ios msi < <(grep '^io ' rates.out)
read -r _ _ szios mss < <(grep '^sz ' rates.out)
within "$((bw + br))" "$(expected $((4 * MiB)) "$msw")" 5 \
       "bps-total=4M over two nodes: bytes in $msw ms"
within "$ios" "$(expected 200 "$msi")" 5 \
       "iops-read=200: 4k reads in $msi ms"
within "$szios" "$(expected 25 "$mss")" 5 \
       "iops-write=100,iops-size=16k: 64k writes in $mss ms"
# Fair: the round robin hands the group's budget over request by
# request, so the writer and the reader each get half of it.
within "$bw" "$(((bw + br) / 2))" 5 "two nodes: the writer's share"

# ---- a burst, against the model and qemu-storage-daemon ---------------

# 1 MiB/s with bursts of 4 MiB/s for 2 s, the same fio job against
# both daemons at the same time; the quarter-second bandwidth log says
# how long the burst lasted and how fast it went.
burst="limits.bps-total=$MiB,limits.bps-total-max=$((4 * MiB)),limits.bps-total-max-length=2"
start bv vdisk "t:1:$burst"
start bq qsd "t:1:$burst"
{
    fio_job bvdisk bv.sock t-1 6 write 64k
    fio_job bqemu bq.sock t-1 6 write 64k
} > burst.fio
run_fio burst.fio > /dev/null
stop_all
python3 - "$MiB" "$((4 * MiB))" 2 <<'PYEOF' || fail "the burst is not as configured or differs from qemu-storage-daemon's"
import glob, sys
MiB = 1048576
avg, peak, length = (float(a) for a in sys.argv[1:4])
# QEMU's leaky bucket: the burst bucket (peak * length) fills at
# peak - avg while requests go at the peak rate, so the burst lasts
# peak * length / (peak - avg) seconds; then the average applies.
model_ms = 1000 * peak * length / (peak - avg)
def phases(name):
    # (time ms, bytes/s) per quarter second; the burst ends at the
    # first sample below the mean of the two rates.
    # (fio numbers the logs by job: bqemu_bw.2.log.)
    rows = [line.split(",") for line in open(glob.glob(name)[0])]
    samples = [(int(r[0]), int(r[1]) * 1024) for r in rows]
    end = next((t for t, bw in samples if bw < (avg + peak) / 2), None)
    if end is None:
        sys.exit("%s: no end of the burst" % name)
    # (The first sample also carries the tenth of a second of the peak
    # rate that the burst's own bucket lets through at once; the last
    # may cover less than a quarter of a second.)
    fast = [bw for t, bw in samples if 250 < t < end - 250]
    slow = [bw for t, bw in samples[:-1] if t > end + 500]
    return end, sum(fast) / len(fast), sum(slow) / len(slow)
v, q = phases("bvdisk_bw.*.log"), phases("bqemu_bw.*.log")
print("model: burst of %.0f ms at %.2f MiB/s, then %.2f MiB/s" %
      (model_ms, peak / MiB, avg / MiB))
for who, p in (("vdisk", v), ("qemu", q)):
    print("%-6s burst ends at %d ms (%+.1f%% of the model), %.2f MiB/s "
          "(%+.1f%%), then %.2f MiB/s (%+.1f%%)" %
          (who + ":", p[0], 100 * (p[0] - model_ms) / model_ms, p[1] / MiB,
           100 * (p[1] - peak) / peak, p[2] / MiB, 100 * (p[2] - avg) / avg))
# The log's quarter-second samples make the end of the burst known to
# within a sample either way: 375 ms of the model and of QEMU's; the
# rates within 5% of the configured ones and of QEMU's.
ok = abs(v[0] - model_ms) <= 375 and abs(v[0] - q[0]) <= 375
ok = ok and abs(v[1] - peak) <= 0.05 * peak and abs(v[1] - q[1]) <= 0.05 * q[1]
ok = ok and abs(v[2] - avg) <= 0.05 * avg and abs(v[2] - q[2]) <= 0.05 * q[2]
sys.exit(0 if ok else 1)
PYEOF

# ---- a request larger than the burst ----------------------------------

# Two 8 MiB writes at 2 MiB/s (a bucket of a tenth of that): the first
# goes at once (the bucket was empty) and fills it far beyond its size,
# the second waits until all but the tenth of a second has leaked,
# (8M - 0.2M) / 2M = 3.9 s; both succeed, on both daemons at once.
start gv vdisk "t:1:limits.bps-total=$((2 * MiB))"
start gq qsd "t:1:limits.bps-total=$((2 * MiB))"
writers=()
for prog in gv gq; do
    ( t0=$(date +%s%N)
      $QEMU_IO -f raw -c 'write -P 0 0 8M' -c 'write -P 0 8M 8M' \
          "nbd+unix:///t-1?socket=$PWD/$prog.sock" > "$prog.out"
      echo $((($(date +%s%N) - t0) / 1000000)) > "$prog.ms" ) &
    writers+=($!)
done
for p in "${writers[@]}"; do
    wait "$p" || fail "qemu-io failed"
done
stop_all
for prog in gv gq; do
    grep -c '^wrote 8388608/8388608' "$prog.out" | grep -qx 2 ||
        { cat "$prog.out"; fail "$prog: a large request failed"; }
done
# Never faster than the limit allows; slower only by the transfers and
# qemu-io's start (a loaded machine: up to 20%); as long as QEMU's.
python3 -c "
import sys
v = float(sys.argv[1])
print('two 8M writes at 2M/s: vdisk, %d ms, the model 3900 ms (%+.1f%%)' % (v, 100 * (v - 3900) / 3900))
sys.exit(0 if 0.95 * 3900 <= v <= 1.2 * 3900 else 1)" "$(cat gv.ms)" ||
    fail "two 8M writes at 2M/s: not as long as the limit says"
within "$(cat gv.ms)" "$(cat gq.ms)" 15 \
       "two 8M writes at 2M/s: vdisk against qemu-storage-daemon, ms"

# ---- limits changed at run time ---------------------------------------

# qom-set of the group's limits: the next second runs at the new rate.
# The setter waits for fio's first write to reach the node (fio's log
# counts from about then) and sets the limits 2 s later.
start q vdisk "t:1:limits.bps-total=$MiB"
fio_job c q.sock t-1 4 write 64k > change.fio
python3 - "$PWD/q.qmp" > qom.out 2>&1 <<'PYEOF' &
import json, socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rb", buffering=0)
f.readline()
def cmd(req):
    s.sendall(json.dumps(req).encode() + b"\n")
    while True:
        r = json.loads(f.readline())
        if "event" not in r:
            break
    if "error" in r:
        sys.exit(str(r))
    return r["return"]
cmd({"execute": "qmp_capabilities"})
deadline = time.time() + 30
while time.time() < deadline:
    st = cmd({"execute": "query-blockstats",
              "arguments": {"query-nodes": True}})
    if any(b.get("node-name") == "t-1" and b["stats"]["wr_bytes"] > 0
           for b in st):
        break
    time.sleep(0.01)
else:
    sys.exit("fio's writes never arrived")
time.sleep(2)
cmd({"execute": "qom-set", "arguments": {"path": "t", "property": "limits",
     "value": {"bps-total": 4 * 1048576}}})
PYEOF
setter=$!
run_fio change.fio > /dev/null
wait "$setter" || { cat qom.out; fail "qom-set failed"; }
stop_all
python3 - <<'PYEOF' || fail "the new limits did not apply"
MiB = 1048576
s = [(int(r.split(",")[0]), int(r.split(",")[1]) * 1024)
     for r in open("c_bw.1.log")]
before = [bw for t, bw in s if 500 <= t <= 1750]
after = [bw for t, bw in s[:-1] if t >= 2750]
b, a = sum(before) / len(before), sum(after) / len(after)
print("before: %.2f MiB/s, after: %.2f MiB/s" % (b / MiB, a / MiB))
assert abs(b - MiB) <= 0.1 * MiB and abs(a - 4 * MiB) <= 0.1 * 4 * MiB
PYEOF
exit 0
