#!/usr/bin/env bash
# convert -B refused '-o backing_fmt=' as the backing format (qemu-img takes -B and -F as the options backing_file and backing_fmt) and worded its backing-file checks differently.
# Every combination of -B, -F, -o backing_file/backing_fmt, -n and
# --target-is-zero, several sources and raw targets: the same messages,
# exit status and target (or none) as qemu-img 7.2.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
requires qemu-img qemu-io
tmpdir

$QEMU_IMG create -q -f qcow2 a.qcow2 1M
$QEMU_IO -c 'write -q -P 1 0 64k' a.qcow2
$QEMU_IMG create -q -f qcow2 -b a.qcow2 -F qcow2 b.qcow2
$QEMU_IO -c 'write -q -P 2 64k 64k' b.qcow2
split_dirs

while IFS= read -r args; do
    [ -n "$args" ] || continue
    rm -f q/out.img v/out.img
    same_rw convert $args
    if [ -e q/out.img ]; then
        [ -e v/out.img ] || fail "no target for: $args"
        assert_same_content q/out.img v/out.img >/dev/null
        json_equal_filtered <($QEMU_IMG info --output=json q/out.img) \
                            <($QEMU_IMG info --output=json v/out.img) \
                            filename actual-size full-backing-filename ||
            fail "info differs for: $args"
    else
        [ ! -e v/out.img ] || fail "target created for: $args"
    fi
done <<'EOF2'
-O qcow2 -B a.qcow2 -F qcow2 b.qcow2 out.img
-O qcow2 -B a.qcow2 -o backing_fmt=qcow2 b.qcow2 out.img
-O qcow2 -o backing_file=a.qcow2,backing_fmt=qcow2 b.qcow2 out.img
-O qcow2 -B a.qcow2 b.qcow2 out.img
-O qcow2 -o backing_file=a.qcow2 b.qcow2 out.img
-O qcow2 -B a.qcow2 -F qcow2 a.qcow2 b.qcow2 out.img
-O qcow2 -o backing_file=a.qcow2 a.qcow2 b.qcow2 out.img
-O qcow2 -F qcow2 b.qcow2 out.img
-O qcow2 -o backing_fmt=qcow2 b.qcow2 out.img
-O qcow2 -B a.qcow2 -F qcow2 -o backing_fmt=raw b.qcow2 out.img
-O qcow2 -B a.qcow2 -F foo b.qcow2 out.img
-O raw -B a.qcow2 -F qcow2 b.qcow2 out.img
-O raw -F qcow2 b.qcow2 out.img
-O raw -o backing_fmt=qcow2 b.qcow2 out.img
-O qcow2 -c -o preallocation=metadata b.qcow2 out.img
-O raw -c b.qcow2 out.img
-l snap a.qcow2 b.qcow2 out.img
-l snap a.qcow2 missing.qcow2 out.img
EOF2
