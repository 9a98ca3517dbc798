#!/usr/bin/env bash
# The bash completion (contrib/vdisk.bash) completes what vdisk takes:
# subcommands by prefix, each subcommand's options (from the hidden
# `vdisk --list-options`, so a new option is completed without editing
# the script), format names after -f/-O/--format= (from vdisk --help's
# list), and file names elsewhere.
source "$(dirname "$0")/../functions.sh"
src=${VDISK_SRCDIR:-$(cd "$(dirname "$0")/../.." && pwd)}
tmpdir

touch disk-a.qcow2 disk-b.raw

# complete WORD...: runs the completion function as bash would for the
# command line WORD... (the last word is the one being completed) and
# prints COMPREPLY one per line, sorted.
complete_words()
{
    bash --norc --noprofile -c '
        source "$1"; shift
        COMP_WORDS=("$@")
        COMP_CWORD=$(($# - 1))
        _vdisk
        printf "%s\n" "${COMPREPLY[@]}" | sort' \
        complete "$src/contrib/vdisk.bash" "$@"
}

# expect WANT WORD...: the completions are exactly WANT (space-separated).
expect()
{
    local want=$1 got
    shift
    got=$(complete_words "$@" | paste -sd' ')
    [ "$got" = "$want" ] || fail "completing '$*': got '$got', want '$want'"
}

# Subcommands by prefix ("help" is one too), against the commands
# `vdisk --help` lists.
co=$("$VDISK" --help | sed -n '/^Command syntax:/,/^$/s/^  \(co[a-z-]*\) .*/\1/p' |
     sort -u | paste -sd' ')
case " $co " in *" commit "*" convert "*) ;; *) fail "no co* commands in vdisk --help: '$co'" ;; esac
expect "$co" "$VDISK" co
expect "diff" "$VDISK" dif
expect "help" "$VDISK" hel
expect "--help --version" "$VDISK" --
# vdisk help CMD completes the commands.
expect "check" "$VDISK" help che

# Options of the subcommand, from its parser's tables.
expect "--target-image-opts --target-is-zero" "$VDISK" convert --ta
expect "--exact" "$VDISK" diff --ex
# Every option vdisk --list-options names is offered for "-".
want=$("$VDISK" --list-options check | cut -f1 | tr ' ' '\n' | sort | paste -sd' ')
expect "$want" "$VDISK" check -
# serve's options come from its own table (cmd_serve.c).
expect "--tls-authz --tls-creds --tls-hostname" "$VDISK" serve --tls

# Formats after -O, -f, -F and --format (= split as bash splits it).
formats=$("$VDISK" --help | sed -n 's/^Supported formats://p' | tr ' ' '\n' |
          grep '^q' | sort | paste -sd' ')
[ -n "$formats" ] || fail "vdisk --help lists no format starting with q"
expect "$formats" "$VDISK" convert -O q
expect "$formats" "$VDISK" info -f q
expect "qcow2" "$VDISK" info --format = qcow2
expect "raw" "$VDISK" create -f qcow2 -b x -F ra

# File names after an option that takes a file, and as arguments.
expect "disk-a.qcow2 disk-b.raw" "$VDISK" info disk-
expect "disk-a.qcow2" "$VDISK" convert -O qcow2 disk-b.raw disk-a
expect "disk-b.raw" "$VDISK" rebase -b disk-b
