#!/usr/bin/env bash
# vdisk bitmap against qemu-img bitmap, on twin images: the same sequence
# of commands (every action, several in one call, merges from the image
# and from another file, every refusal) gives the same messages and exit
# statuses, and the same bitmaps afterwards: qemu-img info's list (names,
# flags, granularities, order) and qemu-storage-daemon's sha256 of each
# bitmap's contents, after writes by qemu-io recorded in between.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-storage-daemon python3
source "$(dirname "$0")/qmp-functions.bash"
tmpdir
qmp_lib

"$QEMU_IMG" create -q -f qcow2 other.qcow2 16M
"$QEMU_IMG" bitmap --add other.qcow2 o1
qemu-io -c 'write -P 7 3M 300k' other.qcow2 >/dev/null
"$QEMU_IMG" create -q -f raw r.raw 16M

# One command per line; IMG is the image under test. "io CMD" runs
# qemu-io on it (so enabled bitmaps record the writes).
script='--add IMG b
--add IMG b
--add -g 1000 IMG c
--add -g 1k IMG c
--add -g 0 IMG d
--add -g x IMG d
--add -g 4G IMG d
--add -g 256 IMG d
io write -P 1 1M 64k
io write -z 5M 1M
--remove IMG zz
--clear IMG zz
--enable --disable IMG b
io discard 9M 128k
--merge b IMG c
--merge zz IMG c
--merge o1 -b other.qcow2 IMG c
--merge o1 -b other.qcow2 -F qcow2 IMG d
--merge b -b other.qcow2 IMG c
IMG b
--add IMG
-g 4k --remove IMG b
-F qcow2 --add IMG x
-b other.qcow2 --add IMG x
--add -f raw r.raw b
--add nonexist.qcow2 d
--add --remove IMG e
--add --disable IMG f
--clear --enable IMG b
--remove --remove IMG d
io write -P 2 12M 8k
--add IMG d'

for who in qemu vdisk; do
    "$QEMU_IMG" create -q -f qcow2 $who.qcow2 16M
    while IFS= read -r line; do
        line=${line//IMG/$who.qcow2}
        echo "## ${line//$who.qcow2/IMG}"
        rc=0
        case "$line" in
        io\ *) qemu-io -c "${line#io }" $who.qcow2 >/dev/null || rc=$? ;;
        *) if [ $who = qemu ]; then
               "$QEMU_IMG" bitmap $line 2>&1 || rc=$?
           else
               "$VDISK" bitmap $line 2>&1 || rc=$?
           fi ;;
        esac
        echo "status $rc"
    done <<<"$script" >$who.log
    sed -i "s/^qemu-img: //; s/^vdisk: //; s/$who\.qcow2/IMG/g; s/#block[0-9]*/#block/" $who.log
    python3 -c '
import json, subprocess, sys
from qmplib import bitmap_digests
info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", sys.argv[1]],
                                 capture_output=True, text=True, check=True).stdout)
print(info["format-specific"]["data"].get("bitmaps"))
print(bitmap_digests(sys.argv[1])[0])' $who.qcow2 >>$who.log
    "$QEMU_IMG" check -q $who.qcow2 || fail "$who: check fails"
done
diff -u qemu.log vdisk.log || fail "vdisk bitmap differs from qemu-img bitmap"
# Not vacuous: the commands did things.
[ "$(grep -c 'status 0' vdisk.log)" -ge 15 ] || fail "too few commands succeeded"
grep -q "'name': 'c', 'granularity': 1024" vdisk.log || fail "bitmap c is missing"
python3 - <<'PYEOF' || fail "bitmap c recorded nothing"
import ast
d = ast.literal_eval(open("vdisk.log").read().splitlines()[-1])
assert d["c"] != d["d"], d   # d is empty, c has writes and merges
PYEOF
echo "vdisk bitmap: $(grep -c '^## ' vdisk.log) commands as qemu-img bitmap"
