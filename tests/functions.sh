# Shared helpers for vdisk's shell tests (tests/cli/*.sh), in the style of
# nbdkit's tests/functions.sh. Every test starts with
#
#     #!/usr/bin/env bash
#     # One line: what this test checks (for a regression: the bug's story).
#     source "$(dirname "$0")/../functions.sh"
#     requires qemu-img
#     tmpdir
#
# Sourcing this file turns on `set -e -o pipefail` and command tracing
# (`set -x`, so a failing test's log ends with the commands that led to
# the failure; VDISK_TEST_TRACE=0 turns tracing off). The trace is written
# to descriptor 19, a copy of the original stderr, so capturing a
# command's stderr never captures trace lines. It defines:
#
#   $VDISK, $QEMU_IMG, $QEMU_IO   the programs under test and the referees
#   $VDISK_QEMU_IMG, $VDISK_QEMU_IO, $VDISK_QEMU_NBD,
#   $VDISK_QEMU_STORAGE_DAEMON    vdisk under QEMU's four names
#                                 (build/tools/qemu-compat/): QEMU's
#                                 command lines, QEMU's program names in
#                                 messages (docs/compat.md)
#   requires CMD...               skip (exit 77) unless every CMD is on PATH
#   requires_run CMD ARGS...      skip unless running the command succeeds
#   fail MSG...                   print "FAIL: MSG" to stderr and exit 1
#   tmpdir                        make a fresh scratch dir and cd into it;
#                                 removed at exit unless KEEP_TMP=1
#   cleanup_fn CMD ARGS...        run CMD at exit (before the dir goes),
#                                 e.g. cleanup_fn kill "$pid"
#   expect_status N CMD ARGS...   run CMD and fail unless it exits with N
#   json_equal_filtered F1 F2 [KEY...]
#                                 compare two JSON files after dropping
#                                 KEY at any depth (e.g. "filename",
#                                 "actual-size"); prints a diff if not equal
#   assert_same_content [OPT...] IMG1 IMG2
#                                 `qemu-img compare` must call them equal
#                                 (OPTs such as -f raw -F qcow2 go to it)
#   size_of FILE                  print the file's size in bytes
#
# Exit statuses follow meson: 0 pass, 77 skip, anything else fail.
# Under the sanitizer build a sanitizer report makes vdisk exit 86
# (scripts/test.sh sets exitcode=86); expect_status names that case.

set -e -o pipefail

fail()
{
    echo "FAIL: $*" >&2
    exit 1
}

# The tool under test: meson's test environment sets VDISK to the built
# binary. Running a test by hand needs VDISK=build/tools/vdisk.
if [ -z "${VDISK:-}" ]; then
    fail "VDISK is not set: run through 'meson test' or set VDISK=path/to/vdisk"
fi
if [ ! -x "$VDISK" ]; then
    fail "VDISK=$VDISK is not an executable"
fi
QEMU_IMG=${QEMU_IMG:-qemu-img}
QEMU_IO=${QEMU_IO:-qemu-io}
# Meson sets VDISK_QEMU_COMPAT; by hand it is beside the tool.
VDISK_QEMU_COMPAT=${VDISK_QEMU_COMPAT:-$(dirname "$VDISK")/qemu-compat}
VDISK_QEMU_IMG=$VDISK_QEMU_COMPAT/qemu-img
VDISK_QEMU_IO=$VDISK_QEMU_COMPAT/qemu-io
VDISK_QEMU_NBD=$VDISK_QEMU_COMPAT/qemu-nbd
VDISK_QEMU_STORAGE_DAEMON=$VDISK_QEMU_COMPAT/qemu-storage-daemon

# QEMU 7.2 times PBKDF2 when it makes a LUKS key slot and fails at random
# on a busy machine ("Unable to get accurate CPU usage": its thread's CPU
# time read as 0 ms), before it writes anything that matters. A test's
# qemu-img call that names a secret is therefore made again, up to 20
# times, when it fails that way (its output is held back until the last
# try; with a fast hash such as sha1 its first timing batch often ends
# within one tick of the CPU clock, and five tries in a row failed in
# one clean-clone run); every other call runs as it is. A function, so that both
# "qemu-img" and "$QEMU_IMG" (qemu-img by default) reach it.
qemu-img()
{
    case " $* " in
    *secret*) ;;
    *) command qemu-img "$@"; return ;;
    esac
    local out err rc _
    out=$(mktemp) err=$(mktemp)
    for _ in $(seq 20); do
        rc=0
        command qemu-img "$@" > "$out" 2> "$err" || rc=$?
        [ "$rc" != 0 ] && grep -q "Unable to get accurate CPU usage" "$err" ||
            break
    done
    cat "$out"
    cat "$err" >&2
    rm -f "$out" "$err"
    return "$rc"
}

requires()
{
    local c
    for c in "$@"; do
        if ! command -v "$c" >/dev/null 2>&1; then
            echo "$0: test skipped because '$c' is not installed"
            exit 77
        fi
    done
}

requires_run()
{
    if ! "$@" >/dev/null 2>&1; then
        echo "$0: test skipped because '$*' failed"
        exit 77
    fi
}

# Cleanups run in reverse order of registration from one EXIT trap, so
# tests never overwrite each other's traps.
_cleanup_cmds=()
_tmpdir=

cleanup_fn()
{
    local q
    q=$(printf '%q ' "$@")
    _cleanup_cmds+=("$q")
}

_run_cleanups()
{
    local status=$1 i
    set +e
    for ((i = ${#_cleanup_cmds[@]} - 1; i >= 0; i--)); do
        eval "${_cleanup_cmds[i]}"
    done
    if [ -n "$_tmpdir" ]; then
        cd /
        if [ "${KEEP_TMP:-0}" = 1 ]; then
            echo "$0: keeping scratch directory $_tmpdir" >&2
        else
            rm -rf "$_tmpdir"
        fi
    fi
    exit "$status"
}
# The trap's first command is the only traced line of the clean-up: it
# shows the test's exit status at the end of the log.
trap 'exit_status=$?; { set +x; } 19>/dev/null 2>/dev/null; _run_cleanups "$exit_status"' EXIT

tmpdir()
{
    _tmpdir=$(mktemp -d "${TMPDIR:-/tmp}/vdisk-test.XXXXXX")
    cd "$_tmpdir"
}

expect_status()
{
    local want=$1 got=0
    shift
    "$@" || got=$?
    if [ "$got" = 86 ] && [ "$want" != 86 ]; then
        fail "sanitizer report (exit 86) from: $*"
    fi
    if [ "$got" != "$want" ]; then
        fail "expected exit status $want, got $got from: $*"
    fi
}

json_equal_filtered()
{
    python3 - "$@" <<'EOF'
import difflib, json, sys

a, b, drop = sys.argv[1], sys.argv[2], set(sys.argv[3:])

def strip(v):
    if isinstance(v, dict):
        return {k: strip(x) for k, x in v.items() if k not in drop}
    if isinstance(v, list):
        return [strip(x) for x in v]
    return v

def load(name):
    with open(name) as f:
        text = f.read()
    try:
        return strip(json.loads(text))
    except ValueError as e:
        sys.stderr.write("%s is not valid JSON (%s); it starts:\n%s\n"
                         % (name, e, text[:500]))
        sys.exit(1)

ja, jb = load(a), load(b)
if ja == jb:
    sys.exit(0)
ta = json.dumps(ja, indent=4).splitlines()
tb = json.dumps(jb, indent=4).splitlines()
sys.stderr.write("JSON documents differ (after dropping %s):\n" %
                 (", ".join(sorted(drop)) or "nothing"))
for line in difflib.unified_diff(ta, tb, a, b, lineterm=""):
    sys.stderr.write(line + "\n")
sys.exit(1)
EOF
}

assert_same_content()
{
    local st=0
    "$QEMU_IMG" compare -U "$@" || st=$?
    case $st in
    0) ;;
    1) fail "images differ: $*" ;;
    *) fail "qemu-img compare could not compare (status $st): $*" ;;
    esac
}

size_of()
{
    stat -c %s "$1"
}

# Tracing starts here, after the set-up above, so logs begin with the test.
if [ "${VDISK_TEST_TRACE:-1}" != 0 ]; then
    # The trace goes to its own descriptor (a copy of the log), so that a
    # test capturing stderr with 2>FILE or 2>&1 never captures the trace.
    exec 19>&2
    BASH_XTRACEFD=19
    PS4='+ ${BASH_SOURCE[0]##*/}:${LINENO}: '
    set -x
fi
