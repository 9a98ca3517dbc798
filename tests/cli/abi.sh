#!/usr/bin/env bash
# The library's ABI is a promise: abidiff (abigail-tools) compares the
# build under test with the stored baseline abi/libvdisk.abi and fails on
# any incompatible change (a removed or re-versioned symbol, a changed
# signature, a changed public type), on a symbol added to a version node
# the baseline already holds (released nodes are frozen), and lists the
# functions added in new nodes (allowed). scripts/abi-update.sh writes
# both descriptions the same way; docs/library.md, "Library ABI".
source "$(dirname "$0")/../functions.sh"
requires abidiff abidw readelf python3
tmpdir

[ -n "${VDISK_BUILDDIR:-}" ] || fail "VDISK_BUILDDIR is not set"
[ -n "${VDISK_SRCDIR:-}" ] || fail "VDISK_SRCDIR is not set"
baseline=$VDISK_SRCDIR/abi/libvdisk.abi
[ -f "$baseline" ] || fail "$baseline is missing"

# The library of the build under test (plain or sanitizer: the same
# description, see scripts/abi-update.sh).
bash "$VDISK_SRCDIR/scripts/abi-update.sh" "$VDISK_BUILDDIR" current.abi ||
    fail "abidw could not describe $VDISK_BUILDDIR/libvdisk.so.0"

# An enum's VD_..._MAX enumerator counts the values for arrays inside the
# library and is not part of the ABI (docs/library.md): it grows when a
# value is appended, which is compatible. Both sides are compared without
# it, so appending passes and inserting in the middle (which renumbers
# the values after it) still fails.
sed "/<enumerator name='VD_[A-Z0-9_]*__MAX'/d" "$baseline" > old.abi
sed "/<enumerator name='VD_[A-Z0-9_]*__MAX'/d" current.abi > new.abi

# The baseline comes from Debian 12's gcc (docs/library.md); another
# compiler's DWARF may describe the same types differently.
producer=$(readelf --debug-dump=info "$VDISK_BUILDDIR/libvdisk.so.0" \
    2>/dev/null | grep -m1 DW_AT_producer |
    sed 's/.*DW_AT_producer *: *//; s/^([^)]*): //') || true
echo "compiled by: ${producer:-unknown}"
note=
case $producer in
"GNU C"*) ;;
*) note=" (the baseline is gcc's; compare a gcc build before blaming the change)" ;;
esac

# The verdict leaves additions out: abidiff's status is non-zero for any
# other change it reports (bit 4: an ABI change, bit 8: an incompatible
# one; bits 1 and 2: abidiff itself failed).
st=0
abidiff --no-added-syms old.abi new.abi > verdict.txt 2>&1 || st=$?
if [ "$st" != 0 ]; then
    cat verdict.txt
    fail "abidiff reports an ABI change against abi/libvdisk.abi" \
         "(status $st): keep the old symbols and types, or bump the" \
         "SONAME and run scripts/abi-update.sh (docs/library.md)$note"
fi

# Version nodes: a function the baseline exports keeps its node, and an
# added function goes to a node the baseline does not have yet.
python3 - old.abi new.abi <<'PY'
import re, sys

def symbols(path):
    text = open(path).read()
    out = {}
    for m in re.finditer(r"<elf-symbol name='([^']*)'(?: version='([^']*)')?",
                         text):
        out[m.group(1)] = m.group(2) or ""
    return out

old, new = symbols(sys.argv[1]), symbols(sys.argv[2])
released = set(old.values())
problems, added = [], []
for name, node in sorted(old.items()):
    if name not in new:
        problems.append("removed: %s@%s" % (name, node))
    elif new[name] != node:
        problems.append("moved: %s from %s to %s" % (name, node, new[name]))
for name, node in sorted(new.items()):
    if name in old:
        continue
    if node in released or not node:
        problems.append("added to released node %s: %s (new functions go "
                        "to the newest node of src/libvdisk.map)"
                        % (node or "(none)", name))
    else:
        added.append("%s@%s" % (name, node))
print("%d functions of the baseline unchanged; %d added%s"
      % (len(old), len(added), (": " + " ".join(added)) if added else ""))
if problems:
    sys.exit("\n".join(problems))
PY

# The full report, additions included, for the log.
abidiff old.abi new.abi || true
