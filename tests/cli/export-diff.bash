# Helpers of export-diff.sh and export-diff-rbd.sh (sourced after
# functions.sh): image states as sha256 of what qemu-img reads, and
# random guest activity.

sum() { sha256sum < "$1" | cut -d' ' -f1; }
# state IMAGE [SNAP]: sha256 of the raw bytes qemu-img reads.
state()
{
    rm -f st.raw
    if [ -n "${2:-}" ]; then
        $QEMU_IMG convert -O raw -l "snapshot.name=$2" "$1" st.raw
    else
        $QEMU_IMG convert -O raw "$1" st.raw
    fi
    sum st.raw
}
has_snap() { $QEMU_IMG snapshot -l "$1" | awk 'NR > 2 { print $2 }' | grep -qx "$2"; }

# random_ops IMAGE SIZE N: N random writes, zero writes and discards.
random_ops()
{
    local img=$1 size=$2 n=$3 args=() i op off len
    for ((i = 0; i < n; i++)); do
        off=$(( (RANDOM * 32768 + RANDOM) % (size / 512) * 512 ))
        len=$(( (RANDOM % 256 + 1) * 512 ))
        [ $((off + len)) -le "$size" ] || len=$((size - off))
        op=$((RANDOM % 4))
        case $op in
        0|1) args+=(-c "write -P $((RANDOM % 255 + 1)) $off $len") ;;
        2) args+=(-c "write -z $off $len") ;;
        3) args+=(-c "discard $off $len") ;;
        esac
    done
    $QEMU_IO "${args[@]}" "$img" > /dev/null
}
