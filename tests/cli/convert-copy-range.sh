#!/usr/bin/env bash
# qemu-img convert -C (copy offloading): the same targets as qemu-img's
# (map, info, content), copy_file_range(2) used where both tools use it,
# the fallback when a source cannot be offloaded (compressed clusters),
# and qemu-img's refusals of -C with -c, -S and --salvage (exit 1,
# nothing created).
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
requires qemu-img qemu-io
tmpdir

$QEMU_IMG create -q -f qcow2 base.qcow2 4M
$QEMU_IO -c 'write -q -P 1 0 1M' base.qcow2
$QEMU_IMG create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
$QEMU_IO -c 'write -q -P 2 2M 64k' -c 'write -q -z 3M 64k' \
    -c 'write -q -P 3 3200k 4k' top.qcow2
$QEMU_IMG create -q -f raw raw.img 4M
$QEMU_IO -f raw -c 'write -q -P 5 0 1M' -c 'write -q -P 6 2M 5k' raw.img
$QEMU_IMG create -q -f qcow2 comp.qcow2 1M
$QEMU_IO -c 'write -q -P 7 0 64k' -c 'write -q -c -P 8 64k 64k' \
    -c 'write -q -P 9 128k 64k' comp.qcow2

# check_target NAME: both tools' targets have the same map and info
# and read the same.
check_target()
{
    diff -u <($QEMU_IMG map --output=json q/$1) \
            <($QEMU_IMG map --output=json v/$1) || fail "map of $1"
    json_equal_filtered <($QEMU_IMG info --output=json q/$1) \
                        <($QEMU_IMG info --output=json v/$1) \
                        filename actual-size full-backing-filename ||
        fail "info of $1"
    assert_same_content q/$1 v/$1 >/dev/null
}

split_dirs
for args in "-f raw -O raw raw.img" "-f raw -O qcow2 raw.img" \
            "-O raw top.qcow2" "-O qcow2 top.qcow2" \
            "-O qcow2 -o cluster_size=4k top.qcow2" \
            "-O qcow2 -B base.qcow2 -F qcow2 top.qcow2" \
            "-O qcow2 comp.qcow2"; do
    rm -f q/t.img v/t.img
    same_rw convert -C $args t.img
    check_target t.img
done

# Both offload a raw copy with copy_file_range.
if command -v strace >/dev/null 2>&1; then
    rm -f q/t.img v/t.img
    (cd q && strace -f -e trace=copy_file_range -o ../q.trace \
        $QEMU_IMG convert -C -f raw -O raw raw.img t.img)
    (cd v && ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0" \
        strace -f -e trace=copy_file_range -o ../v.trace \
        "$VDISK" convert -C -f raw -O raw raw.img t.img)
    q=$(grep -c 'copy_file_range(.*= [1-9]' q.trace || true)
    v=$(grep -c 'copy_file_range(.*= [1-9]' v.trace || true)
    [ "$q" -gt 0 ] || fail "qemu-img did not offload: the reference changed"
    [ "$v" = "$q" ] || fail "vdisk offloaded $v times, qemu-img $q"
fi

# Refused combinations, in qemu-img's order; nothing is created.
for args in "-c" "-S 4k" "-S 0" "--salvage" "-c -S 4k --salvage" \
            "-S 4k --salvage"; do
    rm -f q/t.img v/t.img
    same_rw convert -C $args -O qcow2 top.qcow2 t.img
    grep -q 'Cannot' q.out || fail "qemu-img accepted -C $args"
    [ ! -e v/t.img ] || fail "-C $args created the target"
done
