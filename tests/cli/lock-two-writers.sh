#!/usr/bin/env bash
# Two processes on one image: while one program holds it (vdisk io,
# vdisk serve in both forms, qemu-io, qemu-nbd, qemu-storage-daemon;
# read-write and read-only), every other
# program (vdisk and qemu tools alike) is refused exactly when QEMU refuses
# the same pair, with QEMU's lock message and hint, and no write is lost.
# Regression: a second `vdisk io` wrote a qcow2 image another vdisk held,
# reported success, and its write was gone afterwards (vdisk never tested
# the lock bytes of another vdisk); `vdisk info` opened an image another
# vdisk was writing without -U; a writable `vdisk serve` let `vdisk io`
# write the served image under it.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-nbd qemu-storage-daemon timeout
tmpdir

# ---- holders: long-lived processes that keep the image open --------------

# holder_do CMD OUTPUT IMPL: sends CMD to the io holder and waits until
# its output shows OUTPUT.
holder_do()
{
    echo "$1" >&7
    for _ in $(seq 100); do
        grep -q "$2" holder.out && return 0
        sleep 0.05
    done
    fail "$3 io holder did not run '$1': $(cat holder.out)"
}

wait_socket()
{
    for _ in $(seq 100); do
        [ -S h.sock ] && return 0
        sleep 0.05
    done
    fail "$1 server holder did not start: $(cat holder.out)"
}

# start_holder KIND IMPL FMT IMG: KIND io|io-r|nbd|nbd-r|qsd (the
# qemu-storage-daemon form of vdisk serve), IMPL vdisk|qemu.
# An io holder reads commands from a FIFO (fd 7); it first writes 0x11 to
# [0, 64k) so that the image holds data the holder is responsible for.
holder_pid=
start_holder()
{
    local kind=$1 impl=$2 fmt=$3 img=$4 ro=
    case $kind in *-r) ro=-r ;; esac
    case $kind in
    io*)
        rm -f cmd.fifo holder.out
        mkfifo cmd.fifo
        if [ "$impl" = vdisk ]; then
            $VDISK io $ro -f "$fmt" "$img" < cmd.fifo > holder.out 2>&1 &
        else
            $QEMU_IO $ro -f "$fmt" "$img" < cmd.fifo > holder.out 2>&1 &
        fi
        holder_pid=$!
        exec 7> cmd.fifo
        if [ -z "$ro" ]; then
            holder_do "write -P 0x11 0 64k" "wrote 65536/65536" "$impl"
        else
            holder_do "read 0 512" "read 512/512" "$impl"
        fi
        ;;
    qsd)
        # The daemon form: a blockdev graph and a writable export.
        rm -f h.sock
        local args=(--blockdev "driver=file,node-name=f,filename=$img"
                    --blockdev "driver=$fmt,node-name=d,file=f"
                    --nbd-server "addr.type=unix,addr.path=$PWD/h.sock"
                    --export "type=nbd,id=e,node-name=d,name=,writable=on")
        if [ "$impl" = vdisk ]; then
            $VDISK serve "${args[@]}" > holder.out 2>&1 &
        else
            qemu-storage-daemon "${args[@]}" > holder.out 2>&1 &
        fi
        holder_pid=$!
        wait_socket "$impl"
        $QEMU_IO -f raw -c "write -P 0x11 0 64k" \
            "nbd+unix:///?socket=$PWD/h.sock" > /dev/null
        ;;
    nbd*)
        rm -f h.sock
        if [ "$impl" = vdisk ]; then
            $VDISK serve -t $ro -f "$fmt" -k "$PWD/h.sock" "$img" > holder.out 2>&1 &
        else
            qemu-nbd -t $ro -f "$fmt" -k "$PWD/h.sock" "$img" > holder.out 2>&1 &
        fi
        holder_pid=$!
        wait_socket "$impl"
        if [ -z "$ro" ]; then
            $QEMU_IO -f raw -c "write -P 0x11 0 64k" \
                "nbd+unix:///?socket=$PWD/h.sock" > /dev/null
        fi
        ;;
    esac
}

stop_holder()
{
    case $1 in
    io*)
        echo "quit" >&7 2>/dev/null || true
        exec 7>&-
        wait "$holder_pid" || fail "io holder failed: $(cat holder.out)"
        ;;
    nbd*|qsd)
        kill "$holder_pid"
        wait "$holder_pid" 2>/dev/null || true
        ;;
    esac
    holder_pid=
}
kill_holder()
{
    exec 7>&- 2>/dev/null
    [ -n "$holder_pid" ] && kill "$holder_pid" 2>/dev/null
    true
}
cleanup_fn kill_holder

# ---- seconds: one command each, run while the holder holds -------------

# serve_briefly SERVER ARGS...: a server that opens its image and listens
# counts as accepted (status 0, then stopped); one that exits first was
# refused (its status).
serve_briefly()
{
    local pid st=0
    rm -f s2.sock
    "$@" -k "$PWD/s2.sock" &
    pid=$!
    for _ in $(seq 200); do
        # qemu-nbd listens before it opens the image: a server counts as
        # running once it still runs a moment after listening.
        if [ -S s2.sock ] && sleep 0.3 && kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            wait "$pid" 2>/dev/null || true
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.025
    done
    wait "$pid" || st=$?
    [ "$st" = 0 ] && st=1   # exited without listening
    return "$st"
}

# second NAME IMPL FMT IMG: runs the second program; prints "ok" or
# "refused" on stdout and leaves its stderr in second.err. Commands that
# serve run for a moment: still running after it means accepted.
second()
{
    local name=$1 impl=$2 fmt=$3 img=$4 st=0 img_tool io_tool nbd_tool
    if [ "$impl" = vdisk ]; then
        img_tool=$VDISK io_tool="$VDISK io" nbd_tool="$VDISK serve"
    else
        img_tool=$QEMU_IMG io_tool=$QEMU_IO nbd_tool=qemu-nbd
    fi
    case $name in
    io-w)     $io_tool -f "$fmt" -c "write -P 0x22 1M 64k" "$img" ;;
    io-r)     $io_tool -r -f "$fmt" -c "read 0 64k" "$img" ;;
    io-U)     $io_tool -U -r -f "$fmt" -c "read 0 64k" "$img" ;;
    info)     $img_tool info -f "$fmt" "$img" ;;
    info-U)   $img_tool info -U -f "$fmt" "$img" ;;
    map)      $img_tool map -f "$fmt" "$img" ;;
    resize)   $img_tool resize -f "$fmt" "$img" +1M ;;
    snapshot) $img_tool snapshot -c s1 "$img" ;;
    amend)    $img_tool amend -f "$fmt" -o lazy_refcounts=on "$img" ;;
    commit)   $img_tool commit -f "$fmt" "$img" ;;
    check-r)  $img_tool check -r all -f "$fmt" "$img" ;;
    rebase)   $img_tool rebase -u -b base.qcow2 -F qcow2 -f "$fmt" "$img" ;;
    convert)  $img_tool convert -f raw -O "$fmt" src.raw "$img" ;;
    create)   $img_tool create -f "$fmt" "$img" 4M ;;
    serve)    serve_briefly $nbd_tool -f "$fmt" "$img" ;;
    serve-r)  serve_briefly $nbd_tool -r -f "$fmt" "$img" ;;
    esac > second.out 2> second.err || st=$?
    [ "$st" = 86 ] && fail "sanitizer report from $impl $name: $(cat second.err)"
    case $st in
    0) echo ok ;;
    *) echo refused ;;
    esac
}

# The lock line of an error, without the program name and what precedes
# the lock text (qemu-img says "Could not open 'x': ...", qemu-nbd
# "Failed to blk_new_open 'x': ..."): what must match between the tools.
lock_text()
{
    grep -o 'Failed to get.*lock\|Is another process using the image.*' \
        second.err || true
}

# ---- the matrix -------------------------------------------------------

# Seconds that replace the image (convert, create) come last.
qcow2_seconds="io-w io-r io-U info info-U map resize snapshot amend commit check-r rebase serve serve-r convert create"
raw_seconds="io-w io-r io-U info info-U map serve serve-r convert create"

fresh_image()
{
    local fmt=$1
    rm -f img base.qcow2
    [ -f src.raw ] || $QEMU_IMG create -q -f raw src.raw 4M
    if [ "$fmt" = qcow2 ]; then
        $QEMU_IMG create -q -f qcow2 base.qcow2 4M
        $QEMU_IMG create -q -f qcow2 -b base.qcow2 -F qcow2 img
    else
        $QEMU_IMG create -q -f raw img 4M
    fi
}

pairs=0
for fmt in qcow2 raw; do
    seconds=$qcow2_seconds
    [ "$fmt" = raw ] && seconds=$raw_seconds
    for kind in io io-r nbd nbd-r qsd; do
        # The referee: QEMU's holder and QEMU's seconds.
        declare -A want=() want_text=()
        fresh_image "$fmt"
        start_holder "$kind" qemu "$fmt" img
        for s in $seconds; do
            want[$s]=$(second "$s" qemu "$fmt" img)
            want_text[$s]=$(lock_text)
        done
        stop_holder "$kind"

        # Every mix of vdisk and QEMU must give QEMU's answers.
        for holder in vdisk qemu; do
            for impl in vdisk qemu; do
                [ "$holder" = qemu ] && [ "$impl" = qemu ] && continue
                fresh_image "$fmt"
                start_holder "$kind" "$holder" "$fmt" img
                wrote_second=no
                destroyed=no
                for s in $seconds; do
                    got=$(second "$s" "$impl" "$fmt" img)
                    pairs=$((pairs + 1))
                    [ "$got" = "${want[$s]}" ] ||
                        fail "$fmt: $impl $s while $holder $kind holds: $got," \
                             "QEMU: ${want[$s]}: $(cat second.err)"
                    if [ "$got" = refused ]; then
                        [ "$(lock_text)" = "${want_text[$s]}" ] ||
                            fail "$fmt: $impl $s while $holder $kind holds:" \
                                 "message '$(lock_text)', QEMU '${want_text[$s]}'"
                        continue
                    fi
                    case $s in
                    io-w) wrote_second=yes ;;
                    resize|commit|convert|create) destroyed=yes ;;
                    esac
                done
                stop_holder "$kind"
                # Nothing the holder wrote, nor an accepted second write,
                # is lost; qcow2 stays consistent.
                if [ "$destroyed" = no ]; then
                    case $kind in
                    io|nbd|qsd)
                        $QEMU_IO -f "$fmt" -c "read -P 0x11 0 64k" img > r.out ||
                            fail "$fmt: holder $holder $kind lost its write"
                        ;;
                    esac
                    if [ "$wrote_second" = yes ]; then
                        $QEMU_IO -f "$fmt" -c "read -P 0x22 1M 64k" img > r.out ||
                            fail "$fmt: second writer's data lost ($holder $kind)"
                    fi
                fi
                if [ "$fmt" = qcow2 ]; then
                    $QEMU_IMG check -q img ||
                        fail "qcow2 not clean after $holder $kind + $impl"
                fi
            done
        done
        unset want want_text
    done
done
echo "$pairs pairs agree with QEMU"

# -U (force-share) is for readers only: a writer asking for it is refused
# with QEMU's words, by every command that has the option.
fresh_image qcow2
for cmd in "io -U -c 'write 0 512'" "snapshot -U -c s" "check -U -r all"; do
    eval "$VDISK $cmd img" > /dev/null 2> v.err && fail "vdisk $cmd accepted -U"
    case $cmd in
    io*) eval "$QEMU_IO ${cmd#io } img" > /dev/null 2> q.err || true ;;
    *) eval "$QEMU_IMG $cmd img" > /dev/null 2> q.err || true ;;
    esac
    grep -q "force-share=on can only be used with read-only images" q.err ||
        fail "qemu refused $cmd differently: $(cat q.err)"
    grep -q "force-share=on can only be used with read-only images" v.err ||
        fail "vdisk $cmd: $(cat v.err)"
done
