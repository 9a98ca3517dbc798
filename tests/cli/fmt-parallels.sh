#!/usr/bin/env bash
# The parallels driver against qemu-img 7.2: images qemu makes (cluster
# sizes 1M, 64k, an odd 1000 rounded to 1024, qemu-io writes) read
# identically by vdisk; images vdisk makes and writes are byte-identical
# to qemu's and pass qemu-img check; info, check (clean, unclean, leaks,
# clusters outside the file, with and without -r), map, create, convert
# and the refusals print what qemu-img prints; a corruption corpus fails
# cleanly and changes nothing.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
source "$(dirname "$0")/fmt-functions.bash"
requires qemu-img qemu-io python3
tmpdir

writes=(-c 'write -P 0x11 0 4k' -c 'write -P 0x22 3M 1M'
        -c 'write -P 0x33 1536k 700k' -c 'write -P 0x44 9215k 1k')

for opts in "" "-o cluster_size=64k" "-o cluster_size=1000"; do
    rm -f q.hds v.hds
    # shellcheck disable=SC2086
    $QEMU_IMG create -f parallels $opts q.hds 9M > q.out
    # shellcheck disable=SC2086
    $VDISK_QEMU_IMG create -f parallels $opts v.hds 9M > v.out
    sed -i 's/q\.hds/v.hds/' q.out
    diff -u q.out v.out || fail "create $opts: messages differ"
    cmp q.hds v.hds || fail "create $opts: files differ"
    $QEMU_IO -f parallels "${writes[@]}" q.hds >/dev/null
    $VDISK io -f parallels "${writes[@]}" v.hds >/dev/null
    cmp q.hds v.hds || fail "write $opts: files differ"
    $QEMU_IMG check v.hds
    # qemu's image read by vdisk.
    $QEMU_IMG convert -O raw q.hds q.raw
    $VDISK convert -O raw q.hds v.raw
    cmp q.raw v.raw || fail "$opts: reads differ"
    for args in "info" "info --output=json" "check" "check --output=json" \
                "map" "map --output=json"; do
        # shellcheck disable=SC2086
        same $args q.hds
    done
    # convert -O parallels with the same options, both ways.
    rm -f cq.hds cv.hds
    # shellcheck disable=SC2086
    $QEMU_IMG convert -f raw -O parallels $opts q.raw cq.hds
    # shellcheck disable=SC2086
    $VDISK convert -f raw -O parallels $opts q.raw cv.hds
    cmp cq.hds cv.hds || fail "convert $opts differs"
done
$VDISK io -f parallels -c 'read -P 0x22 3M 1M' -c 'read -P 0 2236k 836k' \
    q.hds >/dev/null
$VDISK convert -O qcow2 q.hds q.qcow2
$VDISK convert -O parallels q.qcow2 back.hds
assert_same_content -f parallels -F parallels q.hds back.hds

same create -f parallels -o help
same create -f parallels -o preallocation=metadata pm.hds 3M
same create -f parallels -o preallocation=full pf.hds 3M
same create -f parallels -o cluster_size=0 c0.hds 1M
same create -f parallels -o cluster_size=2G c2.hds 2T
same create -f parallels -o cluster_size=512 c5.hds 2T
same create -f parallels -b q.hds bk.hds
same create -f parallels empty.hds 0
same measure -O parallels --size 1G
same resize q.hds 20M
same amend -o cluster_size=4k q.hds
rm -f ./*.hds

# --- check: unclean, leaked space, clusters outside the file ----------------
$QEMU_IMG create -f parallels -o cluster_size=64k base.img 4M >/dev/null
$QEMU_IO -f parallels -c 'write -P 0x55 0 200k' base.img >/dev/null
cp base.img unclean.img; poke unclean.img 44 4 0x746f6e59
cp base.img leak.img; truncate -s +300k leak.img
cp base.img outside.img; poke outside.img 72 4 1000
for name in unclean leak outside; do
    same check "$name.img"
    same check --output=json "$name.img"
done
split_dirs
for name in unclean leak outside; do
    same_rw check -r all "$name.img"
    cmp "q/$name.img" "v/$name.img" || fail "check -r all $name: files differ"
done
split_dirs
same_rw check -r leaks leak.img
cmp q/leak.img v/leak.img || fail "check -r leaks: files differ"
# An image left in use: writers refused with qemu's message.
cp unclean.img u.orig
$QEMU_IO -f parallels -c 'write 0 512' unclean.img > q.out 2>&1 || true
$VDISK_QEMU_IO -f parallels -c 'write 0 512' unclean.img > v.out 2>&1 || true
diff -u q.out v.out || fail "unclean image: writers differ"
cmp unclean.img u.orig || fail "unclean image changed"

# --- corruption corpus ------------------------------------------------------
# NAME OFFSET WIDTH VALUE: the same error as qemu-img (its checks).
same_header_faults base.img parallels \
    "magic 0 4 0x41414141" \
    "version 16 4 3" \
    "tracks0 28 4 0" \
    "tracksbig 28 4 0x7fffffff" \
    "catalog 32 4 0x40000000"
# vdisk's own: a BAT past the end of the file (QEMU reads zeros for it),
# an absurd virtual size.
cp base.img bateof.img; poke bateof.img 32 4 0x10000000
check_refused bateof "beyond the end of the file" info -f parallels
cp base.img hugesize.img; poke hugesize.img 36 8 0x4000000000000000
check_refused hugesize "too large" info -f parallels
# Entries into the header, shared clusters, a disk larger than the BAT:
# qemu reads them alike, vdisk refuses to write.
cp base.img inhdr.img; poke inhdr.img 48 4 256
cp base.img shared.img; poke shared.img 68 4 1
cp base.img beyond.img; poke beyond.img 36 8 0x2800
for name in inhdr shared beyond; do
    same check "$name.img"
    $QEMU_IMG convert -O raw "$name.img" "$name.q.raw"
    $VDISK convert -O raw "$name.img" "$name.v.raw"
    cmp "$name.q.raw" "$name.v.raw" || fail "$name: reads differ"
    check_refused "$name" "cannot be opened for writing" \
        io -f parallels -c 'write 0 512'
done
head -c 40 base.img > short.img
same info -f parallels short.img

# A backing file given at open (QEMU's driver takes one): unallocated
# clusters read from it and a new cluster starts as its copy.
$QEMU_IMG create -f raw bk.raw 4M >/dev/null
$QEMU_IO -f raw -c 'write -P 0x66 0 4M' bk.raw >/dev/null
$QEMU_IMG create -f parallels -o cluster_size=64k qo.hds 4M >/dev/null
cp qo.hds vo.hds
cow=(-c 'write -P 0x77 70k 1k' -c 'read -P 0x66 64k 6k'
     -c 'read -P 0x77 70k 1k' -c 'read -P 0x66 71k 57k'
     -c 'read -P 0x66 1M 64k')
json() {
    echo "json:{\"driver\": \"parallels\", \"file\": {\"driver\": \"file\"," \
         "\"filename\": \"$1\"}, \"backing\": {\"driver\": \"raw\"," \
         "\"file\": {\"driver\": \"file\", \"filename\": \"bk.raw\"}}}"
}
$QEMU_IO "${cow[@]}" "$(json qo.hds)" >/dev/null
$VDISK_QEMU_IO "${cow[@]}" "$(json vo.hds)" > out
grep -q "Pattern verification failed" out && fail "backing reads differ"
cmp qo.hds vo.hds || fail "copy from the backing file differs"
