#!/usr/bin/env bash
# A throwaway single-node Ceph cluster for the rbd tests and benchmark:
# one ceph-mon, one ceph-osd (memstore) and, with CEPH_CLUSTER_MGR=1, one
# ceph-mgr, everything under one directory, bound to 127.0.0.1 on free
# ports, cephx keys made for the run, no systemd. Other scripts either
# call it
#
#     tests/ceph-cluster.sh start DIR    # usable within 60 s, or exit 1
#                                        # saying why (77: not installed)
#     tests/ceph-cluster.sh env DIR      # prints `export CEPH_CONF=...`
#     tests/ceph-cluster.sh stop DIR     # OSD, then mgr, then mon, by PID
#
# or source it and call ceph_cluster_start / ceph_cluster_stop DIR (after
# start, CEPH_CONF is exported, which the ceph tools, librados and
# QEMU's rbd driver read; the client.admin key is in DIR/keyring, named
# by the configuration's [client] section; the pool "rbd" exists). No
# CEPH_KEYRING or CEPH_ARGS: the daemons would take them too. The
# daemons' PIDs are in DIR/pids/*.pid, their logs in DIR/log.
#
# Why it looks like this (issue 15's notes on this machine): the mgr is
# started only with CEPH_CLUSTER_MGR=1 (RBD needs none; it is the slowest
# daemon to start); the cluster is usable once `rbd pool init` has
# written to the pool; with the mgr, since the first HEALTH_OK comes
# before it is active, we wait on `ceph -s -f json` for an active mgr
# and every placement group active+clean;
# `mon data avail warn/crit` are lowered so a full shared disk does not
# raise MON_DISK_LOW; pools of size one need `mon allow pool size one`
# and `mon warn on pool no redundancy = false`; stopping the OSD before
# the monitor keeps it from waiting 5 s for a monitor that is gone.

ceph_cluster_free_port()
{
    # A port nobody listens on now; a clash later makes the monitor fail
    # to bind, and start retries with other ports.
    local p
    while :; do
        p=$((20000 + RANDOM % 30000))
        if ! (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null; then
            echo "$p"
            return
        fi
    done
}

ceph_cluster_env()
{
    export CEPH_CONF="$1/ceph.conf"
}

# Kills one daemon by its PID file and waits for it (at most 10 s, then
# SIGKILL).
ceph_cluster_kill()
{
    local f=$1 pid i
    [ -f "$f" ] || return 0
    pid=$(cat "$f")
    rm -f "$f"
    [ -n "$pid" ] || return 0
    kill "$pid" 2>/dev/null || return 0
    for i in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
}

ceph_cluster_stop()
{
    local d=$1
    ceph_cluster_kill "$d/pids/osd.pid"
    ceph_cluster_kill "$d/pids/mgr.pid"
    ceph_cluster_kill "$d/pids/mon.pid"
}

ceph_cluster_why()
{
    echo "ceph-cluster: $*" >&2
    local f
    for f in "$1"/log/*.log; do
        [ -f "$f" ] || continue
        echo "--- last lines of $f" >&2
        tail -n 15 "$f" >&2
    done
}

# Writes the configuration, keys and monitor store, starts the monitor.
ceph_cluster_mon()
{
    local d=$1 p1 p2 fsid
    p1=$(ceph_cluster_free_port)
    p2=$(ceph_cluster_free_port)
    fsid=$(cat /proc/sys/kernel/random/uuid)
    cat >"$d/ceph.conf" <<EOF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$p2,v1:127.0.0.1:$p1]
public addr = 127.0.0.1
public network = 127.0.0.0/8
ms bind ipv4 = true
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
run dir = $d/run
log file = $d/log/\$name.log
log to stderr = false
err to stderr = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
mon osd full ratio = .99
mon osd nearfull ratio = .99
mon osd backfillfull ratio = .99
rados mon op timeout = 15
rados osd op timeout = 15
client mount timeout = 15
[client]
keyring = $d/keyring
# Clients run side by side (the tests' tools at once): no admin socket,
# whose one name they would fight over.
admin socket =
[mon]
admin socket = $d/run/\$name.asok
mon data = $d/mon
keyring = $d/mon.keyring
[mgr]
admin socket = $d/run/\$name.asok
mgr data = $d/mgr
keyring = $d/mgr/keyring
mgr initial modules =
[osd]
admin socket = $d/run/\$name.asok
osd data = $d/osd
keyring = $d/osd/keyring
osd objectstore = memstore
memstore device bytes = 4294967296
osd max object name len = 256
osd max object namespace len = 64
EOF
    ceph-authtool --create-keyring "$d/mon.keyring" --gen-key -n mon. \
        --cap mon 'allow *' >/dev/null
    ceph-authtool --create-keyring "$d/keyring" --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' \
        --cap mds 'allow *' >/dev/null
    ceph-authtool "$d/mon.keyring" --import-keyring "$d/keyring" >/dev/null
    monmaptool --create --fsid "$fsid" \
        --addv a "[v2:127.0.0.1:$p2,v1:127.0.0.1:$p1]" "$d/monmap" >/dev/null
    mkdir -p "$d/mon"
    ceph-mon -c "$d/ceph.conf" --mkfs -i a --monmap "$d/monmap" \
        --keyring "$d/mon.keyring" >"$d/log/mon-mkfs.out" 2>&1
    ceph-mon -c "$d/ceph.conf" -i a -f >>"$d/log/mon.out" 2>&1 &
    echo $! >"$d/pids/mon.pid"
}

ceph_cluster_start()
{
    local d=$1 start=$SECONDS try uuid key id json
    local c
    for c in ceph-mon ceph-mgr ceph-osd ceph ceph-authtool monmaptool rbd; do
        if ! command -v "$c" >/dev/null 2>&1; then
            echo "ceph-cluster: '$c' is not installed" >&2
            return 77
        fi
    done
    mkdir -p "$d/run" "$d/log" "$d/pids"
    ceph_cluster_env "$d"
    # The monitor: retried on other ports if its ports were taken.
    for try in 1 2 3; do
        rm -rf "$d/mon"
        ceph_cluster_mon "$d"
        if timeout 15 ceph --connect-timeout 10 mon stat >/dev/null 2>&1; then
            break
        fi
        ceph_cluster_kill "$d/pids/mon.pid"
        if [ "$try" = 3 ]; then
            ceph_cluster_why "$d" "the monitor did not come up"
            return 1
        fi
    done

    # The manager only with CEPH_CLUSTER_MGR=1: RBD works without it (it
    # keeps health quiet), and loading its Python modules costs tens of
    # CPU seconds, more than a minute on a loaded machine.
    if [ "${CEPH_CLUSTER_MGR:-0}" = 1 ]; then
        mkdir -p "$d/mgr"
        ceph auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' \
            mds 'allow *' -o "$d/mgr/keyring" >/dev/null
        ceph-mgr -c "$d/ceph.conf" -i x -f >>"$d/log/mgr.out" 2>&1 &
        echo $! >"$d/pids/mgr.pid"
    fi

    # The OSD: registered with its key, then its store made and started.
    uuid=$(cat /proc/sys/kernel/random/uuid)
    key=$(ceph-authtool --gen-print-key)
    echo "{\"cephx_secret\": \"$key\"}" >"$d/osd-secret.json"
    id=$(ceph osd new "$uuid" -i "$d/osd-secret.json")
    mkdir -p "$d/osd"
    ceph-authtool --create-keyring "$d/osd/keyring" --name "osd.$id" \
        --add-key "$key" >/dev/null
    ceph-osd -c "$d/ceph.conf" -i "$id" --mkfs --osd-uuid "$uuid" \
        >"$d/log/osd-mkfs.out" 2>&1 || {
        ceph_cluster_why "$d" "ceph-osd --mkfs failed: $(tail -n 3 "$d/log/osd-mkfs.out")"
        return 1
    }
    ceph-osd -c "$d/ceph.conf" -i "$id" -f >>"$d/log/osd.out" 2>&1 &
    echo $! >"$d/pids/osd.pid"

    ceph osd pool create rbd 8 8 >/dev/null 2>&1
    ceph osd pool set rbd size 1 --yes-i-really-mean-it >/dev/null 2>&1 || true
    # rbd pool init writes to the pool, so it waits for the OSD.
    if ! timeout $((60 - (SECONDS - start))) rbd pool init rbd \
            >"$d/log/pool-init.out" 2>&1; then
        ceph_cluster_why "$d" "'rbd pool init rbd' did not finish within 60 s of the start (OSD not up?)"
        return 1
    fi
    # Usable: `rbd pool init` wrote to the pool. With the mgr, also wait
    # until it is active and every placement group active+clean (the
    # placement groups' states come from the mgr).
    [ "${CEPH_CLUSTER_MGR:-0}" = 1 ] || return 0
    while :; do
        json=$(timeout 10 ceph -s -f json 2>/dev/null || true)
        if python3 -c '
import json, sys
s = json.loads(sys.argv[1])
pg = s["pgmap"]
ok = s["mgrmap"]["available"] and pg["num_pgs"] > 0 and \
    sum(x["count"] for x in pg.get("pgs_by_state", [])
        if x["state_name"] == "active+clean") == pg["num_pgs"]
sys.exit(0 if ok else 1)' "$json" 2>/dev/null; then
            break
        fi
        if [ $((SECONDS - start)) -ge 60 ]; then
            ceph_cluster_why "$d" "not healthy after 60 s: $(ceph -s 2>&1 | tr '\n' ' ')"
            return 1
        fi
        sleep 0.5
    done
    return 0
}

# For the tests (tests/functions.sh loaded, in the test's directory):
# starts a cluster in ./ceph, stopped when the test ends; a test without
# the Ceph daemons is skipped (77), one whose cluster does not come up
# fails saying so.
ceph_cluster_for_test()
{
    local rc=0
    mkdir ceph || fail "mkdir ceph"
    cleanup_fn ceph_cluster_stop "$PWD/ceph"
    ceph_cluster_start "$PWD/ceph" || rc=$?
    [ $rc = 77 ] && exit 77
    [ $rc = 0 ] || fail "the Ceph cluster did not come up (see above)"
}

# Run as a program: start / stop / env DIR.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    case "${1:-}" in
    start)
        ceph_cluster_start "$2"
        rc=$?
        [ $rc = 0 ] || ceph_cluster_stop "$2"
        exit $rc
        ;;
    stop) ceph_cluster_stop "$2" ;;
    env)
        echo "export CEPH_CONF='$2/ceph.conf'"
        ;;
    *)
        echo "usage: $0 start|stop|env DIR" >&2
        exit 2
        ;;
    esac
fi
