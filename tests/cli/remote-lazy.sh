#!/usr/bin/env bash
# The remote drivers' libraries (libnbd, libcurl, libssh, libiscsi, librbd)
# are loaded when a driver is first used, not linked (src/common/dlib.h):
# neither vdisk nor libvdisk needs them to start, a process that uses no
# remote protocol never maps them (less memory than qemu-img, which links
# gnutls too), one that does maps only its own; and a machine whose
# library is broken or missing gets an error naming the library from the
# protocol that needs it, exit 1, never a crash, while every other
# protocol and format keeps working.
source "$(dirname "$0")/../functions.sh"
requires qemu-img readelf cc timeout
tmpdir

# Which remote drivers this build has, and their libraries' sonames
# (the ones the build would link: scripts/soname.sh).
soname_sh="$VDISK_SRCDIR/scripts/soname.sh"
"$VDISK" --help > help.out
declare -A lib_of=([nbd]=nbd [http]=curl [ssh]=ssh [iscsi]=iscsi [rbd]=rbd)
declare -A uri_of=([nbd]="nbd://127.0.0.1:1/x" [http]="http://127.0.0.1:1/x"
    [ssh]="ssh://127.0.0.1:1/x" [iscsi]="iscsi://127.0.0.1:1/iqn.x/0"
    [rbd]="rbd:rbd/x")
drivers=()
for d in nbd http ssh iscsi rbd; do
    grep -qw "$d" help.out && drivers+=("$d")
done
if [ ${#drivers[@]} = 0 ]; then
    echo "no remote driver in this build"
    exit 77
fi

# Not linked: the dynamic section of the tool and of the library names
# none of them.
lib=$(dirname "$(dirname "$VDISK")")/libvdisk.so.0
for f in "$VDISK" "$lib"; do
    [ -e "$f" ] || continue
    readelf -d "$f" | grep NEEDED > needed
    for d in "${drivers[@]}"; do
        so=$("$soname_sh" "${lib_of[$d]}" cc)
        [ -n "$so" ] || continue
        ! grep -qF "[$so]" needed || fail "$f links $so: $(cat needed)"
    done
done

# Not loaded by a process that uses no remote protocol (LD_DEBUG=files
# lists every library the loader maps, at start and by dlopen()).
$QEMU_IMG create -q -f qcow2 a.qcow2 1M
LD_DEBUG=files "$VDISK" io -f qcow2 -c 'read 0 512' a.qcow2 \
    > /dev/null 2> ld.log
for d in "${drivers[@]}"; do
    so=$("$soname_sh" "${lib_of[$d]}" cc)
    [ -n "$so" ] || continue
    ! grep -q "file=$so \[" ld.log ||
        fail "a local read loaded $so: $(grep "file=$so" ld.log | head -2)"
done

# A broken library: the protocol that needs it fails with its name, the
# others and local images keep working.
mkdir fake
echo 'int vdisk_fake_symbol;' > fake.c
for d in "${drivers[@]}"; do
    so=$("$soname_sh" "${lib_of[$d]}" cc)
    [ -n "$so" ] || continue
    cc -shared -fPIC -o "fake/$so" -Wl,-soname,"$so" fake.c ||
        fail "cannot build a fake $so"
    expect_status 1 env LD_LIBRARY_PATH="$PWD/fake" timeout 30 \
        "$VDISK" info "${uri_of[$d]}" 2> err
    grep -q "cannot load $so: no symbol " err ||
        fail "$d with a broken $so: $(cat err)"
done
LD_LIBRARY_PATH="$PWD/fake" "$VDISK" info a.qcow2 > /dev/null ||
    fail "a local image fails when remote libraries are broken"
if grep -qw nbd help.out; then
    expect_status 1 env LD_LIBRARY_PATH="$PWD/fake" timeout 30 \
        "$VDISK" serve -L -k "$PWD/nosock" 2> err
    grep -q "cannot load .*: no symbol" err ||
        fail "serve -L with a broken libnbd: $(cat err)"
fi

# Memory: a vdisk process that touches no remote storage is no larger
# than qemu-img's for the same work (qemu-img links gnutls as vdisk does).
# (Not under ASan, whose shadow memory makes every process larger.)
# (ldd's output kept in a file: grep -q ending the pipe early fails it
# under pipefail.)
ldd "$VDISK" > ldd.out 2>&1 || true
if [ -x /usr/bin/time ] && ! grep -q libasan ldd.out; then
    /usr/bin/time -f %M "$VDISK" info a.qcow2 > /dev/null 2> v.rss
    /usr/bin/time -f %M "$QEMU_IMG" info a.qcow2 > /dev/null 2> q.rss
    [ "$(tail -1 v.rss)" -le "$(tail -1 q.rss)" ] ||
        fail "vdisk info: $(tail -1 v.rss) KiB, qemu-img $(tail -1 q.rss) KiB"
fi
exit 0
