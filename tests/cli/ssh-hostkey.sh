#!/usr/bin/env bash
# The ssh driver's host key checks against a throwaway sshd, each compared
# with QEMU's ssh driver on the same URI or options: host_key_check=no,
# md5/sha1/sha256 hashes (right, wrong, with ':' separators; URI and
# blockdev forms) and known_hosts (missing entry, right key, changed key,
# only a key of another type) in a generated known_hosts file.
source "$(dirname "$0")/../functions.sh"
source "$(dirname "$0")/cli-functions.bash"
source "$(dirname "$0")/ssh-server.bash"
requires qemu-img
ssh_test_begin
U=$SSH_URI_BASE$D/a.raw
$QEMU_IMG create -q -f raw "$U?host_key_check=no" 1M

# A wrong hash: the right one with its first digit changed.
wrong()
{
    local h=$1
    printf '%x%s' $(((0x${h:0:1} + 1) % 16)) "${h:1}"
}

same info "$U?host_key_check=sha256:$SSH_SHA256"
same info "$U?host_key_check=sha256:$(wrong "$SSH_SHA256")"
same info "$U?host_key_check=sha1:$SSH_SHA1"
same info "$U?host_key_check=sha1:$(wrong "$SSH_SHA1")"
same info "$U?host_key_check=md5:$(echo "$SSH_MD5" | sed 's/../&:/g; s/:$//')"
same info "$U?host_key_check=md5:$(wrong "$SSH_MD5")"
# Too short a hash is wrong too, and an unknown mode is refused.
same info "$U?host_key_check=sha256:${SSH_SHA256:0:20}"
same info "$U?host_key_check=sha512:$SSH_SHA256"

hkc()
{
    echo "json:{\"driver\":\"raw\",\"file\":{\"driver\":\"ssh\",\"server\":{\"host\":\"127.0.0.1\",\"port\":\"$SSH_PORT\"},\"path\":\"$D/a.raw\",\"user\":\"root\",\"host-key-check\":$1}}"
}
same info "$(hkc "{\"mode\":\"hash\",\"type\":\"sha256\",\"hash\":\"$SSH_SHA256\"}")"
same info "$(hkc "{\"mode\":\"hash\",\"type\":\"sha1\",\"hash\":\"$(wrong "$SSH_SHA1")\"}")"

# Malformed options are refused before connecting, with QEMU's words.
for opt in '"host-key-check":{"mode":"bogus"}' \
           '"host-key-check":{"mode":"hash","type":"sha512","hash":"ab"}' \
           '"host-key-check":{"mode":"hash","type":"md5"}' \
           '"host-key-check":{"mode":"hash","hash":"ab"}' \
           '"host-key-check":{"mode":"none","type":"md5"}'; do
    same info "json:{\"driver\":\"ssh\",\"server\":{\"host\":\"127.0.0.1\",\"port\":\"$SSH_PORT\"},\"path\":\"$D/a.raw\",$opt}"
done
for loc in '"path":"/x"' '"server":{"host":"127.0.0.1","port":"1"}' \
           '"server":{"host":"127.0.0.1","port":"ab"},"path":"/x"' \
           '"server":{"host":"127.0.0.1"},"path":"/x"'; do
    same info "json:{\"driver\":\"ssh\",$loc}"
done

# known_hosts: the user's ~/.ssh/known_hosts, which libssh finds through
# the password database; a private mount namespace puts ours there.
in_home_requires
same_home()
{
    local qrc=0 vrc=0
    in_home "$QEMU_IMG" "$@" > q.out 2>&1 || qrc=$?
    in_home "$VDISK_QEMU_IMG" "$@" > v.out 2>&1 || vrc=$?
    _compare_runs "$qrc" "$vrc" "$@"
}
same_home info "$U"
ssh_known_hosts
same_home info "$U"
same_home info "$U?host_key_check=yes"
grep -q '^image:' v.out || fail "known_hosts with the right key refused"
# The server's key changed: another ed25519 key for the same host.
ssh-keygen -q -t ed25519 -N '' -f other_key
ssh_known_hosts other_key.pub
same_home info "$U"
grep -q 'does not match the one in known_hosts' v.out ||
    fail "a changed host key was not refused"
# Only a key of another type is known.
ssh-keygen -q -t ecdsa -N '' -f ecdsa_key
ssh_known_hosts ecdsa_key.pub
same_home info "$(hkc '{"mode":"known_hosts"}')"
exit 0
