#!/usr/bin/env bash
# Set-up and demonstration in one command on a fresh Debian 12 (as root):
#   bash scripts/demo.sh
#
# 1. installs the Debian packages the build needs that are missing
#    (apt-get update runs only when something is missing);
# 2. builds vdisk with meson and ninja in build/;
# 3. in a scratch directory, creates a raw image, writes a pattern with
#    `vdisk io`, reads it back checking the pattern, and shows
#    `vdisk info` and `vdisk map --output=json`.
# Each demo step prints the command before its output.

set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

packages=(build-essential meson ninja-build pkg-config zlib1g-dev
          libbz2-dev
          libzstd-dev libjson-c-dev liburing-dev libnbd-dev libgnutls28-dev)

missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null |
            grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing: ${missing[*]}"
    sudo=
    [ "$(id -u)" != 0 ] && sudo=sudo
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -q </dev/null
    $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
fi

echo "== building in build/"
if [ -f build/build.ninja ]; then
    meson setup --reconfigure build >/dev/null
else
    meson setup build >/dev/null
fi
ninja -C build

vdisk=$root/build/tools/vdisk
scratch=$(mktemp -d "${TMPDIR:-/tmp}/vdisk-demo.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
cd "$scratch"

run()
{
    echo
    local a line='$ vdisk'
    for a in "$@"; do
        case $a in
        *[!A-Za-z0-9_./=:,-]*) line+=" '$a'" ;;
        *) line+=" $a" ;;
        esac
    done
    echo "$line"
    "$vdisk" "$@"
}

echo
echo "== raw image demo (in $scratch)"
run create -f raw demo.img 1M
run io -f raw -c 'write -P 0xab 0 64k' demo.img
# read -P fails (non-zero exit) when a byte differs from the pattern.
run io -f raw -c 'read -P 0xab 0 64k' demo.img
run info demo.img
run map -f raw --output=json demo.img

echo
echo "== qcow2: an overlay, a snapshot, a commit"
run create -q -f qcow2 base.qcow2 64M
run io -c 'write -P 0x11 0 1M' base.qcow2
run create -q -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2
run io -c 'write -P 0x22 512k 64k' overlay.qcow2
run snapshot -c before-zero overlay.qcow2
run io -c 'write -z 0 64k' overlay.qcow2
run snapshot -l overlay.qcow2
run map --output=json overlay.qcow2
run info --backing-chain overlay.qcow2
run check overlay.qcow2
run commit overlay.qcow2
run io -c 'read -P 0x22 512k 64k' -c 'read -P 0 0 64k' base.qcow2

echo
echo "== demo finished: vdisk works"
