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

# What the filesystem says a file occupies varies by a block between two
# runs of the same tool (ext4's extent blocks): disk sizes within 16 KiB
# count as equal, as in tests/compat/run.py, whose function this uses.
_reconcile_disk_sizes()
{
    python3 - "$(dirname "${BASH_SOURCE[0]}")/../compat" q.out v.out <<'EOF'
import sys
sys.dont_write_bytecode = True      # nothing written into the sources
sys.path.insert(0, sys.argv[1])
from run import reconcile_disk_sizes
with open(sys.argv[2]) as q, open(sys.argv[3]) as v:
    text = reconcile_disk_sizes(q.read(), v.read())
with open(sys.argv[3], "w") as v:
    v.write(text)
EOF
}

_compare_runs()
{
    local qrc=$1 vrc=$2
    shift 2
    cmp -s q.out v.out || _reconcile_disk_sizes
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
