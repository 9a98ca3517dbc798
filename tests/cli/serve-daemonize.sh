#!/usr/bin/env bash
# qemu-storage-daemon's --daemonize, --pidfile, -T/--trace, -V and -h,
# with qemu-storage-daemon itself doing the same beside `vdisk serve`:
# the parent returns only once the daemon serves (an NBD client connects
# at once), with the daemon in its own session, its stdio on /dev/null
# and its working directory /; the pid file names it, is locked (a
# second daemon on it fails with QEMU's words) and goes away on quit; a
# setup error reaches the caller's stderr with status 1 and leaves no
# daemon and no pid file. Messages are compared without the program
# name that starts them.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-storage-daemon python3 timeout
tmpdir

$QEMU_IMG create -q -f raw r.raw 1M

# Runs DAEMON (qemu-storage-daemon or "$VDISK serve") daemonized with a
# pid file in directory D; prints the exit status.
start() {
    local d=$1
    shift
    mkdir -p "$d"
    timeout 30 "$@" --daemonize --pidfile "$PWD/$d/pid" -T 'nbd_*' \
        --blockdev "driver=file,node-name=f,filename=$PWD/r.raw,locking=off" \
        --blockdev driver=raw,node-name=r,file=f \
        --nbd-server "addr.type=unix,addr.path=$PWD/$d/nbd.sock" \
        --export type=nbd,id=e,node-name=r,name=e \
        --chardev "socket,id=m,path=$PWD/$d/qmp.sock,server=on,wait=off" \
        --monitor chardev=m > "$d/out" 2> "$d/err" 19>&- && echo 0 || echo $?
}

# What a client, ps and /proc see of the daemon whose pid file is in D.
observe() {
    local d=$1 pid
    pid=$(cat "$d/pid") || { echo "no pid file"; return; }
    kill -0 "$pid" 2>/dev/null && echo "pid file names a live process"
    timeout 10 $QEMU_IMG info --output=json "nbd+unix:///e?socket=$PWD/$d/nbd.sock" \
        | grep -o '"virtual-size": [0-9]*'
    [ "$(ps -o sid= -p "$pid" | tr -d ' ')" = "$(ps -o sid= -p $$ | tr -d ' ')" ] ||
        echo "own session"
    [ "$(ps -o sid= -p "$pid" | tr -d ' ')" != "$pid" ] && echo "not a session leader"
    for fd in 0 1 2; do echo "fd $fd: $(readlink "/proc/$pid/fd/$fd")"; done
    echo "cwd: $(readlink "/proc/$pid/cwd")"
    echo "stdout: $(cat "$d/out")"
    echo "stderr: $(cat "$d/err")"
}

# The messages of a run without the program name at the start.
msgs() {
    sed -e 's/^qemu-storage-daemon: //' -e 's/^vdisk serve: //' \
        -e 's/^vdisk: //' "$1"
}

quit() {
    local d=$1 pid
    pid=$(cat "$d/pid")
    python3 - "$PWD/$d/qmp.sock" <<'PYEOF'
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rw")
f.readline()
for c in ("qmp_capabilities", "quit"):
    f.write(json.dumps({"execute": c}) + "\n"); f.flush()
    while "event" in json.loads(f.readline()):
        pass
PYEOF
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    kill -0 "$pid" 2>/dev/null && echo "still running after quit"
    [ -e "$d/pid" ] && echo "pid file left after quit"
    echo "quit done"
}

stq=$(start q qemu-storage-daemon)
stv=$(start v "$VDISK" serve)
# The daemons outlive the commands that started them: end them with
# the test.
for d in q v; do
    [ -s $d/pid ] && cleanup_fn sh -c "kill $(cat $d/pid) 2>/dev/null; true"
done
[ "$stq" = 0 ] || fail "qemu-storage-daemon --daemonize failed: $(cat q/err)"
[ "$stv" = 0 ] || fail "vdisk serve --daemonize failed: $(cat v/err)"
observe q > q.obs
observe v > v.obs
diff -u q.obs v.obs || fail "the daemons differ (qemu-storage-daemon -, vdisk serve +)"
grep -q "virtual-size" q.obs || fail "no NBD client could connect: $(cat q.obs)"

# A second daemon on a locked pid file fails, with the same words.
mkdir q2 v2
timeout 30 qemu-storage-daemon --daemonize --pidfile "$PWD/q/pid" 2> q2/err 19>&- && st=0 || st=$?
echo "status $st" >> q2/err
timeout 30 "$VDISK" serve --daemonize --pidfile "$PWD/v/pid" 2> v2/err 19>&- && st=0 || st=$?
echo "status $st" >> v2/err
diff -u <(msgs q2/err) <(msgs v2/err) || fail "locked pid file: messages differ"
grep -q "status 1" q2/err || fail "qemu-storage-daemon accepted a locked pid file"
kill -0 "$(cat v/pid)" || fail "the first vdisk daemon died"

quit q > q.quit
quit v > v.quit
diff -u q.quit v.quit || fail "quit differs"

# Setup errors: reported by the daemon on the caller's stderr, status 1,
# no pid file, nothing left running.
for bad in "--blockdev driver=file,node-name=f,filename=$PWD/nonexistent" \
           "--export type=nbd,id=e,node-name=nope" \
           "--pidfile $PWD/no/such/dir/pid"; do
    rm -rf qb vb
    mkdir qb vb
    timeout 30 qemu-storage-daemon --daemonize --pidfile "$PWD/qb/pid" $bad 2> qb/err 19>&- && st=0 || st=$?
    echo "status $st" >> qb/err
    timeout 30 "$VDISK" serve --daemonize --pidfile "$PWD/vb/pid" $bad 2> vb/err 19>&- && st=0 || st=$?
    echo "status $st" >> vb/err
    diff -u <(msgs qb/err | sed "s|$PWD|@D@|g") <(msgs vb/err | sed "s|$PWD|@D@|g") ||
        fail "setup error '$bad': messages differ"
    grep -q "status 1" vb/err || fail "vdisk serve --daemonize succeeded with $bad"
    [ -e vb/pid ] && fail "pid file left after a failed setup ($bad)"
done

# -V, -h and a bad --trace.
qemu-storage-daemon -V | head -1 | grep -o 'version 7\.2\.' > q.ver
"$VDISK" serve -V | head -1 | grep -o 'version 7\.2\.' > v.ver
diff q.ver v.ver || fail "-V: no QEMU 7.2 version line"
"$VDISK" serve -h > v.help || fail "-h failed"
for o in --daemonize --pidfile --trace --version; do
    grep -q -- "$o" v.help || fail "-h does not mention $o"
done
expect_status 1 "$VDISK" serve --trace 'x,bogus=1'
exit 0
