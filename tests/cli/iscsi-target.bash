# Start and stop a throwaway iSCSI target (Debian's tgt) for the iscsi
# tests, sourced after ../functions.sh by tests/cli/iscsi-*.sh and
# bench/remote-iscsi.sh.
#
#   iscsi_target_start [PORT]
#                            start tgtd in the foreground on 127.0.0.1 on a
#                            free port (or PORT, to restart a target where
#                            it was), with a control port of its own (so
#                            that it never talks to another tgtd), in
#                            $PWD; sets ISCSI_PORT, ISCSI_CTL, ISCSI_PID
#                            and registers its stop with cleanup_fn.
#                            Skips (77) unless root and tgtd is installed.
#   iscsi_target_lun TID NAME FILE [BLOCKSIZE [THIN]]
#                            adds target TID named iqn.2026-12.org.vdisk:NAME
#                            with LUN 1 backed by FILE (sector size
#                            BLOCKSIZE, default 512; THIN=1 turns on thin
#                            provisioning: UNMAP, WRITE SAME with UNMAP,
#                            GET LBA STATUS), open to every initiator;
#                            prints its URI.
#   iscsi_target_kill        kills tgtd (SIGKILL: tgtd ignores SIGTERM
#                            while it has targets) and reaps it.
#
# tgtd keeps its control socket under /var/run/tgtd/socket.N; N is picked
# from the port so that concurrent tests do not share one.

ISCSI_TGTD=${ISCSI_TGTD:-/usr/sbin/tgtd}
ISCSI_TGTADM=${ISCSI_TGTADM:-/usr/sbin/tgtadm}

iscsi_tgtadm()
{
    "$ISCSI_TGTADM" -C "$ISCSI_CTL" --lld iscsi "$@"
}

iscsi_target_kill()
{
    if [ -n "${ISCSI_PID:-}" ]; then
        kill -9 "$ISCSI_PID" 2>/dev/null || true
        wait "$ISCSI_PID" 2>/dev/null || true
        rm -f "/var/run/tgtd/socket.$ISCSI_CTL" \
              "/var/run/tgtd/socket.$ISCSI_CTL.lock"
        ISCSI_PID=
    fi
}

iscsi_target_start()
{
    if [ "$(id -u)" != 0 ]; then
        echo "SKIP: tgtd needs root" >&2
        exit 77
    fi
    if [ ! -x "$ISCSI_TGTD" ] || [ ! -x "$ISCSI_TGTADM" ]; then
        echo "SKIP: $ISCSI_TGTD or $ISCSI_TGTADM is missing (Debian's tgt)" >&2
        exit 77
    fi
    local try fixed=${1:-}
    for try in 1 2 3 4 5 6 7 8; do
        ISCSI_PORT=${fixed:-$(( 20000 + (RANDOM % 20000) ))}
        ISCSI_CTL=$(( 1000 + ISCSI_PORT % 30000 ))
        if [ -e "/var/run/tgtd/socket.$ISCSI_CTL.lock" ] &&
           fuser "/var/run/tgtd/socket.$ISCSI_CTL.lock" >/dev/null 2>&1; then
            continue
        fi
        "$ISCSI_TGTD" -f --iscsi "portal=127.0.0.1:$ISCSI_PORT" \
            -C "$ISCSI_CTL" >"tgtd.$ISCSI_PORT.log" 2>&1 &
        ISCSI_PID=$!
        local i
        for i in $(seq 100); do
            if ! kill -0 "$ISCSI_PID" 2>/dev/null; then
                break
            fi
            # Up once it answers on its control socket and listens.
            if iscsi_tgtadm --mode target --op show >/dev/null 2>&1 &&
               (exec 3<>"/dev/tcp/127.0.0.1/$ISCSI_PORT") 2>/dev/null; then
                [ -n "$fixed" ] || cleanup_fn iscsi_target_kill
                return 0
            fi
            sleep 0.05
        done
        # A port or control socket clash: try another pair.
        iscsi_target_kill
    done
    cat tgtd.*.log >&2 || true
    fail "tgtd did not start"
}

iscsi_target_lun()
{
    local tid=$1 name=$2 file=$3 bsize=${4:-512} thin=${5:-0}
    local iqn="iqn.2026-12.org.vdisk:$name"
    iscsi_tgtadm --mode target --op new --tid "$tid" --targetname "$iqn"
    iscsi_tgtadm --mode logicalunit --op new --tid "$tid" --lun 1 \
        --backing-store "$file" --blocksize "$bsize"
    if [ "$thin" = 1 ]; then
        iscsi_tgtadm --mode logicalunit --op update --tid "$tid" --lun 1 \
            --params thin_provisioning=1
    fi
    iscsi_tgtadm --mode target --op bind --tid "$tid" \
        --initiator-address ALL
    echo "iscsi://127.0.0.1:$ISCSI_PORT/$iqn/1"
}
