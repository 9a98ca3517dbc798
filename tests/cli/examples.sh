#!/usr/bin/env bash
# examples/vdisk-backup.c built against the installed library with only
# `cc $(pkg-config --cflags --libs vdisk)` (a staged `meson install`) and
# run: a full backup, guest writes with qemu-io, an incremental backup
# into a qcow2 overlay of the full one; qemu-img compare finds the chain
# equal to the image and qemu-img map finds in the overlay exactly the
# written ranges; an incremental backup after no writes copies nothing;
# a missing bitmap and an existing OUT are refused with every file left
# byte-identical.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io meson pkg-config python3 sha256sum
cc=${CC:-cc}
requires "$cc"
tmpdir
source "$(dirname "$0")/install.bash"

[ -n "${VDISK_SRCDIR:-}" ] || fail "VDISK_SRCDIR is not set"

install_staged "$PWD/root"
staged_build_env
# shellcheck disable=SC2046
"$cc" -std=c99 -Wall -Wextra -Werror "${sanflags[@]}" \
    -o vdisk-backup "$VDISK_SRCDIR/examples/vdisk-backup.c" \
    $(pkg-config --cflags --libs vdisk)

# The depth-0 extents of qemu-img map of an overlay, as "start+length"
# with neighbours joined: what the overlay itself holds.
own_extents()
{
    $QEMU_IMG map --output=json "$1" | python3 -c '
import json, sys
out = []
for e in json.load(sys.stdin):
    if e["depth"] != 0:
        continue
    if out and out[-1][0] + out[-1][1] == e["start"]:
        out[-1][1] += e["length"]
    else:
        out.append([e["start"], e["length"]])
print(" ".join("%d+%d" % (s, l) for s, l in out))'
}

$QEMU_IMG create -q -f qcow2 img.qcow2 64M
$QEMU_IO -c 'write -q -P 0x11 0 192k' -c 'write -q -P 0x22 8M 1M' \
    -c 'write -q -P 0x33 63M 1M' img.qcow2

# ---- full ----
./vdisk-backup full img.qcow2 b0 full.qcow2 > full.log ||
    fail "full backup failed: $(cat full.log)"
grep -q "^full backup of img.qcow2: copied .* bytes" full.log ||
    fail "full backup printed: $(cat full.log)"
assert_same_content img.qcow2 full.qcow2
$QEMU_IMG info --output=json img.qcow2 | python3 -c '
import json, sys
bms = json.load(sys.stdin)["format-specific"]["data"].get("bitmaps", [])
sys.exit(0 if [b["name"] for b in bms] == ["b0"] else "bitmaps: %r" % bms)' ||
    fail "img.qcow2 has no persistent bitmap b0 after the full backup"

# ---- the guest writes: data, zeros over data, data at the end ----
$QEMU_IO -c 'write -q -P 0x44 1M 64k' -c 'write -q -z 8M 128k' \
    -c 'write -q -P 0x55 64k 64k' -c 'write -q -P 0x66 63M 192k' img.qcow2

./vdisk-backup inc img.qcow2 b0 full.qcow2 inc1.qcow2 > inc1.log ||
    fail "incremental backup failed: $(cat inc1.log)"
assert_same_content img.qcow2 inc1.qcow2
$QEMU_IMG check -q inc1.qcow2 || fail "qemu-img check: inc1.qcow2"
# The bitmap's granularity is the image's cluster size (64k) and every
# write above is aligned to it: the overlay holds exactly those ranges.
got=$(own_extents inc1.qcow2)
want="65536+65536 1048576+65536 8388608+131072 66060288+196608"
[ "$got" = "$want" ] || fail "inc1.qcow2 holds $got, expected $want"
grep -q "copied 458752 bytes in 4 extents" inc1.log ||
    fail "incremental backup printed: $(cat inc1.log)"

# ---- nothing written since: nothing copied ----
./vdisk-backup inc img.qcow2 b0 inc1.qcow2 inc2.qcow2 > inc2.log ||
    fail "second incremental backup failed: $(cat inc2.log)"
grep -q "copied 0 bytes in 0 extents" inc2.log ||
    fail "an incremental backup after no writes: $(cat inc2.log)"
[ -z "$(own_extents inc2.qcow2)" ] ||
    fail "inc2.qcow2 holds data: $(own_extents inc2.qcow2)"
assert_same_content img.qcow2 inc2.qcow2
# The restored chain, flattened, is the image.
$QEMU_IMG convert -O raw inc2.qcow2 restored.raw
assert_same_content -f qcow2 -F raw img.qcow2 restored.raw

# ---- bad input: a bitmap the image does not have ----
before=$(sha256sum img.qcow2)
st=0
./vdisk-backup inc img.qcow2 nosuch inc2.qcow2 bad.qcow2 2> bad.err || st=$?
[ "$st" = 1 ] || fail "a missing bitmap: exit status $st"
grep -q "img.qcow2: no bitmap 'nosuch': run a full backup first" bad.err ||
    fail "a missing bitmap: $(cat bad.err)"
[ ! -e bad.qcow2 ] || fail "a missing bitmap still created bad.qcow2"
[ "$(sha256sum img.qcow2)" = "$before" ] ||
    fail "a refused backup changed img.qcow2"

# ---- bad input: OUT exists (here the previous backup) ----
before_inc2=$(sha256sum inc2.qcow2)
st=0
./vdisk-backup inc img.qcow2 b0 inc1.qcow2 inc2.qcow2 2> exists.err || st=$?
[ "$st" = 1 ] || fail "an existing OUT: exit status $st"
grep -q "inc2.qcow2: exists" exists.err ||
    fail "an existing OUT: $(cat exists.err)"
[ "$(sha256sum inc2.qcow2)" = "$before_inc2" ] ||
    fail "a refused backup changed inc2.qcow2"
[ "$(sha256sum img.qcow2)" = "$before" ] ||
    fail "a refused backup changed img.qcow2"
