# Sourced by the bench scripts that share it (diff.sh, export-diff.sh,
# compact.sh, fmt-*.sh): sets here (bench/), srcdir (the tree) and VDISK, the
# binary under test: $VDISK when set, else the release build of this
# tree, else the normal build, else any other build*/tools/vdisk (a
# sanitizer build would time the sanitizer, and the glob alone sorts
# build-asan first). Exits 2 when none is found.
here=$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)
srcdir=$(dirname "$here")
if [ -z "${VDISK:-}" ]; then
    for VDISK in "$srcdir"/build-release/tools/vdisk \
                 "$srcdir"/build/tools/vdisk "$srcdir"/build*/tools/vdisk; do
        [ -x "$VDISK" ] && break
    done
fi
[ -x "$VDISK" ] || { echo "set VDISK=path/to/vdisk" >&2; exit 2; }
