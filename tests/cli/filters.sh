#!/usr/bin/env bash
# The filter drivers against qemu-io on the same inputs: copy-on-read
# (with and without bottom) leaves the same overlay, compress the same
# compressed clusters, preallocate the same file sizes while open and
# after, blkverify reads, writes and catches a mismatch as QEMU does,
# null-aio reads and sizes as null-co, and every refusal of theirs and
# of throttle's options has QEMU's words.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io
tmpdir

norm()
{
    sed -e 's/, [0-9.]* [a-zA-Z]*\/sec.*//' -e '/ops; [0-9]/d' \
        -e 's/^qemu-io: //' -e 's/^vdisk: //' -e '/^WARNING/,/^ *Specify/d'
}

# both NAME ARGS...: qemu-io and vdisk io with the same arguments, where
# @ in an argument becomes q or v; same normalised output and status.
both()
{
    local name=$1 qo=0 vo=0 a
    shift
    local -a qa=() va=()
    for a in "$@"; do
        qa+=("${a//@/q}")
        va+=("${a//@/v}")
    done
    $QEMU_IO "${qa[@]}" > "$name.q" 2>&1 || qo=$?
    "$VDISK" io "${va[@]}" > "$name.v" 2>&1 || vo=$?
    [ "$vo" != 86 ] || { cat "$name.v"; fail "$name: sanitizer report"; }
    norm < "$name.q" | sed 's/\bq-/@-/g' > "$name.qn"
    norm < "$name.v" | sed 's/\bv-/@-/g' > "$name.vn"
    diff -u "$name.qn" "$name.vn" || fail "$name: output differs"
    [ "$qo" = "$vo" ] || fail "$name: exit $vo, qemu-io $qo"
}

map_equal()
{
    $QEMU_IMG map --output=json "$1" | sed 's/"offset": [0-9]*//' > m1
    $QEMU_IMG map --output=json "$2" | sed 's/"offset": [0-9]*//' > m2
    diff -u m1 m2 || fail "$3: allocation differs"
}

# ---- copy-on-read -----------------------------------------------------

for p in q v; do
    $QEMU_IMG create -q -f qcow2 $p-base.qcow2 4M
    $QEMU_IO -c 'write -P 1 0 1M' -c 'write -P 3 2M 64k' $p-base.qcow2 > /dev/null
    $QEMU_IMG create -q -f qcow2 -b $p-base.qcow2 -F qcow2 $p-mid.qcow2
    $QEMU_IO -c 'write -P 2 1M 64k' $p-mid.qcow2 > /dev/null
    $QEMU_IMG create -q -f qcow2 -b $p-mid.qcow2 -F qcow2 $p-top.qcow2
done
cp q-top.qcow2 q-top2.qcow2
cp v-top.qcow2 v-top2.qcow2
both cor --image-opts -c 'read -P 1 0 64k' -c 'read -P 2 1M 64k' \
    -c 'read -P 3 2M 64k' -c 'read -P 0 3M 64k' -c 'write -P 9 512k 4k' \
    -c 'read -P 9 512k 4k' \
    "driver=copy-on-read,file.driver=qcow2,file.file.filename=@-top.qcow2"
map_equal q-top.qcow2 v-top.qcow2 copy-on-read
assert_same_content q-top.qcow2 v-top.qcow2
# bottom=mid: what only the base holds stays there.
both cor-bottom --image-opts -c 'read -P 1 0 64k' -c 'read 1M 128k' \
    -c 'read -P 3 2M 64k' \
    "driver=copy-on-read,bottom=mid,file.driver=qcow2,file.file.filename=@-top2.qcow2,file.backing.node-name=mid,file.backing.driver=qcow2,file.backing.file.filename=@-mid.qcow2"
map_equal q-top2.qcow2 v-top2.qcow2 "copy-on-read, bottom"
$QEMU_IMG check -q v-top.qcow2
$QEMU_IMG check -q v-top2.qcow2
both cor-nobottom --image-opts -c 'read 0 1' \
    "driver=copy-on-read,bottom=nope,file.driver=qcow2,file.file.filename=@-top.qcow2"
both cor-filter --object throttle-group,id=tg --image-opts -c 'read 0 1' \
    "driver=copy-on-read,bottom=f,file.driver=throttle,file.node-name=f,file.throttle-group=tg,file.file.filename=@-top.qcow2"
both cor-ro -r --image-opts -c 'read 0 1' \
    "driver=copy-on-read,file.driver=qcow2,file.file.filename=@-top.qcow2"

# ---- compress ---------------------------------------------------------

for p in q v; do
    $QEMU_IMG create -q -f qcow2 $p-c.qcow2 1M
done
both compress --image-opts -c 'write -P 7 0 128k' -c 'write -P 8 200k 1000' \
    -c 'write -z 512k 64k' -c 'read -P 8 200k 1000' -c 'read -P 7 0 128k' \
    "driver=compress,file.driver=qcow2,file.file.filename=@-c.qcow2"
map_equal q-c.qcow2 v-c.qcow2 compress
$QEMU_IMG check q-c.qcow2 | grep compressed > cq
$QEMU_IMG check v-c.qcow2 | grep compressed > cv
diff -u cq cv || fail "compress: check differs"
both compress-file --image-opts -c 'read 0 1' \
    "driver=compress,file.filename=@-c.qcow2"
both compress-raw --image-opts -c 'read 0 1' \
    "driver=compress,file.driver=raw,file.file.filename=@-c.qcow2"

# ---- preallocate ------------------------------------------------------

# While the image is open the file reaches past the data (10 MiB more,
# in 4 MiB steps); closing gives it back.
for p in q v; do
    $QEMU_IMG create -q -f qcow2 $p-p.qcow2 64M
    if [ $p = q ]; then tool=($QEMU_IO); else tool=("$VDISK" io); fi
    "${tool[@]}" --image-opts -c 'write -P 7 0 128k' -c 'sleep 1500' \
        -c 'write -P 8 30M 64k' -c 'sleep 1500' \
        "driver=qcow2,file.driver=preallocate,file.prealloc-size=10M,file.prealloc-align=4M,file.file.filename=$p-p.qcow2" \
        > $p-p.out &
    pid=$!
    sleep 0.75
    size_of $p-p.qcow2 > $p-p.size1
    sleep 1.5
    size_of $p-p.qcow2 > $p-p.size2
    wait $pid
    size_of $p-p.qcow2 > $p-p.size3
done
for n in 1 2 3; do
    diff q-p.size$n v-p.size$n ||
        fail "preallocate: file size $n: $(cat v-p.size$n), qemu $(cat q-p.size$n)"
done
[ "$(cat v-p.size1)" -gt "$(cat v-p.size3)" ] || fail "preallocate: nothing preallocated"
assert_same_content q-p.qcow2 v-p.qcow2
$QEMU_IMG check -q v-p.qcow2
both prealloc-align --image-opts -c 'read 0 1' \
    "driver=qcow2,file.driver=preallocate,file.prealloc-align=1000,file.file.filename=@-p.qcow2"

# ---- blkverify --------------------------------------------------------

for p in q v; do
    $QEMU_IMG create -q -f raw $p-r.img 1M
    $QEMU_IMG create -q -f qcow2 $p-t.qcow2 1M
done
both blkverify -c 'write -P 1 0 64k' -c 'read -P 1 0 64k' -c 'read 64k 64k' \
    blkverify:@-r.img:@-t.qcow2
assert_same_content -f raw -F qcow2 q-r.img v-t.qcow2
# Make the test image disagree: both report the mismatch in QEMU's words
# (QEMU then exits; vdisk fails that read and every later request).
for p in q v; do
    $QEMU_IO -f qcow2 -c 'write -P 2 4k 512' $p-t.qcow2 > /dev/null
done
qo=0
$QEMU_IO -c 'read 0 64k' blkverify:q-r.img:q-t.qcow2 > bv.q 2>&1 || qo=$?
vo=0
"$VDISK" io -c 'read 0 64k' -c 'read 0 512' blkverify:v-r.img:v-t.qcow2 \
    > bv.v 2>&1 || vo=$?
[ $qo = 1 ] && [ $vo = 1 ] || fail "blkverify mismatch: exit $vo, qemu-io $qo"
want=$(grep '^blkverify: ' bv.q)
[ -n "$want" ] || fail "qemu-io reported no mismatch: $(cat bv.q)"
grep -qxF "vdisk: $want" bv.v || fail "blkverify: $(cat bv.v), want $want"
grep -q 'stopped after a mismatch' bv.v || fail "blkverify went on: $(cat bv.v)"
both blkverify-name -c 'read 0 1' blkverify:@-r.img
both blkverify-test --image-opts -c 'read 0 1' "driver=blkverify,raw.filename=@-r.img"
both blkverify-probe --image-opts -c 'read 0 1' \
    "driver=blkverify,raw.filename=@-r.img,test.filename=@-t.qcow2"

# ---- null-aio ---------------------------------------------------------

both null-aio --image-opts -c 'read -v 0 16' -c 'length' -c 'map' \
    "driver=null-aio,size=1M,read-zeroes=on,latency-ns=1000"
both null-aio-raw -f raw -c 'write 0 1k' -c 'length' \
    'json:{"driver": "raw", "file": {"driver": "null-aio", "size": 4096}}'
both null-aio-name -f raw -c 'length' null-aio://

# ---- throttle's options -----------------------------------------------

$QEMU_IMG create -q -f raw t.raw 1M
both throttle-nogroup --image-opts -c 'read 0 1' driver=throttle,file.filename=t.raw
both throttle-nosuch --image-opts -c 'read 0 1' \
    driver=throttle,file.filename=t.raw,throttle-group=x
both throttle-secret --object secret,id=x,data=y --image-opts -c 'read 0 1' \
    driver=throttle,file.filename=t.raw,throttle-group=x
both throttle-limits --object throttle-group,id=x -c 'read 0 1' \
    'json:{"driver": "throttle", "throttle-group": "x", "file": {"driver": "file", "filename": "t.raw"}, "limits": {"iops-total": 5}}'
both throttle-read --object throttle-group,id=x,limits.iops-total=1000 \
    --image-opts -c 'read -P 7 0 4k' \
    driver=throttle,file.driver=qcow2,file.file.filename=@-c.qcow2,throttle-group=x
# A filter shows the cluster size of the node it filters.
for p in q v; do
    if [ $p = q ]; then tool=($QEMU_IMG); else tool=("$VDISK"); fi
    "${tool[@]}" info --output=json --object throttle-group,id=x --image-opts \
        driver=throttle,file.driver=qcow2,file.file.filename=$p-c.qcow2,throttle-group=x \
        > $p-info.json
done
json_equal_filtered q-info.json v-info.json filename actual-size
exit 0
