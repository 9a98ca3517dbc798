#!/usr/bin/env bash
# Writes the ABI description of a built libvdisk.so.0 with abidw
# (abigail-tools): every exported function with its version node and the
# public types it reaches, types defined outside include/vdisk/ dropped.
#   scripts/abi-update.sh [BUILDDIR [OUT]]
# Without OUT it regenerates the stored baseline abi/libvdisk.abi from
# BUILDDIR (default build/): run it deliberately, when a version node is
# released or together with a SONAME bump (docs/library.md, "Library
# ABI"), never to make tests/cli/abi.sh pass. tests/cli/abi.sh runs it
# with OUT to describe the build under test the same way.
#
# The description is the same for the plain and the sanitizer build of
# the same compiler (ASan and UBSan instrument code, not types), which is
# why the list of needed libraries is left out; it needs DWARF, which
# meson's default buildtype (debugoptimized) has and a release build
# does not.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
builddir=${1:-$root/build}
out=${2:-$root/abi/libvdisk.abi}
lib=$builddir/libvdisk.so.0

die()
{
    echo "abi-update.sh: $*" >&2
    exit 1
}

command -v abidw >/dev/null 2>&1 ||
    die "abidw not found (Debian: apt-get install abigail-tools)"
[ -e "$lib" ] || die "$lib: no such file (build the library first)"
readelf -S --wide "$lib" | grep -q ' \.debug_info ' ||
    die "$lib has no DWARF (.debug_info): build with debug info (-g)"

abidw --no-corpus-path --no-comp-dir-path --no-elf-needed \
    --type-id-style hash \
    --headers-dir "$root/include/vdisk" --drop-private-types \
    --out-file "$out.tmp" "$lib"
mv "$out.tmp" "$out"
if [ $# -lt 2 ]; then
    echo "abi-update.sh: wrote $out from $lib" \
         "($(grep -c '<elf-symbol ' "$out") symbols)"
fi
