# Helpers for the tests that build programs against the installed
# library (lib-install.sh, examples.sh). Sourced after ../functions.sh
# and `tmpdir`. (Named .bash so meson's cli/*.sh glob does not run it.)
#
#   install_staged DEST     `meson install --destdir DEST` of the build under
#                           test (VDISK_BUILDDIR); sets $pc (vdisk.pc) and
#                           $so (libvdisk.so.0) to the installed files
#   staged_build_env        points pkg-config (PKG_CONFIG_PATH,
#                           PKG_CONFIG_SYSROOT_DIR) and the dynamic loader
#                           (LD_LIBRARY_PATH) at the staged prefix, and
#                           sets the array $sanflags to the build's
#                           -fsanitize= flags (a sanitizer build's library
#                           needs its runtime in the program) or nothing

install_staged()
{
    dest=$1
    [ -n "${VDISK_BUILDDIR:-}" ] || fail "VDISK_BUILDDIR is not set"
    if ! meson install -C "$VDISK_BUILDDIR" --no-rebuild --destdir "$dest" \
            > install.log 2>&1; then
        cat install.log
        fail "meson install failed"
    fi
    pc=$(find "$dest" -name vdisk.pc)
    [ -n "$pc" ] || fail "meson install installed no vdisk.pc"
    so=$(find "$dest" -name libvdisk.so.0)
    [ -n "$so" ] || fail "meson install installed no libvdisk.so.0"
}

staged_build_env()
{
    local san
    export PKG_CONFIG_PATH=$(dirname "$pc")
    export PKG_CONFIG_SYSROOT_DIR=$dest
    export LD_LIBRARY_PATH=$(dirname "$so")
    san=$(meson introspect "$VDISK_BUILDDIR" --buildoptions | python3 -c '
import json, sys
print(next(o["value"] for o in json.load(sys.stdin) if o["name"] == "b_sanitize"))')
    sanflags=()
    if [ "$san" != none ]; then
        sanflags=(-fsanitize="$san")
    fi
}
