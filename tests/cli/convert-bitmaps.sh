#!/usr/bin/env bash
# vdisk convert --bitmaps [--skip-broken-bitmaps] against qemu-img convert on
# twin inputs: the same exit status and messages, the same bitmaps in the
# target (qemu-img info --output=json: names, flags, granularities, in
# qemu-img's order) with the same contents (qemu-storage-daemon's sha256),
# qemu-img check clean; and every refusal (no --bitmaps, several sources,
# a source or target format without bitmaps, an inconsistent bitmap, a
# name the target already has) with qemu-img's words.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-storage-daemon python3
source "$(dirname "$0")/qmp-functions.bash"
tmpdir
qmp_lib

"$QEMU_IMG" create -q -f qcow2 src.qcow2 32M
"$QEMU_IMG" bitmap --add src.qcow2 first
"$QEMU_IMG" bitmap --add -g 512 src.qcow2 fine
"$QEMU_IMG" bitmap --add -g 1M src.qcow2 coarse
qemu-io -c 'write -P 1 1M 64k' -c 'write -P 2 7000k 1k' -c 'write -z 20M 3M' \
    src.qcow2 >/dev/null
"$QEMU_IMG" bitmap --disable src.qcow2 fine
qemu-io -c 'write -P 3 30M 4k' src.qcow2 >/dev/null
"$QEMU_IMG" create -q -f raw src.raw 32M
cp src.qcow2 broken.qcow2
qemu-io -c 'write 2M 4k' -c 'sigraise 9' broken.qcow2 >/dev/null 2>&1 || true
"$QEMU_IMG" info broken.qcow2 | grep -q in-use || fail "could not make an inconsistent bitmap"
"$QEMU_IMG" create -q -f qcow2 existing.qcow2 32M
"$QEMU_IMG" bitmap --add existing.qcow2 coarse

bitmaps_of() {
    python3 -c '
import json, sys
from qmplib import bitmap_digests
info = json.load(open(sys.argv[1]))
print(info["format-specific"]["data"].get("bitmaps"))
print(bitmap_digests(sys.argv[2])[0])' "$1" "$2"
}

n=0
# Each case: arguments (OUT is the target's name), then whether it must
# succeed.
while IFS='|' read -r args ok; do
    [ -n "$args" ] || continue
    n=$((n + 1))
    for who in qemu vdisk; do
        rm -rf "$who" && mkdir "$who"
        cp existing.qcow2 "$who/existing.qcow2"
        a=${args//OUT/$who\/out}
        a=${a//EXISTING/$who\/existing.qcow2}
        rc=0
        if [ $who = qemu ]; then
            "$QEMU_IMG" convert $a >"$who.out" 2>&1 || rc=$?
            sed -i 's/^qemu-img: //' "$who.out"
        else
            "$VDISK" convert $a >"$who.out" 2>&1 || rc=$?
            sed -i 's/^vdisk: //' "$who.out"
        fi
        echo "status $rc" >>"$who.out"
        sed -i "s|$who/|W/|g" "$who.out"
        for t in "$who/out" "$who/existing.qcow2"; do
            [ -f "$t" ] || continue
            echo "== $(basename "$t") exists" >>"$who.out"
            if "$QEMU_IMG" info --output=json "$t" >"$who.info" 2>/dev/null &&
               grep -q '"format": "qcow2"' "$who.info"; then
                bitmaps_of "$who.info" "$t" >>"$who.out"
                "$QEMU_IMG" check -q "$t" || echo "check failed" >>"$who.out"
                "$QEMU_IMG" compare -q src.qcow2 "$t" 2>/dev/null ||
                    echo "data differs" >>"$who.out"
            fi
        done
    done
    diff -u qemu.out vdisk.out || fail "convert $args: vdisk differs from qemu-img"
    if [ "$ok" = ok ]; then
        grep -q "status 0" vdisk.out || fail "convert $args failed"
    else
        grep -q "status 0" vdisk.out && fail "convert $args succeeded"
    fi
done <<'EOF'
--bitmaps -O qcow2 src.qcow2 OUT|ok
--bitmaps -O qcow2 -o cluster_size=4k src.qcow2 OUT|ok
--bitmaps -c -O qcow2 src.qcow2 OUT|ok
--bitmaps --skip-broken-bitmaps -O qcow2 src.qcow2 OUT|ok
--skip-broken-bitmaps -O qcow2 src.qcow2 OUT|fail
--bitmaps -O raw src.qcow2 OUT|fail
--bitmaps -O qcow2 src.qcow2 src.qcow2 OUT|fail
--bitmaps -O qcow2 -f raw src.raw OUT|fail
--bitmaps -O qcow2 broken.qcow2 OUT|fail
--bitmaps --skip-broken-bitmaps -O qcow2 broken.qcow2 OUT|ok
--bitmaps -n -O qcow2 src.qcow2 EXISTING|fail
-O qcow2 src.qcow2 OUT|ok
EOF
# Not vacuous: the first case copied bitmaps with dirty bits.
"$VDISK" convert --bitmaps -O qcow2 src.qcow2 last.qcow2
bitmaps_of <("$QEMU_IMG" info --output=json last.qcow2) last.qcow2 >last.out
grep -q "coarse" last.out || fail "no bitmaps copied"
bitmaps_of <("$QEMU_IMG" info --output=json src.qcow2) src.qcow2 >src.out
diff -u src.out last.out || fail "the copied bitmaps differ from the source's"
echo "convert --bitmaps: $n cases as qemu-img"
