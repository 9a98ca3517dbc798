#!/usr/bin/env bash
# Regression found by tests/fuzz/fuzz-qmp.c: a null-co node of size
# 2^63-1 (blockdev-add, or a json: filename) overflowed when its length
# was rounded up to a whole sector (signed overflow in
# vd_node_refresh_length). Now the open fails with EFBIG, as in qemu-img.
source "$(dirname "$0")/../functions.sh"
requires qemu-img timeout
tmpdir

big='json:{"driver": "null-co", "size": 9223372036854775807}'
st=0
timeout 20 "$VDISK" info "$big" > out 2>&1 || st=$?
[ "$st" = 1 ] || fail "vdisk info: status $st (1 expected): $(cat out)"
grep -q "File too large" out || fail "unexpected message: $(cat out)"
st=0
"$QEMU_IMG" info "$big" > /dev/null 2>&1 || st=$?
[ "$st" = 1 ] || fail "qemu-img info: status $st (1 expected)"
# An ordinary large size still opens.
"$VDISK" info 'json:{"driver": "null-co", "size": 1099511627776}' > out 2>&1 ||
    fail "1 TiB null-co does not open: $(cat out)"
exit 0
