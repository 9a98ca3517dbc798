# Sourced by the bench scripts that share it (diff.sh, export-diff.sh,
# compact.sh): sets here (bench/), srcdir (the tree) and VDISK, the
# binary under test: $VDISK when set, else the release build of this
# tree, else any build*/tools/vdisk (a sanitizer build times the
# sanitizer, so it comes last by luck of the glob only when nothing else
# is built). Exits 2 when none is found.
here=$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)
srcdir=$(dirname "$here")
if [ -z "${VDISK:-}" ]; then
    # The release build first (ls would sort build-asan before it).
    for VDISK in "$srcdir"/build-release/tools/vdisk \
                 "$srcdir"/build*/tools/vdisk; do
        [ -x "$VDISK" ] && break
    done
fi
[ -x "$VDISK" ] || { echo "set VDISK=path/to/vdisk" >&2; exit 2; }
