#!/usr/bin/env bash
# The help listings: --object TYPE,help (each class's settable properties)
# on every tool is QEMU's text to the byte; --object help lists vdisk's
# classes in QEMU's form, all of them QEMU's, and QEMU's other types are
# refused by name; -o help / -o ? of create, convert, amend and measure
# are qemu-img's.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-nbd qemu-storage-daemon timeout
tmpdir

T="timeout 30"
$QEMU_IMG create -q -f qcow2 img.qcow2 1M

# The classes vdisk has, from its own listing.
$T "$VDISK" info --object help > v-list.txt
head -n 1 v-list.txt > v-head.txt
echo "List of user creatable objects:" > q-head.txt
diff q-head.txt v-head.txt || fail "--object help: wrong header"
tail -n +2 v-list.txt | sed 's/^  //' > v-types.txt
sort -c v-types.txt || fail "--object help: not sorted"
[ "$(wc -l < v-types.txt)" -ge 6 ] || fail "--object help lists too little"

# Every tool, every way of asking: exit 0 and QEMU's text.
compare_help()
{
    local what=$1 q=$2 v=$3
    [ -s "$q" ] || fail "$what: QEMU printed nothing"
    diff "$q" "$v" || fail "$what: listing differs from QEMU's"
}

while read -r type; do
    for form in "$type,help" "$type,id=x,help" "$type,?" "help,qom-type=$type"; do
        for cmd in info create check convert measure; do
            $T $QEMU_IMG "$cmd" --object "$form" > q.txt
            $T "$VDISK" "$cmd" --object "$form" > v.txt
            compare_help "qemu-img $cmd --object $form" q.txt v.txt
        done
    done
    $T $QEMU_IO --object "$type,help" > q.txt
    $T "$VDISK" io --object "$type,help" > v.txt
    compare_help "qemu-io --object $type,help" q.txt v.txt
    $T qemu-nbd --object "$type,help" > q.txt
    $T "$VDISK" serve --object "$type,help" > v.txt
    compare_help "qemu-nbd --object $type,help" q.txt v.txt
    $T qemu-storage-daemon --object "$type,help" > q.txt
    $T "$VDISK" serve --blockdev driver=null-co,node-name=n \
        --object "$type,help" > v.txt
    compare_help "qemu-storage-daemon --object $type,help" q.txt v.txt
done < v-types.txt

# The list: QEMU's header, vdisk's classes (each one QEMU's), in every
# tool and for "?" and an unknown class too.
for prog in "$QEMU_IMG info" "$QEMU_IO" qemu-nbd qemu-storage-daemon; do
    $T $prog --object help > q.txt
    tail -n +2 q.txt | sed 's/^  //' > q-types.txt
    while read -r type; do
        grep -qx "$type" q-types.txt || fail "$prog does not know $type"
    done < v-types.txt
done
for arg in help "?" "nosuch,help" "help,id=x"; do
    for v in "info" "io" "serve"; do
        $T "$VDISK" $v --object "$arg" > v.txt
        diff v-list.txt v.txt || fail "vdisk $v --object $arg: wrong list"
    done
done

# QEMU's other types are refused by name, or as QEMU refuses a name it
# does not know (its list shows class names, its qom-type enum others).
$T $QEMU_IMG info --object help | tail -n +2 | sed 's/^  //' > q-types.txt
while read -r type; do
    grep -qx "$type" v-types.txt && continue
    expect_status 1 "$VDISK" info --object "$type,id=x" img.qcow2 2> v.err
    if ! grep -q "object type '$type' is not supported by vdisk" v.err; then
        st=0
        $T $QEMU_IMG info --object "$type,id=x" img.qcow2 2> q.err || st=$?
        [ "$st" = 1 ] && diff <(sed 's/^[a-z-]*: //' q.err) \
                              <(sed 's/^[a-z-]*: //' v.err) ||
            fail "$type: $(cat v.err)"
    fi
done < q-types.txt

# -o help and -o ? of the commands that take creation options.
for fmt in qcow2 raw; do
    for o in help "?" "cluster_size=4k,help"; do
        for args in "create -f $fmt -o $o" "create -f $fmt -o $o x.img" \
                    "convert -O $fmt -o $o img.qcow2 out.img" \
                    "amend -f $fmt -o $o" "measure -O $fmt -o $o img.qcow2"; do
            qs=0 vs=0
            # shellcheck disable=SC2086
            $T $QEMU_IMG $args > q.txt 2> q.err || qs=$?
            # shellcheck disable=SC2086
            $T "$VDISK" $args > v.txt 2> v.err || vs=$?
            [ "$qs" = "$vs" ] || fail "$args: exit $vs, qemu-img $qs"
            diff q.txt v.txt || fail "$args: listing differs"
            diff <(sed 's/^[a-z-]*: //' q.err) <(sed 's/^[a-z-]*: //' v.err) ||
                fail "$args: messages differ"
        done
    done
done
[ ! -e x.img ] && [ ! -e out.img ] || fail "-o help created an image"

# qemu-storage-daemon's other options have no help, in its words; its
# --chardev help lists backends (vdisk has one, which QEMU lists too).
for a in "--blockdev help" "--blockdev driver=qcow2,help" "--export help" \
         "--nbd-server help" "--monitor help" "--export type=nbd,?"; do
    qs=0 vs=0
    # shellcheck disable=SC2086
    $T qemu-storage-daemon $a > q.txt 2> q.err || qs=$?
    # shellcheck disable=SC2086
    $T "$VDISK" serve $a > v.txt 2> v.err || vs=$?
    [ "$qs" = 1 ] && [ "$vs" = 1 ] || fail "$a: exit $vs, qemu $qs"
    diff <(sed 's/^qemu-storage-daemon: //' q.err) \
         <(sed 's/^vdisk serve: //' v.err) || fail "$a: message differs"
done
$T qemu-storage-daemon --chardev help > q.txt
$T "$VDISK" serve --chardev help > v.txt
diff <(head -n 1 q.txt) <(head -n 1 v.txt) || fail "--chardev help header"
tail -n +2 v.txt | while read -r b; do
    grep -qx "  $b" q.txt || fail "--chardev help lists $b"
done
