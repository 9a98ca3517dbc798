#!/usr/bin/env bash
# qcow2 interop matrix against QEMU 7.2: for every combination of version,
# cluster size, refcount width, compression, extended L2 and external data
# file that qemu-img accepts, (1) an image written by qemu-io reads back
# identically through vdisk, and (2) an image written by `vdisk io` with
# the same script, and (3) images made by `vdisk convert` (with -c where
# compression applies) pass `qemu-img check` with no errors and no leaks
# and `qemu-img compare` equal to qemu's reading of (1).
#
# One fixed write script per combination keeps the runtime bounded: it is
# scaled by the cluster size so that it always crosses cluster boundaries,
# zeroes part of a data cluster, unmaps whole and half clusters, discards
# a cluster and reallocates into it, writes compressed clusters and
# overwrites part of one (copy-on-write out of a compressed cluster) and
# writes the short last cluster. Combinations run two at a time; each
# logs to its own file, printed when it fails.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io cmp
tmpdir

# script CLUSTER SIZE COMPRESS: the qemu-io commands, one per line.
script()
{
    local c=$1 size=$2 comp=$3
    echo "write -P 0xa1 0 4096"
    echo "write -P 0xa2 $((c + 512)) $((c + 1024))"
    echo "write -P 0xa3 $((size / 2 - 3000)) 7000"
    echo "write -z $((c + 1024)) 1024"
    echo "write -P 0xa7 $((2 * c)) $((2 * c))"
    echo "write -z -u $((2 * c)) $c"
    echo "write -z -u $((3 * c + c / 2)) $((c / 2))"
    echo "write -z $((3 * c)) 512"
    echo "discard 0 $c"
    echo "write -P 0xa8 512 512"
    # QEMU refuses (EIO) compressed writes over allocated clusters, so
    # these go where nothing was written before.
    local ca=$((4 * c))
    if [ "$ca" -lt 8192 ]; then
        ca=8192
    fi
    if [ "$comp" = 1 ]; then
        echo "write -c -P 0xa9 $ca $c"
        echo "write -c -P 0xa4 $((ca + c)) $c"
        echo "write -P 0xa5 $((ca + c + c / 2)) $((c / 4))"
    else
        echo "write -P 0xa9 $ca $c"
    fi
    echo "write -P 0xa6 $((size - 1536)) 1536"
}

# qemu_io_args FILE: turns a script file into -c arguments in ARGS.
load_args()
{
    ARGS=()
    local line
    while IFS= read -r line; do
        ARGS+=(-c "$line")
    done <"$1"
}

# check_clean IMG: qemu-img check must report neither errors nor leaks.
check_clean()
{
    local out st=0
    out=$("$QEMU_IMG" check -f qcow2 "$1" 2>&1) || st=$?
    if [ "$st" != 0 ]; then
        echo "$out"
        fail "qemu-img check $1 exited $st"
    fi
}

# combo NAME OPTS CLUSTER COMPRESS DATAFILE: runs in its own directory.
combo()
{
    local name=$1 opts=$2 c=$3 comp=$4 df=$5
    local size=$((4 * 1024 * 1024))
    if [ $((6 * c)) -gt $size ]; then
        size=$((6 * c))
    fi
    size=$((size + 1536))
    mkdir "$name" && cd "$name"

    local qopts=$opts vopts=$opts copts=$opts
    if [ "$df" = 1 ]; then
        qopts+=",data_file=q.data"
        vopts+=",data_file=v.data"
        copts+=",data_file=c.data"
    fi
    if ! "$QEMU_IMG" create -q -f qcow2 -o "$qopts" q.qcow2 "$size" \
        >create.err 2>&1; then
        echo skipped >status
        return 0
    fi
    script "$c" "$size" "$comp" >script.txt
    load_args script.txt

    # 1. qemu writes, vdisk reads.
    "$QEMU_IO" -f qcow2 "${ARGS[@]}" q.qcow2 >qio.out 2>&1
    if grep -i 'fail\|error' qio.out; then
        fail "$name: qemu-io could not run the script"
    fi
    "$QEMU_IMG" convert -f qcow2 -O raw q.qcow2 ref.raw
    "$VDISK" convert -f qcow2 -O raw q.qcow2 v.raw
    cmp ref.raw v.raw || fail "$name: vdisk reads qemu's image differently"

    # 2. vdisk writes with the same script, qemu reads and checks.
    "$VDISK" create -q -f qcow2 -o "$vopts" v.qcow2 "$size"
    "$VDISK" io -f qcow2 "${ARGS[@]}" v.qcow2 >vio.out 2>&1
    if grep -i 'fail\|error' vio.out; then
        fail "$name: vdisk io could not run the script"
    fi
    check_clean v.qcow2
    assert_same_content -f raw -F qcow2 ref.raw v.qcow2

    # 3. vdisk convert, plain and compressed.
    "$VDISK" convert -f raw -O qcow2 -o "$copts" ref.raw c.qcow2
    check_clean c.qcow2
    assert_same_content -f raw -F qcow2 ref.raw c.qcow2
    if [ "$comp" = 1 ]; then
        rm -f c.qcow2 c.data
        "$VDISK" convert -c -f raw -O qcow2 -o "$copts" ref.raw c.qcow2
        check_clean c.qcow2
        assert_same_content -f raw -F qcow2 ref.raw c.qcow2
    fi
    echo ok >status
    cd ..
    rm -rf "$name"
}

# The combinations, as NAME OPTS CLUSTER COMPRESS DATAFILE lines.
combos()
{
    local compat cs rc comp el2 df opts n
    for compat in 0.10 1.1; do
    for cs in 512 4096 65536 2097152; do
    for rc in 1 16 64; do
    for comp in none zlib zstd; do
    for el2 in off on; do
    for df in 0 1; do
        opts="compat=$compat,cluster_size=$cs,refcount_bits=$rc"
        opts+=",extended_l2=$el2"
        if [ "$comp" != none ]; then
            opts+=",compression_type=$comp"
        fi
        # data_file_raw=on is exercised on one refcount width.
        if [ "$df" = 1 ] && [ "$rc" = 64 ]; then
            opts+=",data_file_raw=on"
        fi
        n="v$compat-c$cs-r$rc-$comp-x$el2-d$df"
        # QEMU cannot write compressed clusters to an external data file.
        local cflag=0
        if [ "$comp" != none ] && [ "$df" = 0 ]; then
            cflag=1
        fi
        echo "$n $opts $cs $cflag $df"
    done; done; done; done; done; done
}

combos >list
running=0
# Run up to two combinations at a time (the machine has two cores).
while read -r n o c comp df; do
    {
        if ! ( { set +x; } 2>/dev/null; combo "$n" "$o" "$c" "$comp" "$df" ) \
            >"$n.log" 2>&1; then
            echo "$n" >>failed
        fi
    } &
    running=$((running + 1))
    if [ "$running" -ge 2 ]; then
        wait -n || true
        running=$((running - 1))
    fi
done <list
wait

total=$(wc -l <list)
skipped=$(cat */status 2>/dev/null | grep -c skipped || true)
echo "combinations: $total, skipped by qemu-img: $skipped"
if [ -s failed ]; then
    while read -r n; do
        echo "==== $n"
        tail -n 30 "$n.log"
        cat "$n/create.err" 2>/dev/null || true
    done <failed
    fail "$(wc -l <failed) combination(s) failed"
fi
ran=$((total - skipped))
[ "$ran" -gt 50 ] || fail "only $ran combinations ran"
