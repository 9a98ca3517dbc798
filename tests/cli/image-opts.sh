#!/usr/bin/env bash
# --image-opts on every command that has it in QEMU 7.2 (qemu-img's info,
# check, map, compare, measure, convert with --target-image-opts, dd,
# amend, commit, rebase, resize, snapshot, bench; qemu-io; qemu-nbd): the same
# output, messages, exit status and resulting images as QEMU's tools,
# and the same refusals (-f with --image-opts, --target-image-opts
# without -n, bad options).
source "$(dirname "$0")/../functions.sh"
source "$VDISK_TESTS_SRCDIR/cli/cli-functions.bash"
requires qemu-img qemu-io timeout
tmpdir

$QEMU_IMG create -q -f qcow2 base.qcow2 1M
$QEMU_IO -c 'write -P 0x11 0 64k' base.qcow2 >/dev/null
$QEMU_IMG create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
$QEMU_IO -c 'write -P 0x22 64k 64k' top.qcow2 >/dev/null
$QEMU_IMG create -q -f qcow2 img.qcow2 1M
$QEMU_IO -c 'write -P 0x33 0 128k' -c 'write -z 512k 64k' img.qcow2 \
    >/dev/null
cp img.qcow2 img2.qcow2
$QEMU_IO -c 'write -P 0x44 256k 4k' img2.qcow2 >/dev/null
$QEMU_IMG create -q -f raw raw.img 1M

Q='driver=qcow2,file.filename=img.qcow2'
Q2='driver=qcow2,file.filename=img2.qcow2'
TOP='driver=qcow2,file.filename=top.qcow2'

# ---- commands that only read ----
for o in "$Q" "file.filename=img.qcow2" "driver=raw,file.filename=img.qcow2" \
         "driver=file,filename=raw.img" "$Q,cache.direct=off" \
         "driver=qcow2,file.driver=file,file.filename=img.qcow2"; do
    same info --image-opts "$o"
    same info --output=json --image-opts "$o"
done
same info --backing-chain --image-opts "$TOP"
same info --image-opts -U "$Q"
same check --image-opts "$Q"
same check --output=json --image-opts "$Q"
same map --image-opts "$Q"
same map --output=json --image-opts "$TOP"
same compare --image-opts "$Q" "$Q2"
same compare --image-opts "$Q" "$Q"
same measure -O qcow2 --image-opts "$Q"
same measure --output=json -O raw --image-opts "$TOP"

# ---- refusals: the same message, nothing touched ----
md5sum ./*.qcow2 ./*.img > before.md5
for cmd in info check map "measure -O qcow2"; do
    # shellcheck disable=SC2086
    same $cmd --image-opts -f qcow2 "$Q"
    # shellcheck disable=SC2086
    same $cmd --image-opts "driver=qcow2,file.filename=nonexist.qcow2"
    # shellcheck disable=SC2086
    same $cmd --image-opts "$Q,foo=1"
    # shellcheck disable=SC2086
    same $cmd --image-opts "filename=img.qcow2"
    # shellcheck disable=SC2086
    same $cmd --image-opts "driver=nosuch,file.filename=img.qcow2"
done
same compare --image-opts -f qcow2 "$Q" "$Q2"
same bench -c 1 --image-opts -f qcow2 "$Q"
same bench -c 1 --image-opts "driver=qcow2,file.filename=nonexist.qcow2"
same bench -c 1 --image-opts "$Q,foo=1"
same convert --target-image-opts img.qcow2 "$Q2"
same convert -n -O qcow2 --target-image-opts img.qcow2 "$Q2"
same convert -n --target-image-opts -o cluster_size=4k img.qcow2 "$Q2"
same convert --image-opts -f qcow2 "$Q" out.qcow2
same dd --image-opts -f qcow2 "if=$Q" of=out.raw
same amend --image-opts -f qcow2 -o lazy_refcounts=on "$Q"
same resize --image-opts -f qcow2 "$Q" 2M
md5sum -c --quiet before.md5 || fail "a refused command changed an image"
[ ! -e out.qcow2 ] && [ ! -e out.raw ] || fail "a refused command wrote"

# ---- commands that write: each tool on its own copy ----
check_twins()
{
    local f
    for f in "$@"; do
        $QEMU_IMG compare -q "q/$f" "v/$f" || fail "$f differs after $*"
        (cd q && $QEMU_IMG info -U --output=json "$f") |
            sed 's/"actual-size": [0-9]*//' > qi.json
        (cd v && $QEMU_IMG info -U --output=json "$f") |
            sed 's/"actual-size": [0-9]*//' > vi.json
        diff qi.json vi.json || fail "$f: metadata differs"
    done
}

split_dirs
same_rw convert -O qcow2 --image-opts "$Q" out.qcow2
check_twins out.qcow2
split_dirs
same_rw convert -n --image-opts --target-image-opts "$Q" "$Q2"
check_twins img2.qcow2
split_dirs
same_rw convert -n --target-image-opts img.qcow2 "driver=raw,file.filename=raw.img"
check_twins raw.img
split_dirs
same_rw dd --image-opts "if=$Q" of=out.raw bs=64k count=4
check_twins out.raw
split_dirs
same_rw amend --image-opts -o lazy_refcounts=on "$Q"
check_twins img.qcow2
split_dirs
same_rw commit --image-opts "$TOP"
check_twins base.qcow2 top.qcow2
split_dirs
same_rw rebase -u -b img.qcow2 -F qcow2 --image-opts "$TOP"
check_twins top.qcow2
split_dirs
same_rw resize --image-opts "$Q" 2M
check_twins img.qcow2
split_dirs
same_rw snapshot -c sn1 --image-opts "$Q"
(cd q && $QEMU_IMG snapshot -l img.qcow2 | awk 'NR > 2 { print $2 }') > qs
(cd v && $QEMU_IMG snapshot -l img.qcow2 | awk 'NR > 2 { print $2 }') > vs
diff qs vs || fail "snapshot --image-opts: snapshots differ"
same_rw snapshot -d sn1 --image-opts "$Q"
check_twins img.qcow2

# ---- vdisk io (qemu-io) ----
io_same()
{
    local qrc=0 vrc=0
    $QEMU_IO "$@" > q.raw 2>&1 || qrc=$?
    "$VDISK" io "$@" > v.raw 2>&1 || vrc=$?
    sed -e 's/^qemu-io: /PROG: /' q.raw > q.out
    sed -e 's/^vdisk: /PROG: /' -e 's/^vdisk io: /PROG: /' v.raw > v.out
    _compare_runs "$qrc" "$vrc" io "$@"
}
io_same --image-opts "$Q" -c 'read -q -P 0x33 0 128k' -c map
io_same --image-opts "file.filename=img.qcow2" -c 'read -q -P 0x33 0 64k'
io_same -r --image-opts "$TOP" -c 'read -q -P 0x22 64k 64k' -c map
io_same --image-opts -f qcow2 "$Q" -c 'read 0 512'
io_same --image-opts "driver=qcow2,file.filename=nonexist.qcow2" \
    -c 'read 0 512'
io_same --image-opts "filename=img.qcow2" -c 'read 0 512'
io_same --image-opts "$Q,foo=1" -c 'read 0 512'

# ---- vdisk serve (qemu-nbd) ----
requires qemu-nbd
st=0
timeout 30 qemu-nbd --image-opts -f qcow2 "$Q" 2> q.err || st=$?
vst=0
timeout 30 "$VDISK" serve --image-opts -f qcow2 "$Q" 2> v.err || vst=$?
[ "$st" = "$vst" ] || fail "serve --image-opts -f: exit $vst, qemu-nbd $st"
diff <(sed 's/^qemu-nbd: //' q.err) <(sed 's/^vdisk serve: //' v.err) ||
    fail "serve --image-opts -f: message differs"
for o in "driver=qcow2,file.filename=nonexist.qcow2" "$Q,foo=1"; do
    st=0
    timeout 30 qemu-nbd --image-opts -k "$PWD/q.sock" "$o" 2> q.err || st=$?
    vst=0
    timeout 30 "$VDISK" serve --image-opts -k "$PWD/v.sock" "$o" 2> v.err ||
        vst=$?
    [ "$st" = "$vst" ] || fail "serve --image-opts $o: exit $vst, qemu-nbd $st"
    diff <(sed 's/^qemu-nbd: //' q.err) <(sed 's/^vdisk serve: //' v.err) ||
        fail "serve --image-opts $o: message differs"
done
timeout 60 "$VDISK" serve --fork --pid-file "$PWD/serve.pid" -r -t \
    -k "$PWD/nbd.sock" --image-opts "$TOP"
cleanup_fn sh -c "kill \$(cat '$PWD/serve.pid' 2>/dev/null) 2>/dev/null; true"
$QEMU_IMG compare -q "nbd+unix:///?socket=$PWD/nbd.sock" top.qcow2 ||
    fail "serve --image-opts exports the wrong data"
