#!/usr/bin/env bash
# lazy_refcounts=on wrote every refcount block on every flush, as if the option were off; QEMU defers them while the image is dirty and repairs after a crash.
# Counts the writes a workload makes with and without lazy refcounts
# (blkdebug's counter, and with strace the same workload under qemu-io),
# then crashes both tools ('abort' after writethrough writes) and checks
# that the images are the same, dirty, and repaired the same way by
# check -r all and by a read-write open; read-only use writes nothing.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io python3 cmp
tmpdir

cmds=()
for i in $(seq 0 19); do
    cmds+=(-c "write -q -P $((i + 1)) $((i * 128))k 64k")
done

count_writes()
{
    local lazy=$1
    rm -f c.qcow2
    $QEMU_IMG create -q -f qcow2 -o lazy_refcounts=$lazy c.qcow2 4M
    "$VDISK" io -t writethrough --image-opts "${cmds[@]}" \
        "driver=qcow2,file.driver=blkdebug,file.filename=c.qcow2,file.stats=on" \
        2>&1 | sed -n 's/^blkdebug: \([0-9]*\) writes.*/\1/p'
}
lazy_writes=$(count_writes on)
eager_writes=$(count_writes off)
[ -n "$lazy_writes" ] && [ -n "$eager_writes" ] || fail "no write count"
[ "$lazy_writes" -lt "$eager_writes" ] ||
    fail "lazy refcounts: $lazy_writes writes, without: $eager_writes"

if command -v strace >/dev/null 2>&1; then
    for lazy in on off; do
        for t in q v; do
            rm -f $t.qcow2
            $QEMU_IMG create -q -f qcow2 -o lazy_refcounts=$lazy $t.qcow2 4M
        done
        strace -f -e trace=pwrite64,pwritev,pwritev2 -o q.trace \
            $QEMU_IO -t writethrough "${cmds[@]}" q.qcow2
        # LeakSanitizer cannot run under ptrace.
        ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0" \
            strace -f -e trace=pwrite64,pwritev,pwritev2 -o v.trace \
            "$VDISK" io -t writethrough "${cmds[@]}" v.qcow2
        q=$(grep -c 'pwrite' q.trace)
        v=$(grep -c 'pwrite' v.trace)
        [ "$v" -le "$q" ] ||
            fail "lazy_refcounts=$lazy: $v writes, qemu-io makes $q"
        cmp q.qcow2 v.qcow2 || fail "lazy_refcounts=$lazy: images differ"
    done
fi

dirty() { $QEMU_IMG info --output=json -U "$1" |
          python3 -c 'import json,sys; print(json.load(sys.stdin)["dirty-flag"])'; }

# A crash after allocating writes: refcounts on disk lag behind.
for t in q v; do
    rm -f $t.qcow2
    $QEMU_IMG create -q -f qcow2 -o lazy_refcounts=on $t.qcow2 4M
done
crash=(-t writethrough -c 'write -q -P 1 0 1M' -c 'write -q -P 2 2M 1M' -c abort)
$QEMU_IO "${crash[@]}" q.qcow2 >/dev/null 2>&1 || true
"$VDISK" io "${crash[@]}" v.qcow2 >/dev/null 2>&1 || true
[ "$(dirty q.qcow2)" = True ] || fail "qemu-io left a clean image: the reference changed"
[ "$(dirty v.qcow2)" = True ] || fail "vdisk io left the image clean"
cmp q.qcow2 v.qcow2 || fail "the crashed images differ"

# Reading does not repair: the file stays as it is.
cp v.qcow2 before.qcow2
"$VDISK" info v.qcow2 >/dev/null
"$VDISK" io -r -c 'read -q -P 1 0 1M' v.qcow2
"$VDISK" map v.qcow2 >/dev/null
cmp before.qcow2 v.qcow2 || fail "a read-only use wrote to the dirty image"

# check: the same findings, exit status and repair.
for r in "" "-r leaks" "-r all"; do
    cp before.qcow2 q.qcow2
    cp before.qcow2 v.qcow2
    qs=0; vs=0
    $QEMU_IMG check $r q.qcow2 >q.out 2>&1 || qs=$?
    "$VDISK" check $r v.qcow2 >v.out 2>&1 || vs=$?
    [ "$qs" = "$vs" ] || fail "check $r: status $vs, qemu-img's $qs"
    diff -u <(sed 's/^qemu-img: //' q.out) <(sed 's/^vdisk: //' v.out) ||
        fail "check $r: output differs"
done
cmp q.qcow2 v.qcow2 || fail "check -r all repaired differently"
[ "$(dirty v.qcow2)" = False ] || fail "check -r all left the dirty bit"

# A read-write open repairs, as QEMU's does.
cp before.qcow2 q.qcow2
cp before.qcow2 v.qcow2
$QEMU_IO -c 'read -q -P 2 2M 1M' q.qcow2
"$VDISK" io -c 'read -q -P 2 2M 1M' v.qcow2
cmp q.qcow2 v.qcow2 || fail "the repair on open differs"
$QEMU_IMG check v.qcow2 >/dev/null || fail "not repaired on open"
[ "$(dirty v.qcow2)" = False ] || fail "the dirty bit survived the repair"
