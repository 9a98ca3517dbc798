#!/usr/bin/env bash
# Regression: under `ulimit -f` a write past the limit raised SIGXFSZ and killed vdisk io, vdisk convert and vdisk serve (dropping every NBD client) where qemu-io/qemu-img report "File too large" and qemu-nbd answers ENOSPC and keeps serving.
# Each command runs under the same 1 MiB file-size limit as its QEMU peer;
# outputs, exit statuses and the files left behind must match.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-nbd timeout python3
tmpdir

# bash counts `ulimit -f` in 1024-byte blocks: 1 MiB.
LIMIT_BLOCKS=1024
QEMU_NBD=${QEMU_NBD:-qemu-nbd}

# under_limit CMD ARGS...: run CMD with the file-size limit in a subshell.
under_limit()
{
    (ulimit -f $LIMIT_BLOCKS && exec "$@")
}

# A death by signal shows as status > 128 (SIGXFSZ: 153).
not_killed()
{
    [ "$1" -lt 128 ] || fail "$2 was killed by a signal (status $1)"
}

# Timings vary between runs; everything else must match.
norm() { sed -e 's/ops; .*/ops;/' "$@"; }

# ---- vdisk io: each failing write reports EFBIG, the script goes on -----

for fmt in raw qcow2; do
    $QEMU_IMG create -q -f $fmt q.$fmt 4M
    $QEMU_IMG create -q -f $fmt v.$fmt 4M
    # within the limit; straddling it; past it; reads after the failures
    cmds=(-c 'write -P 0x11 0 512k' -c 'write -P 0x22 1020k 8k'
          -c 'write -P 0x33 2M 64k' -c 'write -z 3M 64k'
          -c 'read -P 0x11 0 512k' -c 'write -P 0x44 512k 4k')
    qrc=0
    vrc=0
    under_limit timeout 60 $QEMU_IO -f $fmt "${cmds[@]}" q.$fmt \
        > q.out 2> q.err || qrc=$?
    under_limit timeout 60 "$VDISK" io -f $fmt "${cmds[@]}" v.$fmt \
        > v.out 2> v.err || vrc=$?
    not_killed "$vrc" "vdisk io ($fmt)"
    [ "$qrc" = "$vrc" ] || fail "io $fmt: qemu-io $qrc, vdisk io $vrc"
    grep -q 'write failed: File too large' q.out ||
        fail "qemu-io did not hit the limit: $(cat q.out)"
    diff -u <(norm q.out) <(norm v.out) || fail "io $fmt: output differs"
    # vdisk's stderr adds the file and the request to each failure
    grep -q 'File too large' v.err || fail "io $fmt: no detail: $(cat v.err)"
    assert_same_content -f $fmt -F $fmt q.$fmt v.$fmt
    if [ $fmt = qcow2 ]; then
        $QEMU_IMG check q.qcow2 > q.chk
        $QEMU_IMG check v.qcow2 > v.chk || fail "v.qcow2: $(cat v.chk)"
        diff -u q.chk v.chk || fail "qcow2 check differs after EFBIG"
    fi
done

# ---- vdisk convert: the error names the byte and EFBIG, exit 1 ----------

$QEMU_IMG create -q -f raw src.raw 4M
$QEMU_IO -f raw -c 'write -P 0x5a 0 4M' src.raw > /dev/null
# The files left behind compare at -m 1, where vdisk writes qemu-img's
# 2 MiB chunks whole, as qemu-img at any -m (at the default -m 8 vdisk
# writes 256 KiB pieces, the first ones under the limit).
for args in "-O raw src.raw out.raw" "-O qcow2 src.raw out.qcow2" \
            "-n -O raw src.raw pre.raw" "-m 1 -O raw src.raw out.raw" \
            "-m 1 -O qcow2 src.raw out.qcow2" \
            "-m 1 -n -O raw src.raw pre.raw"; do
    for who in q v; do
        rm -rf "$who" && mkdir "$who"
        $QEMU_IMG create -q -f raw "$who/pre.raw" 4M
        cp src.raw "$who/"
    done
    qrc=0
    vrc=0
    # shellcheck disable=SC2086
    (cd q && under_limit timeout 60 $QEMU_IMG convert $args) \
        > q.out 2>&1 || qrc=$?
    # shellcheck disable=SC2086
    (cd v && under_limit timeout 60 "$VDISK_QEMU_IMG" convert $args) \
        > v.out 2>&1 || vrc=$?
    not_killed "$vrc" "vdisk convert $args"
    [ "$qrc" = "$vrc" ] || fail "convert $args: qemu-img $qrc, vdisk $vrc"
    [ "$qrc" = 1 ] || fail "qemu-img convert $args did not hit the limit"
    diff -u q.out v.out || fail "convert $args: messages differ"
    [ "${args#-m 1 }" != "$args" ] || continue
    for f in q/*; do
        cmp "$f" "v/${f#q/}" || fail "convert $args: ${f#q/} differs"
    done
done

# ---- vdisk serve: ENOSPC to the client, the server keeps serving --------

# The servers are normally stopped already when the clean-up runs.
quiet_kill() { kill "$1" 2>/dev/null || true; }

# serve_and_write TAG SERVER-PROG ARGS...: start the server under the
# limit in the background, have qemu-io write within and past the limit
# on one connection and read on a second one, then stop the server.
serve_and_write()
{
    local tag=$1 pid i st=0
    shift
    rm -f "$tag.sock"
    $QEMU_IMG create -q -f raw "$tag.img" 4M
    # The subshell execs the server, so $! is the server itself; it gets
    # none of the test's descriptors (meson would wait for them).
    (ulimit -f $LIMIT_BLOCKS && exec "$@" -k "$PWD/$tag.sock" "$tag.img") \
        > "$tag.srv" 2>&1 19>&- &
    pid=$!
    cleanup_fn quiet_kill "$pid"
    for ((i = 0; i < 200; i++)); do
        [ -S "$tag.sock" ] && break
        sleep 0.1
    done
    [ -S "$tag.sock" ] || fail "$tag: no socket: $(cat "$tag.srv")"
    local url="nbd+unix:///?socket=$PWD/$tag.sock"
    timeout 60 $QEMU_IO -f raw -c 'write -P 0x61 0 64k' \
        -c 'write -P 0x62 2M 64k' -c 'write -P 0x63 1M 4k' \
        -c 'read -P 0x61 0 64k' -c 'write -P 0x64 64k 4k' "$url" \
        > "$tag.out" 2>&1 || st=$?
    echo "status $st" >> "$tag.out"
    # a second client after the failures: the server is still there
    st=0
    timeout 60 $QEMU_IO -f raw -c 'read -P 0x64 64k 4k' \
        -c 'write -P 0x65 3M 4k' "$url" >> "$tag.out" 2>&1 || st=$?
    echo "status $st" >> "$tag.out"
    kill -0 "$pid" 2>/dev/null || fail "$tag: server died: $(cat "$tag.srv")"
    kill "$pid"
    st=0
    wait "$pid" || st=$?
    # SIGTERM is how it was asked to stop; SIGXFSZ would be 128 + 25
    [ "$st" != 153 ] || fail "$tag server died from SIGXFSZ"
}

serve_and_write q $QEMU_NBD -t -f raw
grep -q 'No space left on device' q.out ||
    fail "qemu-nbd did not answer ENOSPC: $(cat q.out)"
serve_and_write v "$VDISK" serve -t -f raw
diff -u <(norm q.out) <(norm v.out) || fail "serve: client output differs"
cmp q.img v.img || fail "serve: images differ"
