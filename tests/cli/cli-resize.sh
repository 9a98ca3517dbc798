#!/usr/bin/env bash
# vdisk resize: absolute and relative sizes, --shrink and its absence
# (qemu-img's error and warning), preallocation, -q, bad sizes; the
# resulting images must have the sizes qemu-img gives them.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
requires qemu-img qemu-io
tmpdir

$QEMU_IMG create -f raw r.img 2M >/dev/null
$QEMU_IO -f raw -c 'write -P 0x5a 0 2M' r.img >/dev/null
$QEMU_IMG create -f qcow2 q.qcow2 2M >/dev/null
$QEMU_IO -f qcow2 -c 'write -P 0x5a 0 2M' q.qcow2 >/dev/null
split_dirs

sizes_match()
{
    [ "$(size_of "q/$1")" = "$(size_of "v/$1")" ] ||
        fail "$1: file sizes differ after resize"
    (cd q && $QEMU_IMG info -U --output=json "$1") > qi.json
    (cd v && $QEMU_IMG info -U --output=json "$1") > vi.json
    json_equal_filtered qi.json vi.json actual-size ||
        fail "$1: info differs after resize"
    assert_same_content "q/$1" "v/$1"
}

for steps in "-f raw r.img 1M" "-f raw r.img +1M" "-f raw --shrink r.img -- -1M" \
             "-f raw --shrink r.img 1M" "-q -f raw r.img 3M" "r.img 4M" \
             "-f raw r.img -- +0" "--preallocation=full -f raw r.img 1M" \
             "--preallocation=full -f raw r.img 5M" \
             "--preallocation=falloc -f raw r.img +1M" \
             "-f qcow2 q.qcow2 8M" "q.qcow2 +1G" "--shrink q.qcow2 1M" \
             "q.qcow2 512k"; do
    # shellcheck disable=SC2086
    same_rw resize $steps
    sizes_match r.img
    sizes_match q.qcow2
done

same_rw resize -f raw r.img
same_rw resize -f raw r.img -- -100M
same_rw resize -f raw r.img foo
same_rw resize --preallocation=bogus -f raw r.img 5M
same_rw resize -f raw r.img 9E
same_rw resize missing.img 1M
same_rw resize 1M
same_rw resize
