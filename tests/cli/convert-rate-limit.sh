#!/usr/bin/env bash
# qemu-img convert -r (rate limit): a conversion limited to 2 MiB/s takes
# about as long as qemu-img's (qemu's leaky bucket: a tenth of a second
# of burst, then the rate), -r 0 means no limit, and malformed values get
# qemu-img's words, exit 1 and no target.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
requires qemu-img qemu-io date
tmpdir

$QEMU_IMG create -q -f raw src.img 4M
$QEMU_IO -f raw -c 'write -q -P 5 0 4M' src.img

elapsed_ms()
{
    local t0 t1
    t0=$(date +%s%N)
    "$@" >/dev/null
    t1=$(date +%s%N)
    echo $(( (t1 - t0) / 1000000 ))
}

q=$(elapsed_ms $QEMU_IMG convert -r 2M -f raw -O qcow2 src.img q.qcow2)
v=$(elapsed_ms "$VDISK" convert -r 2M -f raw -O qcow2 src.img v.qcow2)
assert_same_content q.qcow2 v.qcow2 >/dev/null
# qemu-img needs about (4 MiB - 2 MiB chunk - 0.2 MiB) / 2 MiB/s = 0.9 s.
[ "$q" -ge 700 ] || fail "qemu-img took $q ms: the reference changed"
[ "$v" -ge $((q * 3 / 4)) ] || fail "vdisk took $v ms, qemu-img $q ms"
[ "$v" -le $((q * 3 + 2000)) ] || fail "vdisk took $v ms, qemu-img $q ms"

rm -f q.qcow2 v.qcow2
v=$(elapsed_ms "$VDISK" convert -r 0 -f raw -O qcow2 src.img v.qcow2)
[ "$v" -lt 5000 ] || fail "-r 0 is not unlimited ($v ms)"

split_dirs
for r in 1x -5 8E 16E ""; do
    same_rw convert -r "$r" -f raw -O raw src.img t.img
    [ ! -e v/t.img ] || fail "-r '$r' created the target"
done
