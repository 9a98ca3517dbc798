#!/usr/bin/env bash
# qemu-img convert and vdisk convert side by side over ssh: a throwaway
# sshd on 127.0.0.1 (tests/cli/ssh-server.bash; run as root), an image
# of random data (BENCH_SSH_MB MiB, default 256) and three cases, each
# run 3 times alternating the tools: ssh raw -> local qcow2 (pull), local
# raw -> ssh raw (push), and ssh qcow2 -> local qcow2. Prints the median
# wall times, the ratio (QEMU time / vdisk time: above 1 means vdisk is
# faster) and the peak RSS of each tool (largest of the runs). Every
# copy is checked against the source once.
#
#   VDISK      the binary (default: build/tools/vdisk of this tree)
#   BENCH_DIR  where the scratch directory goes (default /var/tmp)
set -e -o pipefail

here=$(cd "$(dirname "$0")" && pwd)
VDISK=${VDISK:-$here/../build/tools/vdisk}
MB=${BENCH_SSH_MB:-256}
[ -x "$VDISK" ] || { echo "no vdisk at $VDISK (set VDISK)" >&2; exit 1; }
command -v qemu-img >/dev/null || { echo "qemu-img missing" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "/usr/bin/time missing (apt-get install time)" >&2; exit 1; }

# The stand-ins of tests/functions.sh that ssh-server.bash uses.
_cleanups=()
cleanup_fn() { _cleanups+=("$(printf '%q ' "$@")"); }
fail() { echo "FAIL: $*" >&2; exit 1; }
work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/vdisk-bench-ssh.XXXXXX")
trap 'for ((i=${#_cleanups[@]}-1; i>=0; i--)); do eval "${_cleanups[i]}"; done;
      cd /; rm -rf "$work"' EXIT
cd "$work"
source "$here/../tests/cli/ssh-server.bash"
ssh_server_requires
ssh_server_start
NO='?host_key_check=no'
R=$SSH_URI_BASE$SSH_DIR

head -c $((MB * 1024 * 1024)) /dev/urandom >local.raw
cp local.raw "$SSH_DIR/src.raw"
qemu-img convert -f raw -O qcow2 local.raw "$SSH_DIR/src.qcow2"

# run TOOL ARGS...: wall seconds and peak KiB of one run, to stdout.
run()
{
    local tool=$1
    shift
    rm -f out.qcow2 "$SSH_DIR/out.raw"
    /usr/bin/time -f '%e %M' -o t.txt "$tool" convert "$@" >/dev/null
    cat t.txt
}

median() { sort -n | sed -n 2p; }

printf '%-28s %9s %9s %7s %10s %10s\n' case qemu-s vdisk-s ratio \
    qemu-KiB vdisk-KiB
bench_case()
{
    local name=$1 check=$2
    shift 2
    local q=() v=() qm=0 vm=0 t m i
    for i in 1 2 3; do
        read -r t m < <(run qemu-img "$@")
        q+=("$t"); [ "$m" -gt "$qm" ] && qm=$m
        read -r t m < <(run "$VDISK" "$@")
        v+=("$t"); [ "$m" -gt "$vm" ] && vm=$m
        if [ "$i" = 1 ]; then
            qemu-img compare -f raw local.raw "$check" >/dev/null ||
                fail "$name: vdisk's copy differs from the source"
        fi
    done
    local qs vs
    qs=$(printf '%s\n' "${q[@]}" | median)
    vs=$(printf '%s\n' "${v[@]}" | median)
    printf '%-28s %9s %9s %7.2f %10s %10s\n' "$name" "$qs" "$vs" \
        "$(echo "$qs / $vs" | bc -l)" "$qm" "$vm"
}

bench_case "ssh raw -> local qcow2" out.qcow2 \
    -f raw -O qcow2 "$R/src.raw$NO" out.qcow2
bench_case "local raw -> ssh raw" "$SSH_DIR/out.raw" \
    -f raw -O raw local.raw "$R/out.raw$NO"
bench_case "ssh qcow2 -> local qcow2" out.qcow2 \
    -f qcow2 -O qcow2 "$R/src.qcow2$NO" out.qcow2
