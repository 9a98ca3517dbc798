# Helpers shared by the tests/cli/io-*.sh scripts, which check that
# `vdisk io` behaves like qemu-io 7.2. Sourced after ../functions.sh and
# `tmpdir`. (Named .bash so meson's cli/*.sh glob does not run it.)
#
# The scripts keep two copies of every image: q/NAME driven by QEMU's
# qemu-io and v/NAME driven by vdisk under qemu-io's name
# ($VDISK_QEMU_IO, whose messages say "qemu-io: " too), under the same
# file name so messages that quote it match.
#
#   io_formats                 the formats to test (VDISK_IO_FORMATS or
#                              "raw qcow2")
#   io_create FMT NAME SIZE    create q/NAME and v/NAME with qemu-img
#   io_filter FILE             strip what legitimately differs: timing
#                              lines, -C statistics lines
#   io_compare ARGS...         run `qemu-io ARGS` in q/ with QEMU's and in
#                              v/ with vdisk's (stdin from /dev/null unless
#                              IO_STDIN names a file) and fail unless the
#                              filtered stdout, stderr and exit status match
#   io_compare_sorted ARGS...  the same, but stdout lines are compared as
#                              sorted sets (aio completion order is free)

io_formats()
{
    echo "${VDISK_IO_FORMATS:-raw qcow2}"
}

io_create()
{
    mkdir -p q v
    "$QEMU_IMG" create -q -f "$1" "q/$2" "$3"
    cp "q/$2" "v/$2"
}

io_filter()
{
    sed -e '/ ops; /d' \
        -e '/^[0-9]*,[0-9]*,[0-9]*:[0-9][0-9]:[0-9.]*,/d' \
        -e 's/qemu-io> /PROMPT> /g' "$1"
}

_io_run_both()
{
    local in=${IO_STDIN:-/dev/null}
    qst=0 vst=0
    (cd q && "$QEMU_IO" "$@") < "$in" > q.out 2> q.err || qst=$?
    (cd v && "$VDISK_QEMU_IO" "$@") < "$in" > v.out 2> v.err || vst=$?
    if [ "$vst" = 86 ]; then
        fail "sanitizer report from vdisk's qemu-io $*"
    fi
    io_filter q.out > q.fout
    io_filter v.out > v.fout
    io_filter q.err > q.ferr
    io_filter v.err > v.ferr
}

_io_check_rest()
{
    if ! diff -u q.ferr v.ferr; then
        fail "stderr differs from qemu-io for: $*"
    fi
    if [ "$qst" != "$vst" ]; then
        fail "exit status $vst, qemu-io gave $qst, for: $*"
    fi
}

io_compare()
{
    _io_run_both "$@"
    if ! diff -u q.fout v.fout; then
        fail "stdout differs from qemu-io for: $*"
    fi
    _io_check_rest "$@"
}

io_compare_sorted()
{
    _io_run_both "$@"
    sort q.fout > q.sout
    sort v.fout > v.sout
    if ! diff -u q.sout v.sout; then
        fail "stdout (sorted) differs from qemu-io for: $*"
    fi
    _io_check_rest "$@"
}
