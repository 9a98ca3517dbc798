#!/usr/bin/env bash
# The nbd client side by side: qemu-img convert and vdisk convert on the
# same NBD servers, alternately, medians of BENCH_RUNS runs:
#  1. remote -> local: an export of BENCH_SIZE (default 1 GiB: 3/4 random
#     data in 4 MiB runs, 1/4 holes) read into a local qcow2, from
#     qemu-nbd (one connection: requests in flight over it) and from
#     nbdkit's file plugin (threaded, offers multi-conn);
#  2. local -> remote: the same raw file written into an export (convert
#     -n onto a raw file exported by qemu-nbd, then by nbdkit).
# Prints the median seconds, the ratio (QEMU's time / vdisk's: above 1
# means vdisk is faster; issue 15's target is 1.5) and the peak RSS of
# each tool (/usr/bin/time %M, the largest of the runs). Each vdisk copy
# is checked against the source with qemu-img compare.
#
#   bench/remote-nbd.sh
#
# Environment: BENCH_RUNS (3), BENCH_SIZE (1G), BENCH_DIR (/dev/shm when
# writable, else /var/tmp), VDISK (default build*/tools/vdisk here).
# Needs qemu-img, qemu-nbd, nbdkit, python3, GNU time.
set -u -o pipefail

here=$(cd "$(dirname "$0")" && pwd)
srcdir=$(dirname "$here")
VDISK=${VDISK:-$(ls -d "$srcdir"/build/tools/vdisk "$srcdir"/build*/tools/vdisk 2>/dev/null | head -1)}
if [ ! -x "$VDISK" ]; then
    echo "$0: set VDISK to the vdisk binary" >&2
    exit 2
fi
for c in qemu-img qemu-nbd nbdkit python3 /usr/bin/time; do
    command -v "$c" >/dev/null || { echo "$0: $c is required" >&2; exit 2; }
done
runs=${BENCH_RUNS:-3}
size=${BENCH_SIZE:-1G}
dflt=/var/tmp
[ -d /dev/shm ] && [ -w /dev/shm ] && dflt=/dev/shm
work=$(mktemp -d "${BENCH_DIR:-$dflt}/vdisk-nbd-bench.XXXXXX") || exit 2
cleanups=()
cleanup_fn() { cleanups+=("$(printf '%q ' "$@")"); }
finish()
{
    local i
    for ((i = ${#cleanups[@]} - 1; i >= 0; i--)); do eval "${cleanups[i]}"; done
    rm -rf "$work"
}
trap finish EXIT
trap 'exit 130' INT TERM
# shellcheck source=../tests/cli/nbd-servers.bash
source "$srcdir/tests/cli/nbd-servers.bash"
cd "$work" || exit 2

# The source: 4 MiB runs of random data, every fourth one a hole.
python3 - "$size" <<'EOF'
import os, sys
s = sys.argv[1]
n = int(s[:-1]) << {"K": 10, "M": 20, "G": 30}[s[-1]] if s[-1] in "KMG" else int(s)
run = 4 << 20
with open("src.raw", "wb") as f:
    f.truncate(n)
    for i, off in enumerate(range(0, n, run)):
        if i % 4 != 3:
            f.seek(off)
            f.write(os.urandom(min(run, n - off)))
EOF

# timed NAME CMD...: runs CMD under GNU time; appends "secs rss_kib" to
# NAME.times; a failure is recorded as FAILED.
timed()
{
    local name=$1
    shift
    if /usr/bin/time -f '%e %M' -o t.out "$@" > run.out 2>&1; then
        cat t.out >> "$name.times"
    else
        echo "FAILED" >> "$name.times"
        sed 's/^/    /' run.out >&2
    fi
}

# report LABEL: medians and ratio of qemu.times and vdisk.times.
report()
{
    python3 - "$1" <<'EOF'
import statistics, sys
def load(n):
    rows = [l.split() for l in open(n + ".times")]
    if any(r[0] == "FAILED" for r in rows):
        return None, None
    return statistics.median(float(r[0]) for r in rows), max(int(r[1]) for r in rows)
q, qr = load("qemu")
v, vr = load("vdisk")
if q is None or v is None:
    print(f"{sys.argv[1]:<34} FAILED")
else:
    print(f"{sys.argv[1]:<34} qemu {q:6.2f}s  vdisk {v:6.2f}s  ratio {q / max(v, 0.01):5.2f}"
          f"  rss qemu {qr // 1024} MiB, vdisk {vr // 1024} MiB")
EOF
    rm -f qemu.times vdisk.times
}

# read_case LABEL URI: remote -> local qcow2.
read_case()
{
    local label=$1 uri=$2 i
    for ((i = 0; i < runs; i++)); do
        rm -f out.qcow2
        timed qemu qemu-img convert -O qcow2 "$uri" out.qcow2
        rm -f out.qcow2
        timed vdisk "$VDISK" convert -O qcow2 "$uri" out.qcow2
        if [ "$i" = 0 ] && ! qemu-img compare -q -U src.raw out.qcow2; then
            echo "$label: vdisk's copy differs" >&2
            echo FAILED >> vdisk.times
        fi
    done
    rm -f out.qcow2
    report "$label"
}

echo "nbd client: qemu-img convert vs $VDISK convert, $runs run(s), $size"
nbds_qemu_nbd qn.pid - -r -f raw src.raw || exit 1
read_case "qemu-nbd -> local qcow2" "nbd://127.0.0.1:$NBDS_PORT"
nbds_stop qn.pid
nbds_nbdkit nk.pid - --readonly file src.raw || exit 1
read_case "nbdkit file -> local qcow2" "nbd://127.0.0.1:$NBDS_PORT"
nbds_stop nk.pid

cp --sparse=always src.raw dst.raw
nbds_qemu_nbd qw.pid - -f raw dst.raw || exit 1
uri="nbd://127.0.0.1:$NBDS_PORT"
for ((i = 0; i < runs; i++)); do
    timed qemu qemu-img convert -n -f raw -O raw src.raw "$uri"
    timed vdisk "$VDISK" convert -n -f raw -O raw src.raw "$uri"
done
report "local raw -> qemu-nbd"
nbds_stop qw.pid
cmp -s src.raw dst.raw || echo "local -> qemu-nbd: the export differs" >&2

cp --sparse=always src.raw dst2.raw
nbds_nbdkit nw.pid - file dst2.raw || exit 1
uri="nbd://127.0.0.1:$NBDS_PORT"
for ((i = 0; i < runs; i++)); do
    timed qemu qemu-img convert -n -f raw -O raw src.raw "$uri"
    timed vdisk "$VDISK" convert -n -f raw -O raw src.raw "$uri"
done
report "local raw -> nbdkit file"
nbds_stop nw.pid
cmp -s src.raw dst2.raw || echo "local -> nbdkit: the export differs" >&2
