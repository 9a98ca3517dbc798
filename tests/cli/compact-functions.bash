# Helpers of tests/cli/compact.sh and compact-crash.sh: randomized qcow2
# images made with QEMU's tools (writes, discards, internal snapshots, a
# persistent bitmap that QEMU's writes fill, a backing file), and the
# views of an image saved and compared (the active layer through its
# backing file, every snapshot with qemu-img convert -l, the bitmaps as
# qemu-img info lists them and the extents they hold).

# qio IMG CMD...: qemu-io commands on IMG (output dropped).
qio()
{
    local img=$1 args=()
    shift
    for c in "$@"; do args+=(-c "$c"); done
    $QEMU_IO "${args[@]}" "$img" >/dev/null
}

# random_ops IMG CLUSTER N: N random writes and discards, cluster-sized
# pieces at random places of a 16 MiB disk (some compressed when
# COMPRESS=1).
random_ops()
{
    local img=$1 cs=$2 n=$3 cmds=() i off len
    local nclu=$((16 * 1024 * 1024 / cs))
    for ((i = 0; i < n; i++)); do
        off=$((RANDOM % nclu * cs))
        len=$(((RANDOM % 8 + 1) * cs))
        if ((off + len > 16 * 1024 * 1024)); then len=$((16 * 1024 * 1024 - off)); fi
        case $((RANDOM % 5)) in
        0|1) cmds+=("write -P $((RANDOM % 250 + 1)) $off $len") ;;
        2) cmds+=("write -P $((RANDOM % 250 + 1)) $((off + 512)) 1024") ;;
        3) cmds+=("discard $off $len") ;;
        4) if [ "${COMPRESS:-0}" = 1 ]; then
               cmds+=("discard $off $cs" "write -c -P $((RANDOM % 250 + 1)) $off $cs")
           else
               cmds+=("write -z $off $cs")
           fi ;;
        esac
    done
    qio "$img" "${cmds[@]}"
}

# make_image IMG SEED CLUSTER [CREATE_OPTS]: a 16 MiB image over a
# backing file (IMG.base), three snapshots taken and one deleted, a
# persistent bitmap, writes and discards between them.
make_image()
{
    local img=$1 cs=$3 opts=${4:+,$4}
    RANDOM=$2
    $QEMU_IMG create -q -f qcow2 "$img.base" 16M
    qio "$img.base" "write -P 200 0 16M"
    $QEMU_IMG create -q -f qcow2 -b "$PWD/$img.base" -F qcow2 \
        -o cluster_size=$cs$opts "$img" 16M
    random_ops "$img" "$cs" 30
    $QEMU_IMG bitmap --add -g $((cs * 2)) "$img" bm0
    $QEMU_IMG snapshot -c s1 "$img"
    random_ops "$img" "$cs" 30
    $QEMU_IMG snapshot -c s2 "$img"
    random_ops "$img" "$cs" 30
    $QEMU_IMG snapshot -c s3 "$img"
    random_ops "$img" "$cs" 20
    $QEMU_IMG snapshot -d s2 "$img"
    random_ops "$img" "$cs" 10
}

# snapshots IMG: the names of IMG's internal snapshots.
snapshots()
{
    $QEMU_IMG snapshot -U -l "$1" | awk 'NR > 2 { print $2 }'
}

# bitmap_list IMG: the bitmaps qemu-img info lists (names, flags,
# granularities).
bitmap_list()
{
    $QEMU_IMG info -U "$1" | sed -n '/^    bitmaps:/,/^    refcount bits/p'
}

# save_views IMG DIR: what must not change, saved under DIR.
save_views()
{
    local img=$1 dir=$2 s
    mkdir -p "$dir"
    cp "$img" "$dir/image"
    for s in $(snapshots "$img"); do
        $QEMU_IMG convert -U -l "$s" -O raw "$img" "$dir/snap-$s"
    done
    bitmap_list "$img" > "$dir/bitmaps"
    $VDISK diff -U --bitmap bm0 --output=json "$img" > "$dir/bm0" 2>/dev/null ||
        echo none > "$dir/bm0"
}

# check_views IMG DIR: IMG reads as saved in DIR (active layer, every
# snapshot, the bitmaps and what they hold).
check_views()
{
    local img=$1 dir=$2 s
    assert_same_content "$dir/image" "$img"
    [ "$(snapshots "$img")" = "$(snapshots "$dir/image")" ] ||
        fail "$img: snapshot list changed"
    for s in $(snapshots "$img"); do
        $QEMU_IMG convert -U -l "$s" -O raw "$img" view.raw
        cmp -s view.raw "$dir/snap-$s" || fail "$img: snapshot $s changed"
    done
    bitmap_list "$img" > view.bitmaps
    cmp -s view.bitmaps "$dir/bitmaps" ||
        fail "$img: bitmaps changed: $(cat view.bitmaps) vs $(cat "$dir/bitmaps")"
    $VDISK diff -U --bitmap bm0 --output=json "$img" > view.bm0 2>/dev/null ||
        echo none > view.bm0
    cmp -s view.bm0 "$dir/bm0" || fail "$img: bitmap bm0 holds other extents"
}

# check_clean IMG [leaks-ok]: qemu-img check finds no corruption (and,
# without leaks-ok, no leak either).
check_clean()
{
    local st=0
    $QEMU_IMG check "$1" > check.out 2>&1 || st=$?
    if [ "$st" = 0 ]; then return 0; fi
    if [ "$st" = 3 ] && [ "${2:-}" = leaks-ok ] &&
       ! grep -q -i corrupt check.out; then
        return 0
    fi
    cat check.out >&2
    fail "qemu-img check $1: status $st"
}
