#!/usr/bin/env bash
# qemu-nbd's options, vdisk invoked as qemu-nbd side by side with QEMU's
# qemu-nbd: bad option values (stderr, stdout, exit status, nothing
# created or written), then servers on UNIX sockets in the scratch
# directory whose exports nbdinfo --json/--map/--list and both -L clients
# must describe identically (-A, -r, -x, -D, -o, -s, -e, default export
# and discard mode), and qemu-nbd's lifetime rule (a server without -t
# ends when the last client that reached transmission leaves, not after a
# client that only listed). Every expected output is QEMU's, produced
# here. --handshake-limit (later QEMU's, ../shared/specs/qemu-nbd.rst) is
# checked on vdisk alone.
source "$(dirname "$0")/../functions.sh"
requires qemu-nbd qemu-img qemu-io nbdinfo python3 timeout md5sum
tmpdir

Q=qemu-nbd
V=$VDISK_QEMU_NBD
mkdir w out
cd w
$QEMU_IMG create -q -f qcow2 base.qcow2 4M
$QEMU_IO -c 'write -P 0x11 0 64k' base.qcow2 >/dev/null
$QEMU_IMG create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
$QEMU_IO -c 'write -P 0x33 1M 64k' top.qcow2 >/dev/null
$QEMU_IMG snapshot -c s1 top.qcow2
$QEMU_IMG create -q -f raw r.img 1M
$QEMU_IO -f raw -c 'write -P 0x44 0 1M' r.img >/dev/null

# The directory's state: names and contents of everything in it.
state()
{
    find . -type f -print0 | sort -z | xargs -0 md5sum
    ls -A
}

# same ARGS...: runs both programs with ARGS here, one after the other;
# stdout, stderr and exit status must match, and vdisk must leave the
# directory as it found it (no file created, no image written).
same()
{
    local qs=0 vs=0
    timeout 10 $Q "$@" > ../out/q.out 2> ../out/q.err || qs=$?
    rm -f -- *.sock
    state > ../out/before
    timeout 10 "$V" "$@" > ../out/v.out 2> ../out/v.err || vs=$?
    state > ../out/after
    [ "$vs" = 86 ] && fail "sanitizer report from: qemu-nbd $*"
    [ "$qs" = 124 ] && fail "qemu-nbd $* did not end: not an error case"
    diff -u ../out/q.err ../out/v.err || fail "stderr differs: qemu-nbd $*"
    diff -u ../out/q.out ../out/v.out || fail "stdout differs: qemu-nbd $*"
    [ "$qs" = "$vs" ] || fail "exit status $vs, qemu-nbd's $qs: qemu-nbd $*"
    diff -u ../out/before ../out/after ||
        fail "vdisk changed the directory: qemu-nbd $*"
}

S=$PWD/x.sock
# ---- bad values and combinations, in qemu-nbd's order of checks ----
same -o junk top.qcow2
same -o 1k top.qcow2
same -o '' top.qcow2
same -o 12x top.qcow2
same -o 0x10000000000000000 top.qcow2
same -o -1 -k "$S" -f qcow2 top.qcow2
same -o 9223372036854775808 -k "$S" -f raw r.img
same -o 9223372036854775807 -k "$S" -f raw r.img
same -o 8388608 -k "$S" -f qcow2 top.qcow2
same -B bm -k "$S" -f qcow2 top.qcow2
same -B a -B b -A -k "$S" -f raw r.img
same -B a -l nosuch -k "$S" -f qcow2 top.qcow2
same -l s1 -k "$S" -f raw r.img
same -o 512 -l s1 -k "$S" -f qcow2 top.qcow2
same -o 512 -l snapshot.id=1 -k "$S" -f qcow2 top.qcow2
same -s -l s1 -k "$S" -f qcow2 top.qcow2
same -e junk top.qcow2
same -e -1 top.qcow2
same -e 0x top.qcow2
same -e 2147483648 top.qcow2
same -e 0x10 -k x.sock top.qcow2
same -L top.qcow2
same -L -x ''
same -L -x foo
same -L -D d
same -L -o 1
same -L -A
same -L -B x
same -L -c /dev/nbd0
same -L -d
same -L -f raw
same -L -l s1
same -L -n
same -L --cache=none
same -L --aio=threads
same -L --discard=unmap
same -L --fork
same -L -k "$PWD/nosuch.sock"
same -L -r -s -v -k "$PWD/nosuch.sock"
same -L -k "$PWD/r.img"
same -L -b nosuch.invalid
same -L -p junk
same --tls-hostname=x top.qcow2
same --tls-hostname=x -L -k "$PWD/nosuch.sock"
same --tls-authz=y -L
same --tls-creds=x --tls-hostname=x top.qcow2
same --tls-creds=x -L --tls-authz=y
same --tls-creds=x -L -k "$PWD/nosuch.sock"
same -c /dev/nbd0 --tls-creds=x top.qcow2
same -d
same -d "$PWD/nosuch"
same -d "$PWD/r.img"
same -c /dev/nosuch-nbd -v -k "$S" -f raw r.img
same -c /dev/nosuch-nbd -k "$S" -f raw nosuch.img
# A regular file is no NBD device: the kernel client's first request
# fails (and the file is left as it was).
cp r.img dev.img
same -v -c "$PWD/dev.img" -k "$S" -f raw r.img
same -c "$PWD/dev.img" -k "$S" -f raw r.img
same -s -k "$S" nosuch.qcow2
same -v -k "$S" nosuch.qcow2
same -T nosuch=1 top.qcow2
long=$PWD/$(printf 'x%.0s' {1..120}).sock
same -k "$long" -f raw r.img
same -L -k "$long"
same --pid-file="$PWD/nosuch/p.pid" -k "$S" -f raw r.img
same --list=x
# Objects are made as they are read, so an object error comes before a
# later option's.
same --object nosuchtype,id=x -o junk top.qcow2
same --object secret,id=s,data=x --object secret,id=s,data=y -e x top.qcow2
same -e x --object nosuchtype,id=x top.qcow2
same --allocation-depth=1 top.qcow2
same --snapshot=1 top.qcow2
same --offset
same --bitmap

# ---- servers ----
# start_pair ARGS...: qemu-nbd and vdisk, each on its own socket
# (q.sock, v.sock) and, for -s/-o/discard cases, its own copy of the
# images (dirs q/ and v/); ARGS name images relative to those dirs.
start_pair()
{
    local who
    for who in q v; do
        rm -rf "../$who"
        mkdir "../$who"
        cp ./*.qcow2 ./*.img "../$who/"
    done
    (cd ../q && exec $Q -k "$PWD/../q.sock" "$@") 2> ../out/qsrv.err &
    qpid=$!
    cleanup_fn sh -c "kill $qpid 2>/dev/null; true"
    (cd ../v && exec "$V" -k "$PWD/../v.sock" "$@") 2> ../out/vsrv.err &
    vpid=$!
    cleanup_fn sh -c "kill $vpid 2>/dev/null; true"
    for ((i = 0; i < 200; i++)); do
        [ -S ../q.sock ] && [ -S ../v.sock ] && return 0
        sleep 0.05
    done
    cat ../out/qsrv.err ../out/vsrv.err >&2
    fail "servers did not start: $*"
}

# stop_pair: SIGTERM both; both must exit 0.
stop_pair()
{
    local qs=0 vs=0
    kill -TERM "$qpid" "$vpid" 2>/dev/null || true
    wait "$qpid" || qs=$?
    wait "$vpid" || vs=$?
    [ "$vs" = "$qs" ] || fail "vdisk's server exited $vs, qemu-nbd's $qs"
    diff -u ../out/qsrv.err ../out/vsrv.err || fail "server stderr differs"
}

# both NAME CMD...: runs CMD against each server and compares the
# outputs (the socket path and qemu-io's timings filtered). In CMD's words SOCK stands for the
# server's socket, WHO for its directory's name (q or v).
both()
{
    local name=$1 who sock args
    shift
    for who in q v; do
        sock=$(cd .. && pwd)/$who.sock
        args=("${@//SOCK/$sock}")
        { "${args[@]//WHO/$who}" 2>&1 || echo "exit status $?"; } |
            sed -e "s|$sock|SOCK|g" -e "/ ops\/sec)/d" > "../out/$name.$who"
    done
    diff -u "../out/$name.q" "../out/$name.v" || fail "$name differs"
}

# describe EXPORT: everything nbdinfo and both -L clients say.
describe()
{
    local u="nbd+unix:///$1?socket=SOCK"
    both json nbdinfo --json "$u"
    both list nbdinfo --list --json "$u"
    both map nbdinfo --map "$u"
    both L-qemu $Q -L -k SOCK
    both L-vdisk "$V" -L -k SOCK
    # And vdisk's -L says what qemu-nbd's says, on the same server.
    diff -u ../out/L-qemu.q ../out/L-vdisk.q || fail "-L output differs"
}

start_pair -t -f qcow2 top.qcow2
describe ""
grep -q 'allocation-depth' ../out/L-qemu.v &&
    fail "qemu:allocation-depth offered without -A"
stop_pair

start_pair -t -A -x e1 -D 'a description' -f qcow2 top.qcow2
describe e1
both depth nbdinfo --map=qemu:allocation-depth "nbd+unix:///e1?socket=SOCK"
stop_pair

start_pair -t -r -e 3 -x ro -f qcow2 top.qcow2
describe ro
both ro-write $QEMU_IO -f raw -c 'write 0 512' "nbd+unix:///ro?socket=SOCK"
stop_pair

# A probed raw image: qemu-nbd warns, and its minimum block is 512.
start_pair -t r.img
describe ""
stop_pair

start_pair -t -l s1 -f qcow2 top.qcow2
describe ""
stop_pair

# -o: a window of the raw image; then of a qcow2 image's guest view.
start_pair -t -o 65536 -f raw r.img
describe ""
both o-read $QEMU_IO -f raw -c 'read -P 0x44 0 960k' -c 'write -P 0x55 0 4k' \
    "nbd+unix:///?socket=SOCK"
stop_pair
both o-file $QEMU_IO -f raw -c 'read -P 0x44 0 64k' -c 'read -P 0x55 64k 4k' \
    ../WHO/r.img
start_pair -t -o 1048576 -A -f qcow2 top.qcow2
describe ""
both o-depth nbdinfo --map=qemu:allocation-depth "nbd+unix:///?socket=SOCK"
stop_pair

# -s: writes go to a temporary overlay; the image stays as it was and
# nothing is left behind.
mkdir ../tmp
export TMPDIR=$(cd ../tmp && pwd)
start_pair -t -s -A -f qcow2 top.qcow2
describe ""
both s-write $QEMU_IO -f raw -c 'write -P 0x66 2M 64k' -c 'read -P 0x66 2M 64k' \
    -c 'read -P 0x33 1M 64k' "nbd+unix:///?socket=SOCK"
both s-depth nbdinfo --map=qemu:allocation-depth "nbd+unix:///?socket=SOCK"
stop_pair
(cd ../v && state) > ../out/s-after
state > ../out/s-before
diff -u ../out/s-before ../out/s-after || fail "-s wrote the image"
[ -z "$(ls -A ../tmp)" ] || fail "-s left a file behind: $(ls -A ../tmp)"
unset TMPDIR

# Discards: ignored by default, as qemu-nbd's; passed down with
# --discard=unmap. The files' allocation afterwards must agree.
for mode in "" --discard=unmap; do
    start_pair -t $mode -f raw r.img
    both discard $QEMU_IO -f raw -c 'discard 0 512k' -c 'flush' \
        "nbd+unix:///?socket=SOCK"
    stop_pair
    both discard-map $QEMU_IMG map --output=json -f raw ../WHO/r.img
done

# Without -t: a client that only lists does not end the server; the
# first client that reached transmission does, when it leaves.
start_pair -f qcow2 top.qcow2
both L-once $Q -L -k SOCK
sleep 0.3
kill -0 "$qpid" || fail "qemu-nbd ended after a listing client (unexpected)"
kill -0 "$vpid" || fail "vdisk's server ended after a client that only listed"
both read-once $QEMU_IO -f raw -c 'read -P 0x33 1M 64k' "nbd+unix:///?socket=SOCK"
qs=0 vs=0
timeout 10 sh -c "while kill -0 $qpid 2>/dev/null; do sleep 0.05; done" || qs=1
timeout 10 sh -c "while kill -0 $vpid 2>/dev/null; do sleep 0.05; done" || vs=1
[ "$qs" = 0 ] || fail "qemu-nbd did not end after its client (unexpected)"
[ "$vs" = 0 ] || fail "vdisk's server did not end after the first client left"
stop_pair
[ -e ../v.sock ] && fail "socket left behind"

# --handshake-limit (vdisk alone: QEMU 7.2 lacks it): a client that
# says nothing is dropped after the limit; an invalid value is refused.
"$V" -t --handshake-limit=1 -k "$PWD/../h.sock" -f raw r.img 2> ../out/h.err &
hpid=$!
cleanup_fn sh -c "kill $hpid 2>/dev/null; true"
for ((i = 0; i < 200; i++)); do [ -S ../h.sock ] && break; sleep 0.05; done
python3 - "$PWD/../h.sock" <<'EOF'
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.settimeout(8)
t = time.time()
data = b""
while True:
    d = s.recv(4096)
    if not d:
        break
    data += d
took = time.time() - t
assert data.startswith(b"NBDMAGIC"), data
assert 0.5 < took < 5, "dropped after %.1f s, limit 1 s" % took
EOF
kill "$hpid"
wait "$hpid" || true
expect_status 1 "$V" --handshake-limit=x -f raw r.img
expect_status 1 "$V" --handshake-limit=-1 -f raw r.img
