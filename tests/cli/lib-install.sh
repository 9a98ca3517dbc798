#!/usr/bin/env bash
# libvdisk as a library: `meson install` of the build under test into a
# scratch DESTDIR; a program outside the tree built with only `pkg-config
# --cflags --libs vdisk` against libvdisk.so reads and writes a qcow2 image
# made by qemu-img (qemu-img compare and qemu-img info referee) and serves
# it over NBD to qemu-io; the library's SONAME is libvdisk.so.0 and it
# exports exactly the functions the installed headers declare; QEMU's four
# tool names are symlinks to vdisk in $libexecdir/vdisk/qemu-compat/.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io meson pkg-config readelf nm python3 timeout
cc=${CC:-cc}
requires "$cc"
tmpdir

[ -n "${VDISK_BUILDDIR:-}" ] || fail "VDISK_BUILDDIR is not set"
[ -n "${VDISK_TESTS_SRCDIR:-}" ] || fail "VDISK_TESTS_SRCDIR is not set"

# ---- install ----

dest=$PWD/root
if ! meson install -C "$VDISK_BUILDDIR" --no-rebuild --destdir "$dest" \
        > install.log 2>&1; then
    cat install.log
    fail "meson install failed"
fi
pc=$(find "$dest" -name vdisk.pc)
[ -n "$pc" ] || fail "meson install installed no vdisk.pc"
so=$(find "$dest" -name libvdisk.so.0)
[ -n "$so" ] || fail "meson install installed no libvdisk.so.0"
[ -n "$(find "$dest" -name libvdisk.a)" ] ||
    fail "meson install installed no libvdisk.a"
incdir=$(dirname "$(find "$dest" -path '*/vdisk/vdisk.h')")
[ -f "$incdir/nbd-server.h" ] || fail "nbd-server.h is not installed"

# QEMU's four names: symlinks to the installed vdisk, in a directory of
# their own (never beside QEMU's binaries), that answer as QEMU's tools.
vdisk_bin=$(find "$dest" -path '*/bin/vdisk')
[ -n "$vdisk_bin" ] || fail "meson install installed no vdisk"
compat=$(find "$dest" -type d -path '*/libexec/vdisk/qemu-compat')
[ -n "$compat" ] || fail "no \$libexecdir/vdisk/qemu-compat/ installed"
for t in qemu-img qemu-io qemu-nbd qemu-storage-daemon; do
    [ -L "$compat/$t" ] || fail "$compat/$t is not a symlink"
    [ "$(readlink -f "$compat/$t")" = "$(readlink -f "$vdisk_bin")" ] ||
        fail "$compat/$t points to $(readlink "$compat/$t"), not vdisk"
done
[ "$(find "$dest" -name 'qemu-*' ! -type d | wc -l)" = 4 ] ||
    fail "qemu-* installed elsewhere: $(find "$dest" -name 'qemu-*' ! -type d)"
LD_LIBRARY_PATH=$(dirname "$so") "$compat/qemu-img" --version > version.txt
grep -q '^qemu-img version 7\.2\.0 (vdisk ' version.txt ||
    fail "installed qemu-img --version: $(cat version.txt)"

readelf -d "$so" > dynamic.txt
grep -q 'Library soname: \[libvdisk.so.0\]' dynamic.txt ||
    fail "SONAME of $so is not libvdisk.so.0: $(grep -i soname dynamic.txt)"

# ---- exported symbols == the headers' declarations ----

nm -D --defined-only "$so" > exported.txt
python3 - "$incdir" exported.txt <<'EOF'
import os, re, sys

incdir, nm_out = sys.argv[1], sys.argv[2]

# Every function the installed headers declare with VD_API, read at test
# time: comments and preprocessor lines removed, then each VD_API
# declaration up to its parameter list.
declared = set()
for name in sorted(os.listdir(incdir)):
    if not name.endswith(".h"):
        continue
    with open(os.path.join(incdir, name)) as f:
        text = f.read()
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    text = re.sub(r"^[ \t]*#(?:[^\n]*\\\n)*[^\n]*", " ", text, flags=re.M)
    found = re.findall(r"\bVD_API\s+[^;{(]*?\b([A-Za-z_]\w*)\s*\(", text)
    if not found:
        sys.exit("%s declares no VD_API function" % name)
    declared.update(found)

exported, problems = set(), []
with open(nm_out) as f:
    for line in f:
        parts = line.split()
        if len(parts) < 3:
            continue
        kind, sym = parts[1], parts[2]
        if kind == "A" and sym in ("VDISK_0.1", "VDISK_0.2"):
            continue                      # the version nodes themselves
        name, _, version = sym.partition("@@")
        if version not in ("VDISK_0.1", "VDISK_0.2"):
            problems.append("%s is not in version node VDISK_0.1 or 0.2"
                            % sym)
        exported.add(name)

for s in sorted(exported - declared):
    problems.append("exported but not declared in the headers: %s" % s)
for s in sorted(declared - exported):
    problems.append("declared VD_API but not exported: %s" % s)
if problems:
    sys.exit("\n".join(problems))
print("%d exported functions, all declared in %s" % (len(exported), incdir))
EOF

# ---- a program built outside the tree ----

export PKG_CONFIG_PATH=$(dirname "$pc")
export PKG_CONFIG_SYSROOT_DIR=$dest
cflags=$(pkg-config --cflags vdisk)
libs=$(pkg-config --libs vdisk)
# A sanitizer build's library needs the sanitizer runtime in the program.
san=$(meson introspect "$VDISK_BUILDDIR" --buildoptions | python3 -c '
import json, sys
print(next(o["value"] for o in json.load(sys.stdin) if o["name"] == "b_sanitize"))')
sanflags=()
if [ "$san" != none ]; then
    sanflags=(-fsanitize="$san")
fi
cp "$VDISK_TESTS_SRCDIR/install/embed.c" .
# shellcheck disable=SC2086
"$cc" -std=c99 -Wall -Wextra -Werror "${sanflags[@]}" $cflags -o embed \
    embed.c $libs
readelf -d embed | grep -q 'Shared library: \[libvdisk.so.0\]' ||
    fail "embed is not linked against libvdisk.so.0"
export LD_LIBRARY_PATH=$(dirname "$so")

$QEMU_IMG create -q -f qcow2 img.qcow2 4M
$QEMU_IO -c 'write -q -P 0xab 0 64k' img.qcow2
cp img.qcow2 ref.qcow2
$QEMU_IO -c 'write -q -P 0xcd 1M 64k' ref.qcow2

./embed rw img.qcow2 info.json || fail "embed rw failed"
assert_same_content img.qcow2 ref.qcow2
$QEMU_IMG check -q img.qcow2 || fail "qemu-img check found damage"
# The library's ImageInfo formatter against qemu-img's own.
$QEMU_IMG info --output=json img.qcow2 > ref-info.json
json_equal_filtered ref-info.json info.json filename actual-size

# The embedder exports its node over NBD; qemu-io reads through it.
timeout 60 ./embed serve img.qcow2 "$PWD/nbd.sock" > serve.log 2>&1 &
server=$!
cleanup_fn sh -c "kill $server 2>/dev/null; true"
for _ in $(seq 100); do
    [ -S nbd.sock ] && break
    sleep 0.05
done
[ -S nbd.sock ] || { cat serve.log; fail "embed serve did not listen"; }
$QEMU_IO -r -f raw -c 'read -P 0xcd 1M 64k' -c 'read -P 0xab 0 64k' \
    "nbd+unix:///disk?socket=$PWD/nbd.sock" > qemu-io.log ||
    { cat qemu-io.log serve.log; fail "qemu-io over the embedder's export"; }
grep -q 'Pattern verification failed' qemu-io.log &&
    fail "wrong data over NBD: $(cat qemu-io.log)"
st=0
wait "$server" || st=$?
[ "$st" = 0 ] || { cat serve.log; fail "embed serve exited with $st"; }
