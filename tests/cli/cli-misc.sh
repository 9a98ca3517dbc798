#!/usr/bin/env bash
# The vdisk command line itself: --help lists every subcommand, --version
# names the qemu-img release it follows, unknown commands and options get
# qemu-img's messages and exit status 1.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
requires qemu-img
tmpdir

$VDISK --help > help.out
for cmd in check compare convert create dd info map resize io; do
    grep -q "^  $cmd " help.out || fail "--help does not list $cmd"
done
$VDISK help | cmp - help.out || fail "'vdisk help' differs from --help"
$VDISK -h | cmp - help.out || fail "'vdisk -h' differs from --help"
grep -q "Supported formats:.* raw" help.out || fail "--help lists no formats"

$VDISK --version > version.out
grep -q "^vdisk version [0-9]" version.out || fail "bad --version"
grep -q "qemu-img.*7\.2" version.out || fail "--version does not name qemu-img 7.2"
$VDISK -V | cmp - version.out || fail "-V differs from --version"

same foo
same bogus-command arg
same info --bogus x
same create -z x.img
same map -f
same compare --output=json a b
expect_status 1 "$VDISK"
