#!/usr/bin/env bash
# Damaged qcow2 images (generated here from qemu-img images: each metadata
# structure pointing past the file, into the header or into another
# table; zeroed and saturated refcounts; a zeroed refcount block;
# overlapping tables; misaligned and contradictory L2 entries; compressed
# descriptors past the end; damaged bitmaps extensions) through every
# writing command, vdisk on one copy and qemu-img/qemu-io on another:
# vdisk refuses wherever qemu refuses (exit 1, the file named, the file
# byte-identical, or with only the corrupt bit set where QEMU set it too),
# never crashes, hangs or grows the file past the bound of docs/qcow2.md,
# refuses healthy images nothing qemu does, and where it succeeds its
# result reads back and checks no worse than qemu's.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/qcow2-damage-functions.bash"
requires qemu-img qemu-io python3 timeout cmp
# Hundreds of short runs, each flushing a few times: keep the scratch
# files (about 30 MB at a time) in memory where the machine has room for
# them; nothing here needs to survive a crash.
if [ -z "${TMPDIR:-}" ] && [ -d /dev/shm ] && [ -w /dev/shm ] &&
   [ "$(df -Pk /dev/shm | awk 'NR == 2 { print $4 }')" -gt 262144 ]; then
    export TMPDIR=/dev/shm
fi
tmpdir

damage_bases

# The corpus: name=base:damage. main.qcow2 takes the structural damages,
# ext.qcow2 the extended-L2 entries, bm.qcow2 the bitmaps extension.
cases=()
for d in none rt-unal rt-l1 rt-far rb-zero rc-hdr rc-l1 rc-l2 rc-sntab \
         l1-unal l1-rt l1-l1 l1-far l1-snl1 l2-unal l2-rt l2-self l2-far \
         l2-dup comp-far comp-long hdr-l1-rt sn-eof snl1-l1 snl1-far; do
    cases+=("main-$d=main.qcow2:$d")
done
for d in none ext-nohost ext-both; do
    cases+=("ext-$d=ext.qcow2:$d")
done
for d in none bm-nb-huge bm-nb-zero bm-nb-more bm-reserved bm-dir-unal \
         bm-dir-huge bm-dir-zero bm-dir-eof bm-tsize0 bm-tsize2 bm-flags \
         bm-name-long bm-extra bm-dupname bm-entry-res bm-inuse-bad; do
    cases+=("bm-$d=bm.qcow2:$d")
done
mkdir imgs

# NAME|COMMAND: @ is the image; IO commands run through qemu-io/vdisk io.
writing=(
    "snap-c|snapshot -c new @"
    "snap-a|snapshot -a s1 @"
    "snap-d|snapshot -d s1 @"
    "commit|commit @"
    "rebase-u|rebase -u -b new.qcow2 -F qcow2 @"
    "rebase|rebase -b new.qcow2 -F qcow2 @"
    "amend-v2|amend -o compat=0.10 @"
    "grow|resize @ +1M"
    "shrink|resize --shrink @ 2M"
    "check-r|check -r all @"
    "write|IO write -P 0x55 0 192k"
    "wzero|IO write -z 64k 64k"
    "discard|IO discard 0 1M"
)
# qemu-img's refcount width change takes 1.5 s: a few images only.
amend_rc="main-none main-rb-zero main-hdr-rt-l1 main-l2-far"
# A damaged bitmaps extension fails the open: the commands of the report.
opening=(
    "info|info @"
    "convert|convert -O raw @ out.raw"
    "snap-c|snapshot -c new @"
    "write|IO write -P 0x55 0 64k"
)

# Bound (docs/qcow2.md): no command grows the file by more than the data
# it writes plus its metadata; here at most the virtual size + 2 MiB.
bound=$(( 6 << 20 ))

# corrupt_bit_only ORIG COPY: COPY is ORIG with the corrupt bit set.
corrupt_bit_only()
{
    python3 - "$1" "$2" <<'EOF'
import struct, sys
o, v = (open(f, "rb").read() for f in sys.argv[1:])
def clear(d):
    return d[:72] + struct.pack(">Q", struct.unpack(">Q", d[72:80])[0] & ~2) \
        + d[80:]
sys.exit(0 if len(o) == len(v) and clear(v) == clear(o) and
         struct.unpack(">Q", v[72:80])[0] & 2 else 1)
EOF
}

corrupt_bit()    # FILE: is the corrupt bit set?
{
    [ "$(od -An -tx1 -j79 -N1 "$1" | tr -d ' ')" != 00 ] &&
        (( 0x$(od -An -tx1 -j79 -N1 "$1" | tr -d ' ') & 2 ))
}

corruptions()    # FILE: qemu-img check's count, or X when it cannot check
{
    local json
    json=$($QEMU_IMG check --output=json "$1" 2>/dev/null) || true
    if [ -z "$json" ] ||
       { [[ $json =~ \"check-errors\":\ ([0-9]+) ]] &&
         [ "${BASH_REMATCH[1]}" != 0 ]; }; then
        echo X
    elif [[ $json =~ \"corruptions\":\ ([0-9]+) ]]; then
        echo "${BASH_REMATCH[1]}"
    else
        echo 0
    fi
}

# worse V Q: vdisk's count V is worse than qemu's Q (X: check fails).
worse()
{
    [ "$2" != X ] && { [ "$1" = X ] || [ "$1" -gt "$2" ]; }
}

failures=0
bad()
{
    echo "BAD: $case $name: $*"
    echo "  qemu: $(tail -n 2 q/err | tr '\n' '|')"
    echo "  vdisk: $(tail -n 2 v/err | tr '\n' '|')"
    failures=$((failures + 1))
}

# run_pair NAME COMMAND: the command on a fresh copy each.
run_pair()
{
    local name=$1 cmd=$2 args qrc vrc size same=0 last_q last_v
    rm -rf q v
    mkdir q v
    for t in q v; do
        cp "$img" $t/img.qcow2
        ln -s ../new.qcow2 $t/new.qcow2
        if [ "$name" = commit ]; then
            cp back.qcow2 $t/back.qcow2
        else
            ln -s ../back.qcow2 $t/back.qcow2
        fi
    done
    args=${cmd//@/img.qcow2}
    # qemu in the background, vdisk meanwhile: separate copies.
    if [ "${cmd%% *}" = IO ]; then
        ( cd q; r=0; $QEMU_IO -c "${args#IO }" img.qcow2 >out 2>err || r=$?
          echo $r > rc ) &
        vrc=0
        ( cd v && timeout 20 "$VDISK" io -c "${args#IO }" img.qcow2 \
          >out 2>err ) || vrc=$?
    else
        # shellcheck disable=SC2086
        ( cd q; r=0; $QEMU_IMG $args >out 2>err || r=$?; echo $r > rc ) &
        vrc=0
        # shellcheck disable=SC2086
        ( cd v && timeout 20 "$VDISK" $args >out 2>err ) || vrc=$?
    fi
    wait
    qrc=$(cat q/rc)
    cmp -s "$img" v/img.qcow2 && same=1
    size=$(size_of v/img.qcow2)

    case $vrc in
    86) bad "sanitizer report"; return ;;
    124) bad "timeout"; return ;;
    esac
    if [ "$size" -gt $(( $(size_of "$img") + bound )) ]; then
        bad "file grew to $size bytes"
    fi
    if [ "$name" = check-r ] || [ "$name" = check ]; then
        [ "$vrc" -le 3 ] || bad "check exit $vrc"
        [ "$qrc" != 1 ] || [ "$vrc" = 1 ] || [ "$name" = check-r ] ||
            bad "qemu-img check could not run, vdisk check did"
        # Repairs compared where the two checkers agree on the diagnosis.
        if [ "$name" = check-r ] && [ "$qrc" != 1 ] &&
           [ "$check_q" = "$check_v" ]; then
            local qc vc
            qc=$(corruptions q/img.qcow2)
            vc=$(corruptions v/img.qcow2)
            if worse "$vc" "$qc"; then
                bad "after check -r: $vc corruptions, qemu's copy $qc"
            fi
        fi
        return
    fi
    [ "$vrc" = 0 ] || [ "$vrc" = 1 ] || { bad "exit $vrc"; return; }
    if [ "$vrc" = 1 ]; then
        # A refusal: the file untouched, marked corrupt as qemu did, or
        # byte for byte as qemu-img left it (a writable open of an image
        # with bitmaps marks them in use and stores them back at close,
        # in both, also when the command is then refused).
        if [ "$same" = 0 ] &&
           ! { corrupt_bit q/img.qcow2 &&
               corrupt_bit_only "$img" v/img.qcow2; } &&
           ! cmp -s q/img.qcow2 v/img.qcow2; then
            bad "refused but changed the file"
        fi
        last_q=$(tail -n 1 q/err | sed 's/^qemu-img: //')
        last_v=$(tail -n 1 v/err | sed 's/^vdisk: //')
        grep -q "img.qcow2" v/err || [ "$last_q" = "$last_v" ] ||
            bad "the error names neither the file nor what qemu names"
        if [ "$qrc" = 0 ] && [ "$check_q" = 0 ]; then
            bad "refused a command qemu runs on an image qemu-img check" \
                "finds clean"
        fi
        return
    fi
    [ "$qrc" = 0 ] || { bad "succeeded where qemu refused"; return; }
    case $name in info|convert) return ;; esac
    # Both succeeded: readable where qemu's copy is, and no more
    # corruption than qemu's copy.
    if ! $QEMU_IMG convert -O raw v/img.qcow2 v/all.raw >/dev/null 2>&1 &&
       $QEMU_IMG convert -O raw q/img.qcow2 q/all.raw >/dev/null 2>&1; then
        bad "the result does not read back"
    fi
    rm -f q/all.raw v/all.raw
    local qc vc
    qc=$(corruptions q/img.qcow2)
    vc=$(corruptions v/img.qcow2)
    if worse "$vc" "$qc"; then
        bad "qemu-img check: $vc corruptions, qemu's copy $qc"
    fi
}

pairs=0
for c in "${cases[@]}"; do
    case=${c%%=*}
    img=imgs/$case.qcow2
    rm -f imgs/*.qcow2
    damage_make imgs "$c"
    # What the two checkers say about the original (0 clean, 2 corrupt).
    check_q=0; $QEMU_IMG check "$img" >/dev/null 2>&1 || check_q=$?
    check_v=0; "$VDISK" check "$img" >/dev/null 2>&1 || check_v=$?
    if [[ $case == bm-bm-* ]]; then
        cmds=("${opening[@]}")
    else
        cmds=("${writing[@]}")
        [[ " $amend_rc " != *" $case "* ]] ||
            cmds+=("amend-rc|amend -o refcount_bits=8 @")
    fi
    for m in "${cmds[@]}"; do
        run_pair "${m%%|*}" "${m#*|}"
        pairs=$((pairs + 1))
    done
done
echo "$pairs command pairs over ${#cases[@]} images, $failures failures"
[ "$failures" = 0 ] || fail "$failures of $pairs command pairs misbehaved"
