#!/usr/bin/env bash
# Many requests in flight: two fio jobs (libnbd engine, iodepth 32 each, two
# connections) write verified random data to disjoint halves of one export
# at once, then read it all back and check it, and qemu-img check agrees;
# then the same through an export made slow by an iops limit.
source "$(dirname "$0")/../functions.sh"
requires qemu-img fio timeout
requires_run fio --enghelp=nbd
tmpdir

$QEMU_IMG create -q -f qcow2 -o cluster_size=64k img.qcow2 64M

timeout 30 "$VDISK" serve --fork --pid-file "$PWD/pid" -t -e 4 -f qcow2 \
    -k "$PWD/sock" img.qcow2
stop()
{
    local pid i
    pid=$(cat pid 2>/dev/null) || return 0
    kill "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "$pid"
}
cleanup_fn stop
U="nbd+unix:///?socket=$PWD/sock"

# fio's own verification: each job writes its half with checksummed
# blocks, then reads them back (do_verify).
cat > job.fio <<EOF
[global]
ioengine=nbd
uri=$U
rw=randwrite
bsrange=4k-64k
iodepth=32
size=32M
verify=crc32c
verify_fatal=1
do_verify=1
randrepeat=1

[low]
offset=0

[high]
offset=32M
EOF
timeout 240 fio --output=fio.out job.fio || { cat fio.out; fail "fio failed"; }
grep -q 'err= 0' fio.out || { cat fio.out; fail "fio reported errors"; }

# A second pass re-reads everything through a fresh connection.
cat > verify.fio <<EOF
[global]
ioengine=nbd
uri=$U
rw=randwrite
bsrange=4k-64k
iodepth=32
size=32M
verify=crc32c
verify_only=1
verify_fatal=1
randrepeat=1

[low]
offset=0

[high]
offset=32M
EOF
timeout 240 fio --output=verify.out verify.fio ||
    { cat verify.out; fail "fio verify pass failed"; }

stop
$QEMU_IMG check -q img.qcow2

# Slow requests (an iops limit, as a disk behind the image would make
# them): the server then stops taking small requests in batches and
# gives each a thread again. The data must come back the same.
$QEMU_IMG create -q -f qcow2 slow.qcow2 16M
timeout 30 "$VDISK" serve --fork --pid-file "$PWD/pid" -t \
    --object throttle-group,id=tg,x-iops-total=2000 --image-opts \
    -k "$PWD/sock" \
    driver=throttle,throttle-group=tg,file.driver=qcow2,file.file.filename=slow.qcow2
timeout 120 fio --name=slow --ioengine=nbd --uri="$U" --rw=randwrite \
    --bs=4k --iodepth=32 --size=2M --verify=crc32c --do_verify=1 \
    --verify_fatal=1 --randrepeat=1 --output=slow.out ||
    { cat slow.out; fail "fio through the slow export failed"; }
grep -q 'err= 0' slow.out || { cat slow.out; fail "fio (slow) errors"; }
stop
$QEMU_IMG check -q slow.qcow2
exit 0
