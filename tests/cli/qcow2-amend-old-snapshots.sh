#!/usr/bin/env bash
# amend -o compat=1.1 refused images whose snapshot table lacks the v3 extra data (v2 tables with none or 8 bytes); QEMU 7.2 writes the table anew and upgrades.
# v2 and v3 images with old-style snapshot tables (0, 8 or 16 bytes of
# extra data per entry), upgraded, downgraded, checked and repaired by
# both tools: the same messages, status and resulting file.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io python3 cmp
tmpdir

# shrink_extra IMG N: rewrites IMG's snapshot table in place with N
# bytes of extra data per entry (the table only gets shorter).
shrink_extra()
{
    python3 - "$1" "$2" <<'PY'
import struct, sys
img, n = sys.argv[1], int(sys.argv[2])
with open(img, "r+b") as f:
    h = f.read(72)
    nb, off = struct.unpack(">IQ", h[60:72])
    pos, ents = off, []
    for i in range(nb):
        pos = (pos + 7) & ~7
        f.seek(pos)
        sh = f.read(40)
        l1o, l1s, ids, names, ds, dn, vmc, vms, ex = struct.unpack(">QIHHIIQII", sh)
        extra = f.read(ex)
        idn = f.read(ids + names)
        ents.append((sh[:36], extra, idn))
        pos += 40 + ex + ids + names
    out = b""
    for head, extra, idn in ents:
        out += b"\0" * (-len(out) % 8)
        out += head + struct.pack(">I", n) + extra[:n] + idn
    f.seek(off)
    f.write(out)
PY
}

for compat in 0.10 1.1; do
    for extra in 0 8 16; do
        rm -f base.qcow2
        $QEMU_IMG create -q -f qcow2 -o compat=$compat base.qcow2 4M
        $QEMU_IO -c 'write -q -P 1 0 64k' base.qcow2
        $QEMU_IMG snapshot -c s1 base.qcow2
        $QEMU_IO -c 'write -q -P 2 0 64k' -c 'write -q -P 3 1M 64k' base.qcow2
        $QEMU_IMG snapshot -c s2 base.qcow2
        shrink_extra base.qcow2 $extra
        for cmd in "check" "check -r all" "amend -o compat=1.1" \
                   "amend -o compat=0.10" "snapshot -l"; do
            cp base.qcow2 q.qcow2
            cp base.qcow2 v.qcow2
            qs=0; vs=0
            $QEMU_IMG $cmd q.qcow2 >q.out 2>&1 || qs=$?
            "$VDISK" $cmd v.qcow2 >v.out 2>&1 || vs=$?
            what="compat=$compat, $extra bytes of extra data: $cmd"
            [ "$qs" = "$vs" ] || { cat v.out; fail "$what: status $vs, qemu-img's $qs"; }
            diff -u <(sed 's/^qemu-img: //' q.out) <(sed 's/^vdisk: //' v.out) ||
                fail "$what: output differs"
            cmp q.qcow2 v.qcow2 || fail "$what: files differ"
        done
        # The upgraded image keeps its snapshots and data.
        [ $compat = 0.10 ] || continue
        cp base.qcow2 v.qcow2
        "$VDISK" amend -o compat=1.1 v.qcow2
        $QEMU_IMG check v.qcow2 >/dev/null || fail "upgraded image: check"
        "$VDISK" snapshot -a s1 v.qcow2
        $QEMU_IO -r -c 'read -q -P 1 0 64k' -c 'read -q -P 0 1M 64k' v.qcow2 ||
            fail "upgraded image: snapshot data"
    done
done
