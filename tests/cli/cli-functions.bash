# Helpers for the tests of vdisk's qemu-img subcommands (tests/cli/cli-*.sh
# and the other scripts that compare a subcommand's output with qemu-img).
# Sourced after ../functions.sh. Both programs run on the same inputs and
# their combined stdout+stderr and exit statuses must be identical; vdisk
# runs under qemu-img's name ($VDISK_QEMU_IMG), so its messages start
# with "qemu-img: " as QEMU's do.
#
#   same ARGS...      run `qemu-img ARGS` with QEMU's and with vdisk's
#                     qemu-img in the current directory (for commands
#                     that only read)
#   same_rw ARGS...   run them in ./q and ./v respectively (for commands
#                     that write: each tool works on its own copy); call
#                     split_dirs first to copy the current inputs there
#   split_dirs        (re)create ./q and ./v as copies of the *.img and
#                     *.qcow2 files in the current directory

_compare_runs()
{
    local qrc=$1 vrc=$2
    shift 2
    if ! diff -u q.out v.out; then
        fail "output differs for: $*"
    fi
    if [ "$qrc" != "$vrc" ]; then
        fail "exit status qemu-img=$qrc vdisk=$vrc for: $*"
    fi
}

same()
{
    local qrc=0 vrc=0
    "$QEMU_IMG" "$@" > q.out 2>&1 || qrc=$?
    "$VDISK_QEMU_IMG" "$@" > v.out 2>&1 || vrc=$?
    _compare_runs "$qrc" "$vrc" "$@"
}

split_dirs()
{
    rm -rf q v
    mkdir q v
    for f in *.img *.qcow2; do
        [ -e "$f" ] || continue
        cp --sparse=always "$f" q/
        cp --sparse=always "$f" v/
    done
}

same_rw()
{
    local qrc=0 vrc=0
    (cd q && "$QEMU_IMG" "$@") > q.out 2>&1 || qrc=$?
    (cd v && "$VDISK_QEMU_IMG" "$@") > v.out 2>&1 || vrc=$?
    _compare_runs "$qrc" "$vrc" "$@"
}
