#!/usr/bin/env bash
# qcow2 internal snapshots both ways with qemu-img: snapshots vdisk makes
# are listed by qemu-img with the same ids, names and sizes and revert to
# the content current at creation; snapshots qemu-img makes are applied,
# read (convert -l, io -l) and deleted by vdisk; both checkers stay clean.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io
tmpdir

qcheck()
{
    $QEMU_IMG check "$1" >check.out 2>&1 ||
        { cat check.out; fail "qemu-img check $1"; }
    grep -q "No errors were found" check.out || { cat check.out; fail "$1"; }
    "$VDISK" check "$1" >/dev/null || fail "vdisk check $1"
}

# Lists without the date column (the tools stamp different times).
list_of()
{
    "$1" snapshot -l "$2" | awk '{ print $1, $2, $3, $4, $7, $8 }'
}

for opts in "compat=1.1" "compat=0.10" "cluster_size=512" \
            "cluster_size=2M" "extended_l2=on" "refcount_bits=64"; do
    rm -f a.qcow2
    $QEMU_IMG create -f qcow2 -o "$opts" a.qcow2 16M >/dev/null

    # vdisk creates, qemu-img reads and reverts.
    $QEMU_IO -c 'write -P 1 0 3M' -c 'write -c -P 7 8M 2M' a.qcow2 >/dev/null
    "$VDISK" snapshot -c first a.qcow2
    $QEMU_IO -c 'write -P 2 1M 1M' -c 'write -z 8M 64k' a.qcow2 >/dev/null
    "$VDISK" snapshot -c second a.qcow2
    $QEMU_IO -c 'discard 0 4M' -c 'write -P 3 12M 1M' a.qcow2 >/dev/null
    qcheck a.qcow2
    diff <(list_of "$QEMU_IMG" a.qcow2) <(list_of "$VDISK" a.qcow2) ||
        fail "$opts: lists differ"
    $QEMU_IMG snapshot -l a.qcow2 | grep -q '^1  *first ' || fail "$opts: id 1"
    $QEMU_IMG snapshot -l a.qcow2 | grep -q '^2  *second ' || fail "$opts: id 2"
    $QEMU_IMG info --output=json a.qcow2 >q.json
    "$VDISK" info --output=json a.qcow2 >v.json
    json_equal_filtered q.json v.json filename actual-size

    cp a.qcow2 b.qcow2
    $QEMU_IMG snapshot -a first b.qcow2
    $QEMU_IO -c 'read -P 1 0 3M' -c 'read -P 7 8M 2M' -c 'read -P 0 12M 1M' \
        b.qcow2 | grep -q "^read 1048576/" || fail "$opts: first via qemu"
    qcheck b.qcow2

    # vdisk applies, qemu-io reads.
    cp a.qcow2 c.qcow2
    "$VDISK" snapshot -a second c.qcow2
    $QEMU_IO -c 'read -P 1 0 1M' -c 'read -P 2 1M 1M' -c 'read -P 1 2M 1M' \
        -c 'read -P 0 8M 64k' -c 'read -P 7 9M 1M' c.qcow2 >io.out ||
        fail "$opts: second via vdisk"
    [ "$(grep -c '^read' io.out)" = 5 ] || fail "$opts: second content"
    qcheck c.qcow2
    "$VDISK" snapshot -a 1 c.qcow2
    $QEMU_IO -c 'read -P 1 0 3M' c.qcow2 | grep -q '^read' ||
        fail "$opts: apply by id"

    # qemu-img creates; vdisk reads the snapshot without applying it.
    $QEMU_IMG snapshot -c third a.qcow2
    $QEMU_IO -c 'write -P 9 0 16M' a.qcow2 >/dev/null
    $QEMU_IMG convert -O raw -l third a.qcow2 q.raw
    "$VDISK" convert -O raw -l third a.qcow2 v.raw
    cmp q.raw v.raw || fail "$opts: convert -l third"
    "$VDISK" convert -O raw -l snapshot.id=2,snapshot.name=second a.qcow2 v.raw
    $QEMU_IMG convert -O raw -l snapshot.id=2 a.qcow2 q.raw
    cmp q.raw v.raw || fail "$opts: convert -l snapshot.id=2"
    "$VDISK" io -l first -c 'read -P 1 0 3M' a.qcow2 | grep -q '^read' ||
        fail "$opts: io -l"

    # vdisk deletes what qemu-img made, and the rest; nothing leaks.
    "$VDISK" snapshot -d third a.qcow2
    qcheck a.qcow2
    "$VDISK" snapshot -d first a.qcow2
    $QEMU_IMG snapshot -l a.qcow2 | grep -q first && fail "$opts: not deleted"
    qcheck a.qcow2
    "$VDISK" snapshot -d second a.qcow2
    [ -z "$($QEMU_IMG snapshot -l a.qcow2)" ] || fail "$opts: list not empty"
    $QEMU_IO -c 'read -P 9 0 16M' a.qcow2 | grep -q '^read' ||
        fail "$opts: active content changed by deletes"
    qcheck a.qcow2
    # Ids continue as qemu-img numbers them: one past the largest.
    "$VDISK" snapshot -c x a.qcow2
    $QEMU_IMG snapshot -c y a.qcow2
    "$VDISK" snapshot -c z a.qcow2
    [ "$($QEMU_IMG snapshot -l a.qcow2 | awk 'NR > 2 { printf "%s%s ", $1, $2 }')" \
        = "1x 2y 3z " ] || fail "$opts: ids"
    qcheck a.qcow2
done

# A v3 image resized after a snapshot: apply restores the old size.
$QEMU_IMG create -f qcow2 r.qcow2 8M >/dev/null
"$VDISK" snapshot -c small r.qcow2
"$VDISK" resize r.qcow2 32M >/dev/null
$QEMU_IO -c 'write -P 4 20M 1M' r.qcow2 >/dev/null
"$VDISK" snapshot -a small r.qcow2
[ "$($QEMU_IMG info --output=json r.qcow2 | grep '"virtual-size"')" = \
  '    "virtual-size": 8388608,' ] || fail "size not restored"
qcheck r.qcow2
