#!/usr/bin/env bash
# 'Unsupported qcow2 feature(s)' listed names by bit number instead of in the order of the image's feature name table, read past an entry without a name and gave every unnamed bit a line of its own; qemu-img 7.2 walks the table and ORs the rest into one mask.
# Images with unknown incompatible bits and feature name tables made up
# at test time: info, check and io must fail with qemu's message.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io python3
tmpdir

# mkimg "SPEC|SPEC...": a new image whose feature name table gets one
# entry per SPEC "bit:name" (name may be empty) and whose incompatible
# bits are set for every bit of every SPEC, plus the bits of $EXTRA.
mkimg()
{
    rm -f f.qcow2
    $QEMU_IMG create -q -f qcow2 f.qcow2 4M
    python3 - "${EXTRA:-0}" "$1" <<'PY'
import struct, sys
extra = int(sys.argv[1])
specs = [a.split(":", 1) for a in sys.argv[2].split("|")]
with open("f.qcow2", "r+b") as f:
    data = bytearray(f.read(65536))
hl = struct.unpack(">I", data[100:104])[0]
pos, exts = hl, []
while True:
    t, l = struct.unpack(">II", data[pos:pos + 8])
    if t == 0:
        break
    exts.append([t, bytes(data[pos + 8:pos + 8 + l])])
    pos += 8 + ((l + 7) & ~7)
mask = extra
for bit, name in specs:
    mask |= 1 << int(bit)
    for e in exts:
        if e[0] == 0x6803f857:
            e[1] += struct.pack(">BB46s", 0, int(bit), name.encode())
out = b""
for t, d in exts:
    out += struct.pack(">II", t, len(d)) + d + b"\0" * (-len(d) % 8)
out += b"\0" * 8
new = data[:hl] + out
v = struct.unpack(">Q", new[72:80])[0] | mask
struct.pack_into(">Q", new, 72, v)
new += b"\0" * (65536 - len(new))
with open("f.qcow2", "r+b") as f:
    f.write(new)
PY
}

same_refusal()
{
    local cmd=$1 q v
    shift
    case $cmd in
    io) q=$($QEMU_IO -c 'read 0 512' "$@" 2>&1 || true)
        v=$("$VDISK" io -c 'read 0 512' "$@" 2>&1 || true)
        q=${q#qemu-io: }; v=${v#vdisk: } ;;
    *)  q=$($QEMU_IMG $cmd "$@" 2>&1 || true)
        v=$("$VDISK" $cmd "$@" 2>&1 || true)
        q=${q#qemu-img: }; v=${v#vdisk: } ;;
    esac
    [ "$q" = "$v" ] || fail "$cmd: '$v', qemu: '$q'"
    case $q in *"Unsupported qcow2 feature"*) ;;
    *) fail "qemu did not refuse: $q" ;; esac
}

for specs in "5:my feature" "7:b7|5:five" "6:|7:b7" "9:nine|6:six" \
             "6:$(printf 'x%.0s' {1..46})"; do
    for extra in 0 $(( (1 << 9) | (1 << 40) )); do
        EXTRA=$extra mkimg "$specs"
        for cmd in info check io; do
            same_refusal $cmd f.qcow2
        done
    done
done
