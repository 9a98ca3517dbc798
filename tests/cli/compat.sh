#!/usr/bin/env bash
# vdisk under QEMU's four names (build/tools/qemu-compat/) against QEMU's
# qemu-img, qemu-io, qemu-nbd and qemu-storage-daemon: tests/compat/run.py
# runs every tests/compat/*.cases script with each set of tools first on
# PATH and compares stdout, stderr and exit status line by line; the
# differences listed in tests/compat/known-differences are reported apart.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-nbd qemu-storage-daemon python3
[ -n "${VDISK_QEMU_COMPAT:-}" ] || fail "VDISK_QEMU_COMPAT is not set"
[ -n "${VDISK_TESTS_SRCDIR:-}" ] || fail "VDISK_TESTS_SRCDIR is not set"

# The four names resolve to the binary under test.
for t in qemu-img qemu-io qemu-nbd qemu-storage-daemon; do
    [ "$(readlink -f "$VDISK_QEMU_COMPAT/$t")" = "$(readlink -f "$VDISK")" ] ||
        fail "$VDISK_QEMU_COMPAT/$t is not $VDISK"
done

# The case files run two at a time (each runs QEMU, then vdisk).
python3 "$VDISK_TESTS_SRCDIR/compat/run.py" --jobs 2 \
    --vdisk "$VDISK_QEMU_COMPAT" "$VDISK_TESTS_SRCDIR"/compat/*.cases
