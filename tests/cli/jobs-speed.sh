#!/usr/bin/env bash
# A job's speed limit holds: a full mirror of a 320 MiB disk at
# speed=10M under `vdisk serve` copies 10 MiB/s within 10% over 10 s
# (progress read from query-block-jobs at both ends of the window), a
# block-job-set-speed to 20M doubles the rate at once, and speed 0 lets
# it finish. qemu-storage-daemon runs the same script and its rate is
# printed beside vdisk's, for reference.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-storage-daemon python3 timeout
source "$(dirname "$0")/qmp-functions.bash"
tmpdir
qmp_lib

timeout 200 python3 - "$PWD" "$VDISK" "$QEMU_IMG" <<'PYEOF' || fail "the speed limit does not hold"
import os, subprocess, sys, time
from qmplib import *

top, vdisk, qemu_img = sys.argv[1], sys.argv[2], sys.argv[3]
M = 1 << 20

def offset(m):
    return m.cmd({"execute": "query-block-jobs"})["return"][0]["offset"]

def rate(m, secs):
    a, t = offset(m), time.time()
    time.sleep(secs)
    b, u = offset(m), time.time()
    return (b - a) / (u - t)

failed = []
for name, argv in (("qemu", ["qemu-storage-daemon"]), ("vdisk", [vdisk, "serve"])):
    d = os.path.join(top, name)
    os.makedirs(d)
    for f in ("src", "dst"):
        subprocess.run([qemu_img, "create", "-q", "-f", "raw", d + "/%s.raw" % f,
                        "320M"], check=True)
    m = Monitor(argv, d)
    for f in ("src", "dst"):
        m.cmd({"execute": "blockdev-add", "arguments": {
            "driver": "raw", "node-name": f,
            "file": {"driver": "file", "filename": "@D@/%s.raw" % f}}})
    r = m.cmd({"execute": "blockdev-mirror", "arguments": {
        "device": "src", "target": "dst", "sync": "full", "job-id": "m",
        "speed": 10 * M}})
    time.sleep(1)                       # past the first burst
    r10 = rate(m, 10)
    m.cmd({"execute": "block-job-set-speed", "arguments": {"device": "m", "speed": 20 * M}})
    time.sleep(0.5)
    r20 = rate(m, 3)
    m.cmd({"execute": "block-job-set-speed", "arguments": {"device": "m", "speed": 0}})
    wait_status(m, "m", ("ready",))
    m.cmd({"execute": "job-cancel", "arguments": {"id": "m"}})
    wait_status(m, "m", (None,))
    m.cmd({"execute": "quit"})
    m.close()
    print("%-6s 10M: %.2f MiB/s (%.1f%%), 20M: %.2f MiB/s" % (
        name, r10 / M, (r10 / (10 * M) - 1) * 100, r20 / M))
    if name == "vdisk":
        if abs(r10 / (10 * M) - 1) > 0.10:
            failed.append("speed=10M gave %.2f MiB/s" % (r10 / M))
        if abs(r20 / (20 * M) - 1) > 0.15:
            failed.append("speed=20M gave %.2f MiB/s" % (r20 / M))
for f in failed:
    print(f)
sys.exit(1 if failed else 0)
PYEOF
