#!/usr/bin/env bash
# The vdi driver against qemu-img 7.2: images qemu makes (dynamic, static,
# qemu-io writes) read identically by vdisk; images vdisk makes and writes
# pass qemu-img check, compare equal and match qemu's own byte for byte
# but for the two random UUIDs; info, check, map, create, convert and the
# refusals (measure, resize, amend, check -r, preallocation) print what
# qemu-img prints; a corruption corpus fails cleanly and changes nothing.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
source "$(dirname "$0")/fmt-functions.bash"
requires qemu-img qemu-io python3
tmpdir

# The file without its UUIDs (0x188..0x1c8), which qemu draws at random.
no_uuid()
{
    python3 - "$1" <<'EOF'
import sys
d = bytearray(open(sys.argv[1], "rb").read())
d[0x188:0x1a8] = bytes(32)
sys.stdout.buffer.write(d)
EOF
}

writes=(-c 'write -P 0x11 0 4k' -c 'write -P 0x22 3M 1M'
        -c 'write -P 0x33 1536k 700k' -c 'write -P 0x44 9215k 1k')

# --- qemu's images, read by vdisk -----------------------------------------
$QEMU_IMG create -f vdi dyn.img 9M >/dev/null
$QEMU_IMG create -f vdi -o static=on stat.img 9M >/dev/null
$QEMU_IMG create -f vdi empty.img 0 >/dev/null
$QEMU_IMG create -f vdi odd.img 1000001 >/dev/null
for img in dyn.img stat.img; do
    $QEMU_IO -f vdi "${writes[@]}" "$img" >/dev/null
done
for img in dyn.img stat.img empty.img odd.img; do
    $QEMU_IMG convert -f vdi -O raw "$img" "$img.q.raw"
    $VDISK convert -f vdi -O raw "$img" "$img.v.raw"
    cmp "$img.q.raw" "$img.v.raw" || fail "$img reads differently"
    same info "$img"
    same info --output=json "$img"
    same check "$img"
    same check --output=json "$img"
    same map "$img"
    same map --output=json "$img"
    same compare "$img" "$img.q.raw"
done
# vdisk io reads what qemu-io wrote.
$VDISK io -f vdi -c 'read -P 0x22 3M 1M' -c 'read -P 0x33 1536k 700k' \
    -c 'read -P 0 2236k 836k' dyn.img >/dev/null

# --- vdisk's images, checked by qemu ---------------------------------------
for opts in "" "-o static=on" "-o static=off"; do
    rm -f q.vdi v.vdi
    # shellcheck disable=SC2086
    $QEMU_IMG create -f vdi $opts q.vdi 9M > q.out
    # shellcheck disable=SC2086
    $VDISK_QEMU_IMG create -f vdi $opts v.vdi 9M > v.out
    sed -i 's/q\.vdi/v.vdi/' q.out
    diff -u q.out v.out || fail "create $opts: messages differ"
    cmp <(no_uuid q.vdi) <(no_uuid v.vdi) || fail "create $opts: files differ"
    $QEMU_IO -f vdi "${writes[@]}" q.vdi >/dev/null
    $VDISK io -f vdi "${writes[@]}" v.vdi >/dev/null
    cmp <(no_uuid q.vdi) <(no_uuid v.vdi) || fail "write $opts: files differ"
    $QEMU_IMG check v.vdi
    assert_same_content q.vdi v.vdi
    $QEMU_IMG info --output=json q.vdi > qi.json
    $QEMU_IMG info --output=json v.vdi > vi.json
    json_equal_filtered qi.json vi.json filename actual-size
done

# convert -O vdi with its options, from a raw source with holes.
$QEMU_IMG convert -f vdi -O raw dyn.img src.raw
for opts in "" "-o static=on"; do
    rm -f cq.vdi cv.vdi
    # shellcheck disable=SC2086
    $QEMU_IMG convert -f raw -O vdi $opts src.raw cq.vdi
    # shellcheck disable=SC2086
    $VDISK convert -f raw -O vdi $opts src.raw cv.vdi
    cmp <(no_uuid cq.vdi) <(no_uuid cv.vdi) || fail "convert $opts differs"
    $QEMU_IMG check cv.vdi
    assert_same_content -f raw -F vdi src.raw cv.vdi
done
# vdi to vdi through vdisk, and to qcow2 and back.
$VDISK convert -O qcow2 dyn.img d.qcow2
$VDISK convert -O vdi d.qcow2 back.vdi
assert_same_content -f vdi -F vdi dyn.img back.vdi

# The options and refusals, word for word (messages under qemu-img's name).
same create -f vdi -o help
same create -f vdi -o preallocation=metadata pm.vdi 3M
same create -f vdi -o preallocation=falloc,static=on pf.vdi 3M
same create -f vdi -o preallocation=full pfull.vdi 3M
same create -f vdi -o bogus=1 bog.vdi 3M
same create -f vdi -o static=maybe sm.vdi 3M
same create -f vdi huge.vdi 1P
same measure -O vdi --size 1G
same resize dyn.img 20M
same amend -o static=on dyn.img
same check -r all dyn.img
rm -f ./*.vdi

# --- corruption corpus ------------------------------------------------------
$QEMU_IMG create -f vdi base.img 4M >/dev/null
$QEMU_IO -f vdi -c 'write -P 0x55 0 1536k' base.img >/dev/null
# NAME OFFSET WIDTH VALUE: the same error as qemu-img (its checks).
qemu_cases=(
    "sig 0x40 4 0x12345678"
    "version 0x44 4 0x00020000"
    "bmapalign 0x154 4 0x201"
    "dataalign 0x158 4 0x401"
    "sector 0x168 4 4096"
    "blocksize 0x178 4 0x200000"
    "disksize 0x170 8 0x500000"
    "hugedisk 0x170 8 0x4000000000000"
    "link 0x1a8 4 1"
    "parent 0x1b8 4 1"
    "manyblocks 0x180 4 0x40000000"
)
same_header_faults base.img vdi "${qemu_cases[@]}"
# vdisk's own checks: tables beyond the file, overlapping the header or
# each other (qemu reads through them), an inconsistent map under a
# writer. Each error names the file and the fault; nothing is written.
cp base.img bmapeof.img; poke bmapeof.img 0x154 4 0x10000000
check_refused bmapeof "beyond the end of the file" info -f vdi
cp base.img bigmap.img; poke bigmap.img 0x180 4 0x1fffff00
check_refused bigmap "beyond the end of the file" info -f vdi
cp base.img bmaphdr.img; poke bmaphdr.img 0x154 4 0
check_refused bmaphdr "overlaps the header" info -f vdi
cp base.img dataover.img; poke dataover.img 0x158 4 0x200
check_refused dataover "overlaps" info -f vdi
# Map entries used twice, past the allocated count, or a count too low:
# qemu reads and checks them (same output), vdisk refuses to write.
cp base.img dup.img; poke dup.img 0x204 4 0
cp base.img past.img; poke past.img 0x208 4 3
cp base.img count.img; poke count.img 0x184 4 1
cp base.img large.img; poke large.img 0x200 4 0x100
for name in dup past count large; do
    same check "$name.img"
    same check --output=json "$name.img"
    $QEMU_IMG convert -O raw "$name.img" "$name.q.raw"
    $VDISK convert -O raw "$name.img" "$name.v.raw"
    cmp "$name.q.raw" "$name.v.raw" || fail "$name: reads differ"
    check_refused "$name" "cannot be opened for writing" \
        io -f vdi -c 'write 0 512'
done
# A file shorter than a header.
head -c 100 base.img > short.img
same info -f vdi short.img
