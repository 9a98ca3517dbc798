#!/usr/bin/env bash
# amend --dry-run of LUKS key slots said nothing of them (it listed the encrypt.* options as given and left their checks, which need the secrets, to the real run): a dry run passed where the real amend then refused.
# Now the dry run makes every check of the real amend, the secrets tried
# on the key slots: for qcow2 (encrypt.*) and the luks format, each case's
# verdict and message equal qemu-img amend's real run on a copy, the key
# slots the dry run lists as changing are those qemu-img info shows
# changed after qemu-img's amend, and the file stays byte-identical.
# (An iter-time too long for a slot's iteration count passed the dry run
# too: it is measured, as the real amend measures it.)
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/fmt-functions.bash"
requires qemu-img python3 sha256sum
tmpdir

SEC=(--object secret,id=sec0,data=QcowPass --object secret,id=sec1,data=Other)

# opts FORMAT FILE [SECRET]: --image-opts for the image.
opts()
{
    if [ "$1" = qcow2 ]; then
        echo "driver=qcow2,encrypt.key-secret=${3:-sec0},file.filename=$2"
    else
        echo "driver=luks,key-secret=${3:-sec0},file.filename=$2"
    fi
}

# slots FORMAT FILE: "slots[N].active=true|false", one a line, as
# qemu-img info reports them.
slots()
{
    $QEMU_IMG info --output=json -f "$1" "$2" | python3 -c 'import json,sys
d = json.load(sys.stdin)["format-specific"]["data"]
d = d["encrypt"] if "encrypt" in d else d
for i, s in enumerate(d["slots"]):
    print("slots[%d].active=%s" % (i, "true" if s["active"] else "false"))'
}

# try FORMAT IMAGE SECRET [--force] -- OPTIONS: the dry run against
# qemu-img's real amend of a copy.
try()
{
    local fmt=$1 img=$2 secret=$3 force=() prefix=
    shift 3
    [ "$1" = --force ] && { force=(--force); shift; }
    shift   # --
    [ "$fmt" = qcow2 ] && prefix=encrypt.
    local o=$1 sum vs=0 qs=0
    sum=$(sha256sum < "$img")
    "$VDISK" amend --dry-run --output=json "${force[@]}" "${SEC[@]}" \
        --image-opts "$(opts "$fmt" "$img" "$secret")" -o "$o" \
        > plan.json 2> v.err || vs=$?
    [ "$(sha256sum < "$img")" = "$sum" ] ||
        fail "$fmt -o $o: the dry run changed the image"
    cp "$img" q.img
    slots "$fmt" q.img > before
    qemu_img_pbkdf amend "${force[@]}" "${SEC[@]}" \
        --image-opts "$(opts "$fmt" q.img "$secret")" -o "$o" || qs=$?
    [ "$vs" = "$qs" ] ||
        fail "$fmt -o $o: dry run exit $vs, qemu-img amend $qs: $(cat v.err qemu.err)"
    if [ "$qs" != 0 ]; then
        # PBKDF iteration counts are measured (7 digits and more differ
        # from run to run); qemu-img's hint line ends without a newline.
        sed "s/^vdisk: /qemu-img: /; s/q\.img/$img/g; s/[0-9]\{7,\}/N/g" \
            v.err > v.msg
        sed "s/q\.img/$img/g; s/[0-9]\{7,\}/N/g; \$a\\" qemu.err > q.msg
        diff -u q.msg v.msg || fail "$fmt -o $o: messages differ"
        return
    fi
    slots "$fmt" q.img > after
    join -t= before after |
        awk -F= -v p="$prefix" '$2 != $3 { print p $1 ": " $2 " -> " $3 }' \
        > expect
    python3 -c 'import json,sys
for c in json.load(open(sys.argv[1]))["changes"]:
    if c["old"] != c["new"]:
        print("%s: %s -> %s" % (c["option"], c["old"], c["new"]))' \
        plan.json > got
    diff -u expect got || fail "$fmt -o $o: the planned slots differ"
    [ -s expect ] || fail "$fmt -o $o: qemu-img changed no slot"
}

qemu_img_pbkdf create -q -f qcow2 "${SEC[@]}" \
    -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10 \
    one.qcow2 1M || fail "create: $(cat qemu.err)"
qemu_img_pbkdf create -q -f luks "${SEC[@]}" \
    -o key-secret=sec0,iter-time=10 one.luks 1M ||
    fail "create: $(cat qemu.err)"
# A second active slot (sec1 in slot 1), made by qemu-img.
for f in qcow2 luks; do
    cp one.$f two.$f
    [ $f = qcow2 ] && p=encrypt. || p=
    qemu_img_pbkdf amend "${SEC[@]}" --image-opts "$(opts $f two.$f)" \
        -o ${p}state=active,${p}new-secret=sec1,${p}iter-time=10 ||
        fail "amend: $(cat qemu.err)"
done

for f in qcow2 luks; do
    [ $f = qcow2 ] && p=encrypt. || p=
    # Accepted: a new slot, an erase by password and by index, the
    # only slot with --force.
    try $f one.$f sec0 -- ${p}state=active,${p}new-secret=sec1,${p}iter-time=10
    try $f two.$f sec0 -- ${p}state=inactive,${p}old-secret=sec1
    try $f two.$f sec1 -- ${p}state=inactive,${p}keyslot=0
    try $f one.$f sec0 --force -- ${p}state=inactive,${p}keyslot=0
    # Refused, each only with the secrets or the slots in hand.
    try $f one.$f sec0 -- ${p}state=inactive,${p}old-secret=sec1
    try $f one.$f sec0 -- ${p}state=inactive,${p}keyslot=0
    try $f two.$f sec0 -- ${p}state=inactive,${p}old-secret=sec0,${p}keyslot=1
    try $f two.$f sec0 -- ${p}state=active,${p}new-secret=sec1,${p}keyslot=1
    try $f one.$f sec0 -- ${p}state=active,${p}new-secret=nosuch
    try $f one.$f sec0 -- ${p}state=inactive,${p}keyslot=0,${p}new-secret=sec1
    # Refused only once the PBKDF speed is measured: more iterations
    # than a slot holds (qemu-img's hint names the slot).
    try $f one.$f sec0 -- ${p}state=active,${p}new-secret=sec1,${p}iter-time=10000000000
done
echo ok
