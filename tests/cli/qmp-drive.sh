#!/usr/bin/env bash
# drive-backup and drive-mirror, which create their target image first,
# under `vdisk serve` and qemu-storage-daemon, one QMP script sent to
# both on twin chains (base <- mid <- top): replies and events compared,
# and the targets checked once the daemons have exited: a full backup or
# mirror equals the top as it was, a sync=top one gets the source's
# backing file (absolute-paths) and equals it through that chain, and a
# completed drive-mirror serves the export's later writes. Also QEMU's
# refusals (unknown formats, existing targets that are not there,
# replaces without node-name).
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-storage-daemon python3 timeout
source "$(dirname "$0")/qmp-functions.bash"
tmpdir
qmp_lib

timeout 300 python3 - "$PWD" "$VDISK" "$QEMU_IMG" <<'PYEOF' || fail "drive-backup/drive-mirror differ from qemu-storage-daemon"
import os, subprocess, sys, time
from qmplib import *

top, vdisk, qemu_img = sys.argv[1], sys.argv[2], sys.argv[3]

def C(m, log, cmd, **a):
    log.append(m.cmd({"execute": cmd, "arguments": a}))

def wait_ready(m):
    for _ in range(3000):
        if any(e["event"] == "BLOCK_JOB_READY" for e in m.events):
            return
        m.cmd({"execute": "query-jobs"})
        time.sleep(0.01)
    raise SystemExit("never ready")

def refusals(m, d, log):
    add_chain(m)
    C(m, log, "drive-backup", device="top", target="@D@/t.qcow2", sync="full", format="nope", **{"job-id": "j"})
    C(m, log, "drive-backup", device="nope", target="@D@/t.qcow2", sync="full", **{"job-id": "j"})
    C(m, log, "drive-mirror", device="top", target="@D@/t.qcow2", sync="full", replaces="mid", **{"job-id": "j"})
    C(m, log, "drive-mirror", device="mid", target="@D@/t.qcow2", sync="full", **{"job-id": "j"})
    C(m, log, "drive-mirror", device="top", target="@D@/t.qcow2", sync="full", format="nope", **{"job-id": "j"})
    log.append(os.path.exists(d + "/t.qcow2"))

def backup_full(m, d, log):
    add_chain(m)
    C(m, log, "drive-backup", device="top", target="@D@/tgt.qcow2", sync="full", **{"job-id": "b"})
    wait_status(m, "b", (None,))

def top_only(m):
    # The chain from the images' headers: QEMU names a chain given by node
    # references with json: file names, which would end up in the new
    # target's header.
    m.cmd({"execute": "blockdev-add", "arguments": {"driver": "qcow2",
           "node-name": "top", "file": {"driver": "file",
                                        "filename": "@D@/top.qcow2"}}})

def backup_top(m, d, log):
    top_only(m)
    C(m, log, "drive-backup", device="top", target="@D@/tgt.qcow2", sync="top", **{"job-id": "b"})
    wait_status(m, "b", (None,))

def mirror_full(m, d, log):
    add_chain(m)
    C(m, log, "drive-mirror", device="top", target="@D@/tgt.qcow2", sync="full", **{"job-id": "m"})
    wait_ready(m)
    C(m, log, "job-complete", id="m")
    wait_status(m, "m", (None,))

def mirror_top(m, d, log):
    top_only(m)
    C(m, log, "drive-mirror", device="top", target="@D@/tgt.qcow2", sync="top",
      **{"job-id": "m", "node-name": "tn"})
    wait_ready(m)
    C(m, log, "job-complete", id="m")
    wait_status(m, "m", (None,))
    r = m.cmd({"execute": "query-named-block-nodes", "arguments": {"flat": True}})
    log.append(sorted(n["node-name"] for n in r["return"] if not n["node-name"].startswith("#")))

def target_state(d):
    info = subprocess.run([qemu_img, "info", d + "/tgt.qcow2"], capture_output=True,
                          text=True).stdout
    backing = [l.split(": ", 1)[1].replace(d, "@D@") for l in info.splitlines()
               if l.startswith("backing file: ")]
    same = subprocess.run([qemu_img, "compare", "-f", "raw", "-F", "qcow2",
                           d + "/before.raw", d + "/tgt.qcow2"], capture_output=True)
    return [("target backing", backing), ("target is the start", same.returncode)]

for sc in (backup_full, backup_top, mirror_full, mirror_top):
    sc.post = target_state
failed = compare_jobs([refusals, backup_full, backup_top, mirror_full, mirror_top],
                      top, vdisk, qemu_img)
for f in failed:
    print(f)
sys.exit(1 if failed else 0)
PYEOF
