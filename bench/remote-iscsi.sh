#!/usr/bin/env bash
# iSCSI convert throughput: vdisk against qemu-img 7.2 (QEMU's iscsi
# driver) side by side on the same tgtd target, both directions:
#
#   iscsi -> local qcow2   convert -O qcow2 iscsi://.../1 out.qcow2
#   local -> iscsi         convert -n -O raw src.raw iscsi://.../1
#
#   bench/remote-iscsi.sh [RUNS]     (default 3 runs per tool and case)
#
# BENCH_SIZE is the LUN's size (default 1G, filled with random data on
# a tmpfs-free thick LUN: tgtd's backing file in BENCH_DIR, default
# /var/tmp), VDISK the binary (default build*/tools/vdisk, preferably a
# release build). Needs root (tgtd), qemu-img with the iscsi driver
# (Debian's qemu-block-extra) and GNU time. Prints the median wall time,
# the ratio vdisk speed / qemu-img speed (above 1: vdisk is faster) and
# each tool's median peak RSS. Both tools run with their defaults
# (8 requests in flight: qemu-img's coroutines on one session, vdisk's
# threads on its pool of sessions; convert's default cache modes).
set -e -o pipefail

runs=${1:-3}
size=${BENCH_SIZE:-1G}
dir=${BENCH_DIR:-/var/tmp}
here=$(cd "$(dirname "$0")/.." && pwd)
# The release build first: ls sorts build-asan before build.
if [ -z "${VDISK:-}" ] && [ -x "$here/build/tools/vdisk" ]; then
    VDISK=$here/build/tools/vdisk
fi
VDISK=${VDISK:-$(ls "$here"/build*/tools/vdisk 2>/dev/null | head -1)}
echo "vdisk: $VDISK" >&2
[ -x "$VDISK" ] || { echo "set VDISK=path/to/vdisk" >&2; exit 1; }
command -v qemu-img >/dev/null || { echo "needs qemu-img" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "needs GNU time" >&2; exit 1; }

work=$(mktemp -d "$dir/vdisk-iscsibench.XXXXXX")
cd "$work"
# The helpers of the tests: tgtd start/stop by PID, LUN setup.
_cleanups=()
cleanup_fn() { _cleanups+=("$*"); }
fail() { echo "FAIL: $*" >&2; exit 1; }
trap 'for c in "${_cleanups[@]}"; do $c; done; cd /; rm -rf "$work"' EXIT
source "$here/tests/cli/iscsi-target.bash"

bytes=$(numfmt --from=iec "$size")
echo "preparing a $size LUN and a local $size raw image..." >&2
head -c "$bytes" /dev/urandom > src.raw
cp src.raw lun.img
iscsi_target_start
URI=$(iscsi_target_lun 1 bench lun.img 512 0)

# run TOOL CASE: one timed convert; prints "seconds rss_kib".
run()
{
    local prog=qemu-img
    [ "$1" = vdisk ] && prog=$VDISK
    rm -f out.qcow2
    case $2 in
        read)  args=(convert -O qcow2 "$URI" out.qcow2) ;;
        write) args=(convert -n -O raw src.raw "$URI") ;;
    esac
    sync
    /usr/bin/time -f "%e %M" -o t.out "$prog" "${args[@]}" >/dev/null
    cat t.out
}

median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

declare -A secs rss
for r in $(seq "$runs"); do
    for c in read write; do
        for tool in qemu vdisk; do
            read -r s m < <(run $tool $c)
            secs[$tool.$c]+="$s "
            rss[$tool.$c]+="$m "
        done
    done
done
# The last write was vdisk's: the LUN must hold the source.
cmp src.raw lun.img || fail "the LUN differs from the source after vdisk's convert"

mib=$((bytes >> 20))
printf '%-22s %10s %10s %9s %9s %12s %12s\n' case "qemu s" "vdisk s" \
    "qemu MB/s" "vdisk MB/s" "speed ratio" "RSS q/v MiB"
for c in read write; do
    q=$(echo "${secs[qemu.$c]}" | median)
    v=$(echo "${secs[vdisk.$c]}" | median)
    qm=$(echo "${rss[qemu.$c]}" | median)
    vm=$(echo "${rss[vdisk.$c]}" | median)
    name="iscsi -> local qcow2"
    [ $c = write ] && name="local -> iscsi"
    printf '%-22s %10.2f %10.2f %9.0f %9.0f %12.2f %5d/%-6d\n' "$name" \
        "$q" "$v" "$(echo "$mib / $q" | bc -l)" "$(echo "$mib / $v" | bc -l)" \
        "$(echo "$q / $v" | bc -l)" $((qm >> 10)) $((vm >> 10))
done
