#!/usr/bin/env bash
# Size options: vdisk takes sizes below 2^63 (the largest image length)
# and used to refuse 2^63 and up with "expects a non-negative number below
# 2^64", which was not true. Past 2^64 it must say what qemu says; from
# 2^63 on, qemu's "out of range" words; and any bound a message names
# must be the real one.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
requires qemu-img qemu-io python3
tmpdir

$QEMU_IMG create -q -f raw r.img 1M
split_dirs

# io_open_error TOOL OPTS: what qemu-io (QEMU's, or vdisk's under that
# name) says when an --image-opts open fails.
io_open_error()
{
    local prog=$QEMU_IO
    [ "$1" = qemu ] || prog=$VDISK_QEMU_IO
    "$prog" -c 'read 0 512' --image-opts "$2" 2>&1 && fail "$1 opened $2"
    return 0
}

# (null-co's size is parsed the same way; qemu-io 7.2 aborts on a size
# past 2^64 there, so it is checked only in 3.)
open_opts=("driver=raw,size=%s,file.filename=r.img"
           "driver=raw,offset=%s,file.filename=r.img")

# 1. Past 2^64 both refuse with qemu's text: creation options, measure's
# options, open options (raw's offset and size).
for v in 16E 18446744073709551616 99999999999999999999; do
    same_rw create -f qcow2 -o "cluster_size=$v" o.qcow2 1M
    same_rw create -f raw -o "extent_size_hint=$v" o.img 1M
    same measure -O qcow2 --size 1M -o "cluster_size=$v"
    for f in "${open_opts[@]}"; do
        # shellcheck disable=SC2059
        o=$(printf "$f" "$v")
        [ "$(io_open_error qemu "$o")" = "$(io_open_error vdisk "$o")" ] ||
            fail "open $o: qemu-io and vdisk io disagree"
    done
done

# 2. From 2^63 on vdisk refuses where qemu's parser still takes the
# number; the message is qemu's for a value past its own limit.
for v in 9223372036854775808 8E 15.9E; do
    ref=$($QEMU_IMG create -f qcow2 -o cluster_size=16E o.qcow2 1M 2>&1 |
          sed -e "s/16E/$v/") || true
    got=$("$VDISK_QEMU_IMG" create -f qcow2 -o "cluster_size=$v" o.qcow2 \
          1M 2>&1) || true
    [ "$ref" = "$got" ] || fail "cluster_size=$v: '$got', expected '$ref'"
    [ ! -e o.qcow2 ] || fail "cluster_size=$v made a file"
    for f in "${open_opts[@]}"; do
        # shellcheck disable=SC2059
        o=$(printf "$f" "$v")
        ref=$(io_open_error qemu "$(printf "$f" 16E)" | sed -e "s/16E/$v/")
        got=$(io_open_error vdisk "$o")
        [ "$ref" = "$got" ] || fail "open $o: '$got', expected '$ref'"
    done
done

# 3. Junk: the bound the message names is the real one: 2^N - 1 is
# taken as a number (raw then fails as qemu does), 2^N is out of range.
for f in "${open_opts[@]}" "driver=null-co,size=%s"; do
    # shellcheck disable=SC2059
    msg=$(io_open_error vdisk "$(printf "$f" abc)")
    n=$(printf '%s\n' "$msg" | sed -n 's/.* below 2^\([0-9]*\).*/\1/p')
    [ -n "$n" ] || fail "junk: no bound in '$msg'"
    # shellcheck disable=SC2059
    o=$(printf "$f" "$(python3 -c "print(2**$n - 1)")")
    got=$(io_open_error vdisk "$o" || true)
    case $got in
    *"out of range for parameter"*|*"expects a non-negative"*)
        fail "2^$n - 1 is refused as a number: $got" ;;
    esac
    if [ "${o#driver=raw}" != "$o" ]; then
        [ "$(io_open_error qemu "$o")" = "$got" ] ||
            fail "open $o: qemu-io and vdisk io disagree"
    fi
    # shellcheck disable=SC2059
    o=$(printf "$f" "$(python3 -c "print(2**$n)")")
    io_open_error vdisk "$o" | grep -q "is out of range for parameter" ||
        fail "2^$n is not refused as out of range: $o"
done
