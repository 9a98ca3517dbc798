#!/usr/bin/env bash
# --object on the command line of every tool (qemu-img's subcommands,
# vdisk io, both forms of vdisk serve): good objects are accepted and the
# command does what it does without them; bad ones (malformed values,
# unknown types, bad and duplicate ids, missing or unreadable secrets,
# throttle and authz rules) fail with QEMU's message and exit 1 before
# anything is created or written. QEMU's tools run the same command
# lines in a twin directory and are the referee.
source "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-nbd qemu-storage-daemon openssl timeout
tmpdir

T="timeout 60"

# ---- fixtures, copied fresh into q/ (QEMU) and v/ (vdisk) for each run ----
mkdir tmpl
(
    cd tmpl
    $QEMU_IMG create -q -f qcow2 base.qcow2 1M
    $QEMU_IO -c 'write -P 0x11 0 64k' base.qcow2 >/dev/null
    $QEMU_IMG create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
    $QEMU_IO -c 'write -P 0x22 64k 64k' top.qcow2 >/dev/null
    $QEMU_IMG create -q -f qcow2 img.qcow2 1M
    $QEMU_IO -c 'write -P 0x33 0 128k' img.qcow2 >/dev/null
    cp img.qcow2 img2.qcow2
    printf 'secret-from-file' > secret.txt
    printf 'aGVsbG8gd29ybGQ=' > secret.b64
)
(cd tmpl && md5sum ./* > ../tmpl.md5)

# An AES-256-CBC secret as QEMU takes it: the key is another secret's
# 32 bytes, the iv and the cipher text are base64.
key=$(openssl rand -hex 32)
iv=$(openssl rand -hex 16)
key64=$(printf '%s' "$key" | xxd -r -p | base64 -w0)
iv64=$(printf '%s' "$iv" | xxd -r -p | base64 -w0)
ct64=$(printf 'the password' |
       openssl enc -aes-256-cbc -K "$key" -iv "$iv" | base64 -w0)

# The program prefix of a message differs (qemu-img: / vdisk:); the rest
# must not.
norm()
{
    sed -E 's/^(qemu-img|qemu-io|qemu-nbd|qemu-storage-daemon|vdisk serve|vdisk io|vdisk): //' "$1"
}

# run_both NAME QEMU-PROGRAM VDISK-ARGS... -- ARGS...: runs
# "QEMU-PROGRAM ARGS" in a fresh q/ and "$VDISK VDISK-ARGS ARGS" in a
# fresh v/, then compares the exit status, the output and the error
# text. Sets $st to the common status.
n=0
run_both()
{
    local qprog=$1 vargs=() a
    shift
    while [ "$1" != "--" ]; do
        vargs+=("$1")
        shift
    done
    shift
    n=$((n + 1))
    rm -rf q v
    cp -a tmpl q
    cp -a tmpl v
    local qs=0 vs=0
    (cd q && $T "$qprog" "$@" > ../q.out 2> ../q.err) || qs=$?
    (cd v && $T "$VDISK" "${vargs[@]}" "$@" > ../v.out 2> ../v.err) || vs=$?
    [ "$vs" != 86 ] || fail "run $n: sanitizer report: $(cat v.err)"
    if [ "$qs" != "$vs" ]; then
        fail "run $n ($*): exit $vs, $qprog exits $qs:" \
             "$(cat v.err) / $(cat q.err)"
    fi
    if ! diff <(norm q.err) <(norm v.err) >&2; then
        fail "run $n ($*): messages differ from $qprog's"
    fi
    if ! diff q.out v.out >&2; then
        fail "run $n ($*): output differs from $qprog's"
    fi
    st=$qs
}

# After a refused command nothing may have changed or appeared.
untouched()
{
    (cd v && md5sum -c --quiet ../tmpl.md5) ||
        fail "run $n: vdisk changed a file after refusing: $*"
    [ "$(ls v | wc -l)" = "$(ls tmpl | wc -l)" ] ||
        fail "run $n: vdisk left new files after refusing: $(ls v)"
}

# ---- every qemu-img subcommand that has --object ----
# Each line: the subcommand and its arguments after the objects.
cat > commands <<'EOF'
amend -f qcow2 -o lazy_refcounts=on img.qcow2
check img.qcow2
commit top.qcow2
compare img.qcow2 img2.qcow2
convert -O qcow2 img.qcow2 out.qcow2
create -f qcow2 new.qcow2 1M
dd -O raw if=img.qcow2 of=dd.raw
info img.qcow2
map img.qcow2
measure -O qcow2 img.qcow2
rebase -u -b base.qcow2 -F qcow2 top.qcow2
resize img.qcow2 2M
snapshot -c sn img.qcow2
EOF

# Objects each command must take: "|" separates --object arguments.
good=(
    "secret,id=s0,data=hello"
    "secret,id=s0,file=secret.txt|secret,id=s1,file=secret.b64,format=base64"
    "secret,id=k,data=$key64,format=base64|secret,id=s,data=$ct64,format=base64,keyid=k,iv=$iv64"
    "throttle-group,id=t0,limits.bps-total=1048576,limits.iops-read=100,x-iops-write=5"
    "authz-simple,id=a0,identity=bob|authz-list,id=l0,policy=allow,rules.0.match=fred,rules.0.policy=deny,rules.1.match=bo*,rules.1.policy=allow,rules.1.format=glob"
    '{"qom-type": "secret", "id": "j0", "data": "json"}'
)
# Objects every command must refuse the same way.
bad_common=(
    "foo,id=x"
    "secret,id=1x,data=a"
    "secret,id=s0,data=a|secret,id=s0,data=b"
    "secret,id=s0,file=nonexist.txt"
    "throttle-group,id=t,x-bps-total=1,x-bps-read=1"
)
# ... and many more, tried with qemu-img info only.
bad_info=(
    "secret"
    "secret,data=x"
    "id=s0,data=x"
    "secret,id=s0"
    "secret,id=a b,data=x"
    "secret,id=s0,data=a,bogus=1"
    "secret,id=s0,data=a,format=xx"
    "secret,id=s0,data=a,file=/dev/null"
    "secret,id=s0,file=."
    "secret,id=s0,data=a,keyid=nokey"
    "secret,id=s0,data=x,keyid=s0"
    "secret,id=s0,data=a!,format=base64"
    "secret,id=s0,data=x,loaded=on"
    "secret,id=s0,data=x,loaded=maybe"
    "secret,id=s0,data=x,foo"
    "secret,id=s0,data.x=1"
    "secret,id=s0,=x"
    "secret,id=s0,1a=x"
    "secret,id=k,data=12345678901234567890123456789012|secret,id=s,data=abcd,keyid=k"
    "secret,id=k,data=123456789012345678901234567890|secret,id=s,data=abcd,keyid=k,iv=$iv64"
    "secret,id=k,data=12345678901234567890123456789012|secret,id=s,data=abcd,keyid=k,iv=AAAA"
    "secret,id=k,data=12345678901234567890123456789012|secret,id=s,data=abcd,keyid=k,iv=$iv64,format=base64"
    "secret,id=k,data=$key64,format=base64|secret,id=s,data=$ct64,keyid=k,iv=$iv64"
    "throttle-group,id=t,x-bps-total=abc"
    "throttle-group,id=t,x-bps-total=1k"
    "throttle-group,id=t,x-bps-total=-1"
    "throttle-group,id=t,x-iops-size=1"
    "throttle-group,id=t,x-bps-total=1000000000000001"
    "throttle-group,id=t,x-bps-total-max-length=0"
    "throttle-group,id=t,x-bps-total=10,x-bps-total-max-length=2"
    "throttle-group,id=t,x-bps-total=10,x-bps-total-max=1000000000000000,x-bps-total-max-length=2"
    "throttle-group,id=t,x-bps-total-max=10"
    "throttle-group,id=t,x-bps-total=10,x-bps-total-max=5"
    "throttle-group,id=t,x-bps-total-max-length=4294967296"
    "throttle-group,id=t,limits.bps-total=-1"
    "throttle-group,id=t,limits.bps-total-max-length=4294967296"
    "throttle-group,id=t,limits.bps-total=abc"
    "throttle-group,id=t,limits.foo=1"
    "throttle-group,id=t,limits=1"
    "throttle-group,id=t,limits.bps-total=1,limits.bps-total.x=1"
    "authz-simple,id=a"
    "authz-list,id=l,rules.0.match=fred"
    "authz-list,id=l,rules.1.match=fred,rules.1.policy=allow"
    "authz-list,id=l,rules=x"
    "authz-list,id=l,rules.x.match=fred"
    "authz-list,id=l,rules.0=fred"
    "authz-list,id=l,policy=maybe"
    "authz-list,id=l,rules.0.match=f,rules.0.policy=allow,rules.0.format=regex"
    "authz-list,id=l,rules.0.match=f,rules.0.policy=allow,rules.0.bar=1"
    "tls-creds-psk,id=p,dir=nodir,endpoint=client,verify-peer=1"
    "tls-creds-x509,id=x,dir=nodir,endpoint=middle"
    '{"qom-type": "secret", "id": "s0", "data": 5}'
    '{"qom-type": "secret", "id": "s0", "data": "x", "help": 1}'
    '{"qom-type": "throttle-group", "id": "t", "x-bps-total": 1.5}'
    '{"qom-type": "authz-list", "id": "l", "rules": [{"match": "a"}]}'
    '{"qom-type": "authz-list", "id": "l", "rules": [5]}'
)
# Unreadable files are readable to root.
if [ "$(id -u)" != 0 ]; then
    chmod 000 tmpl/secret.txt
    bad_info+=("secret,id=s0,file=secret.txt")
fi

objargs()
{
    local IFS='|' o
    objs=()
    for o in $1; do
        objs+=(--object "$o")
    done
}

while read -r cmd args; do
    # shellcheck disable=SC2086
    for o in "${good[@]}"; do
        objargs "$o"
        run_both qemu-img -- "$cmd" "${objs[@]}" $args
        [ "$st" = 0 ] || fail "$cmd refused good objects $o"
        # What the command wrote is the same as what qemu-img wrote.
        for f in q/*; do
            f=${f#q/}
            [ -e "v/$f" ] || fail "$cmd: vdisk did not make $f"
            case $f in *.qcow2|*.raw)
                $QEMU_IMG compare -q "q/$f" "v/$f" ||
                    fail "$cmd with objects: $f differs" ;;
            esac
        done
    done
    for o in "${bad_common[@]}"; do
        objargs "$o"
        run_both qemu-img -- "$cmd" "${objs[@]}" $args
        # qemu-img compare's errors are all status 2.
        [ "$st" = "$([ "$cmd" = compare ] && echo 2 || echo 1)" ] ||
            fail "$cmd accepted $o"
        untouched "$cmd $o"
    done
done < commands

for o in "${bad_info[@]}"; do
    objargs "$o"
    run_both qemu-img -- info "${objs[@]}" img.qcow2
    [ "$st" = 1 ] || fail "info accepted $o"
done

# ---- vdisk io (qemu-io) ----
for o in "${good[@]}"; do
    objargs "$o"
    run_both qemu-io io -- "${objs[@]}" -c 'read -q -P 0x33 0 64k' -c map \
        img.qcow2
done
for o in "${bad_common[@]}" "${bad_info[@]:0:12}"; do
    objargs "$o"
    run_both qemu-io io -- "${objs[@]}" -c 'write 0 64k' img.qcow2
    [ "$st" = 1 ] || fail "io accepted $o"
    untouched "io $o"
done

# ---- vdisk serve: qemu-nbd's form (bad objects stop it at start-up) ----
for o in "${bad_common[@]}" "${bad_info[@]:0:12}"; do
    objargs "$o"
    run_both qemu-nbd serve -- "${objs[@]}" -k "$PWD/nbd.sock" -f qcow2 \
        img.qcow2
    [ "$st" = 1 ] || fail "serve accepted $o"
    untouched "serve $o"
done

# ---- vdisk serve: qemu-storage-daemon's form ----
for o in "${bad_common[@]}" "${bad_info[@]:0:12}"; do
    objargs "$o"
    run_both qemu-storage-daemon serve -- "${objs[@]}" \
        --blockdev driver=file,node-name=f,filename=img.qcow2
    [ "$st" = 1 ] || fail "serve (daemon form) accepted $o"
    untouched "serve daemon $o"
done

# ---- types QEMU has and vdisk does not: refused by name ----
for t in main-loop iothread secret_keyring tls-creds-anon authz-listfile; do
    expect_status 1 "$VDISK" info --object "$t,id=x" tmpl/img.qcow2 \
        2> v.err
    grep -q "object type '$t' is not supported by vdisk" v.err ||
        fail "$t not refused by name: $(cat v.err)"
done

echo "$n command lines compared"
