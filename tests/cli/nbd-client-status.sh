#!/usr/bin/env bash
# Block status through the nbd client, which asks the server about a large
# range at once and answers later questions from that reply: map,
# compare and convert of an export with more extents than one reply is
# kept for give what qemu-img gives (QEMU asks one extent at a time).
# (tests/python/test_nbd_status.py: the answers after our own writes and
# another client's.)
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/nbd-servers.bash"
requires qemu-img nbdkit python3 timeout
tmpdir

T="timeout 60"
nbds_requires_client

# 3000 data extents of 4 KiB, 8 KiB apart (more than the 1024 extents a
# reply is kept for), then 1 MiB of data and a hole to the end.
python3 - <<'EOF'
with open("frag.raw", "wb") as f:
    f.truncate(32 << 20)
    for i in range(3000):
        f.seek(i * 8192)
        f.write(bytes([i % 251 + 1]) * 4096)
    f.seek(28 << 20)
    f.write(b"\x5a" * (1 << 20))
EOF
# nbdkit: qemu-nbd 7.2 leaves Nagle's algorithm on, and QEMU's client,
# one round trip per extent, then took minutes over these.
nbds_nbdkit pid1 - -r file frag.raw || fail "nbdkit"
uri="nbd://127.0.0.1:$NBDS_PORT"
$T "$VDISK" map --output=json "$uri" > v.map || fail "vdisk map"
$T $QEMU_IMG map --output=json "$uri" > q.map
diff -u q.map v.map > map.diff || fail "map differs: $(head -20 map.diff)"
[ "$(grep -c '"data": true' v.map)" -ge 3000 ] ||
    fail "the fragments are not seen: $(grep -c '"data": true' v.map)"
$T "$VDISK" convert -O qcow2 "$uri" v.qcow2 || fail "convert"
$T $QEMU_IMG compare -q frag.raw v.qcow2 || fail "convert's copy differs"
$T $QEMU_IMG map --output=json frag.raw > fq.map
$T $QEMU_IMG map --output=json v.qcow2 > vq.map
$T $QEMU_IMG convert -O qcow2 "$uri" q.qcow2
$T $QEMU_IMG map --output=json q.qcow2 > qq.map
diff -u qq.map vq.map > conv.diff ||
    fail "the copy is laid out unlike qemu-img's: $(head -20 conv.diff)"
$T "$VDISK" compare "$uri" frag.raw || fail "compare with the source"
nbds_stop pid1
