#!/usr/bin/env bash
# vdisk serve -l exports an internal snapshot read-only, as qemu-nbd -l:
# by id or name, or snapshot.id=/snapshot.name=; writes are refused and a
# missing snapshot fails at start-up.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io
tmpdir

$QEMU_IMG create -q -f qcow2 img.qcow2 4M
$QEMU_IO -c 'write -P 1 0 1M' img.qcow2 >/dev/null
$QEMU_IMG snapshot -c first img.qcow2
$QEMU_IO -c 'write -P 2 0 1M' img.qcow2 >/dev/null
before=$(sha256sum < img.qcow2)

serve()
{
    rm -f sock
    "$VDISK" serve --fork --pid-file=pid -t -k "$PWD/sock" "$@" img.qcow2 ||
        fail "serve $* did not start"
    cleanup_fn kill "$(cat pid)"
}
stop()
{
    kill "$(cat pid)"
    for _ in $(seq 100); do kill -0 "$(cat pid)" 2>/dev/null || return 0; sleep 0.05; done
    fail "server did not stop"
}
uri="nbd+unix:///?socket=$PWD/sock"

for spec in first 1 snapshot.name=first snapshot.id=1 \
            snapshot.id=1,snapshot.name=first; do
    serve -l "$spec"
    $QEMU_IO -r -f raw -c 'read -P 1 0 1M' "$uri" | grep -q '^read 1048576/' ||
        fail "-l $spec does not export the snapshot's content"
    if $QEMU_IO -f raw -c 'write -P 3 0 4k' "$uri" >out 2>&1; then
        fail "-l $spec: the export accepted a write"
    fi
    stop
done

# The same refusals as qemu-nbd.
expect_status 1 "$VDISK" serve -k "$PWD/sock" -l nosuch img.qcow2
expect_status 1 "$VDISK" serve -k "$PWD/sock" -l snapshot.bogus=1 img.qcow2
[ "$(sha256sum < img.qcow2)" = "$before" ] || fail "exporting a snapshot changed the image"
