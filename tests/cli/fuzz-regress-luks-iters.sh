#!/usr/bin/env bash
# Found by tests/fuzz/fuzz-luks.c: a LUKS header whose enabled key slot (or master key digest) claimed 0 PBKDF2 iterations made nettle abort the process on open with the secret; a slot with 0 anti-forensic stripes read outside its buffer.
# Each damaged copy of a LUKS image qemu-img made must be refused by a
# read through vdisk io (with the right secret) with exit status 1 and
# a message naming the fault, never a crash; vdisk info (which reads no
# key) must not crash either; every file is left byte-identical. The
# intact image still opens.
source "$(dirname "$0")/../functions.sh"
requires qemu-img python3 cmp
tmpdir

sec=(--object secret,id=s,data=pw)
$QEMU_IMG create -q "${sec[@]}" -f luks -o key-secret=s,iter-time=10 \
    good.luks 1M
opts=driver=luks,key-secret=s,file.filename
"$VDISK" io "${sec[@]}" --image-opts "$opts=good.luks" \
    -c 'read 0 4k' > out 2>&1 || fail "the intact image: $(cat out)"

# poke NAME OFFSET: NAME.luks, a copy of good.luks with the big-endian
# 32-bit field at OFFSET set to 0 (LUKS1: the master key digest's
# iterations at 164, key slot 0 at 208: iterations at 212, stripes at
# 252).
poke()
{
    cp good.luks "$1.luks"
    python3 - "$1.luks" "$2" <<'PY'
import struct, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(int(sys.argv[2]))
    f.write(struct.pack(">I", 0))
PY
    cp "$1.luks" "$1.orig"
}

for c in "mkiters 164 Master key digest iteration count is zero" \
         "slotiters 212 Keyslot 0 iteration count is zero" \
         "stripes 252 Keyslot 0 is corrupted"; do
    read -r name off msg <<< "$c"
    poke "$name" "$off"
    for cmd in "info" "io"; do
        st=0
        if [ "$cmd" = info ]; then
            "$VDISK" info "${sec[@]}" --image-opts "$opts=$name.luks" \
                > out 2>&1 || st=$?
        else
            "$VDISK" io "${sec[@]}" --image-opts "$opts=$name.luks" \
                -c 'read 0 4k' > out 2>&1 || st=$?
        fi
        if [ "$cmd" = info ]; then
            # info reads no key (as qemu-img info): it may open the
            # header or refuse it, but never crash.
            [ "$st" = 0 ] || [ "$st" = 1 ] ||
                fail "$name, info: exit status $st: $(cat out)"
        else
            [ "$st" = 1 ] || fail "$name, io: exit status $st: $(cat out)"
            grep -q "$msg" out || fail "$name, io: $(cat out)"
        fi
        cmp "$name.luks" "$name.orig" || fail "$name, $cmd: file changed"
    done
done
echo ok
