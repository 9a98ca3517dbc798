#!/usr/bin/env bash
# qcow2 open-time validation: damaged header fields are refused with a
# message naming the fault, the image is never written by a failed open,
# unknown incompatible features are named from the feature name table as
# qemu-img does, the corrupt bit blocks read-write opens only, unknown
# autoclear bits are cleared on a read-write open while unknown header
# extensions survive the header rewrite.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io python3 md5sum
tmpdir

patch()   # FILE OFFSET FORMAT VALUE (big endian)
{
    python3 -c '
import struct, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(int(sys.argv[2], 0))
    f.write(struct.pack(">" + sys.argv[3], int(sys.argv[4], 0)))
' "$@"
}

fresh()
{
    rm -f t.qcow2
    $QEMU_IMG create -q -f qcow2 t.qcow2 64M
    $QEMU_IO -c "write -P 0x5a 0 128k" t.qcow2 >/dev/null
}

# refused OFFSET FORMAT VALUE PATTERN: the patched image must not open
# (read-only nor read-write), the message must match PATTERN, and the
# file must be unchanged.
refused()
{
    fresh
    patch t.qcow2 "$1" "$2" "$3"
    local sum; sum=$(md5sum < t.qcow2)
    if "$VDISK" io -f qcow2 -c "read 0 512" t.qcow2 >out 2>err; then
        fail "opened with $1=$3"
    fi
    grep -q -- "$4" err || { cat err; fail "message for $1=$3: want '$4'"; }
    if "$VDISK" io -f qcow2 -c "write 0 512" t.qcow2 >out 2>err; then
        fail "opened read-write with $1=$3"
    fi
    [ "$(md5sum < t.qcow2)" = "$sum" ] || fail "image changed by a failed open"
}

refused 0   I 0x514649fc "Image is not in qcow2 format"
refused 4   I 4          "Unsupported qcow2 version 4"
refused 20  I 8          "Unsupported cluster size: 2^8"
refused 20  I 22         "Unsupported cluster size: 2^22"
refused 100 I 96         "header too short"
refused 100 I 108        "multiple of 8"
refused 96  I 7          "may not exceed 64 bits"
refused 32  I 2          "Missing CRYPTO header for crypt method 2"
refused 32  I 9          "Unsupported encryption method"
refused 40  Q 0x30200    "L1 table offset 0x30200 is not cluster-aligned"
refused 36  I 0          "L1 table is too small"
refused 48  Q 0x7000000  "lies outside the file"
refused 56  I 0x10000    "Reference count table size"
refused 60  I 70000      "Too many snapshots"
refused 72  Q 0x20       "Unsupported qcow2 feature(s): Unknown incompatible feature: 20"

# An unknown bit named in the feature name table: same text as qemu-img.
fresh
python3 - <<'PY'
import struct
with open("t.qcow2", "r+b") as f:
    f.seek(72); f.write(struct.pack(">Q", 1 << 7))
    # Rename the "extended L2 entries" entry (type 0, bit 4) to bit 7.
    data = bytearray(f.read(0) or b"")
    f.seek(0); hdr = bytearray(f.read(4096))
    i = hdr.find(b"extended L2 entries")
    hdr[i - 1] = 7
    hdr[i:i + 19] = b"future feature\0\0\0\0\0"
    f.seek(0); f.write(hdr)
PY
! "$VDISK" info t.qcow2 >out 2>err || fail "opened with unknown feature"
grep -q "Unsupported qcow2 feature(s): future feature" err ||
    { cat err; fail "unknown feature not named"; }
! $QEMU_IMG info t.qcow2 >/dev/null 2>qerr
grep -q "Unsupported qcow2 feature(s): future feature" qerr ||
    { cat qerr; fail "qemu-img disagrees on the feature name"; }

# Corrupt bit: read-only opens work (with a warning), read-write fails.
fresh
patch t.qcow2 72 Q 2
"$VDISK" io -f qcow2 -r -c "read -P 0x5a 0 128k" t.qcow2 >out 2>err ||
    fail "read-only open of a corrupt image failed"
! "$VDISK" io -f qcow2 -c "write 0 512" t.qcow2 >out 2>err ||
    fail "read-write open of a corrupt image succeeded"
grep -q "corrupt" err || fail "no corruption message"

# Unknown autoclear bit: cleared by a read-write open; an unknown header
# extension is kept through the rewrite; data and check stay intact.
fresh
python3 - <<'PY'
import struct
with open("t.qcow2", "r+b") as f:
    f.seek(88); f.write(struct.pack(">Q", 1 << 9))
    f.seek(112)
    f.write(struct.pack(">II", 0x12345678, 5) + b"hello\0\0\0")
    f.write(struct.pack(">II", 0, 0))
PY
"$VDISK" io -f qcow2 -c "write -P 0x6b 64k 4k" t.qcow2 >/dev/null
python3 - <<'PY'
import struct
d = open("t.qcow2", "rb").read(65536)
assert struct.unpack(">Q", d[88:96])[0] == 0, "autoclear bit not cleared"
assert struct.pack(">II", 0x12345678, 5) + b"hello" in d, "extension lost"
PY
$QEMU_IMG check -q t.qcow2 || fail "check failed after the header rewrite"
$QEMU_IO -c "read -P 0x5a 0 64k" -c "read -P 0x6b 64k 4k" t.qcow2 >/dev/null ||
    fail "data changed"
