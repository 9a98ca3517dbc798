# bash completion for vdisk (installed as
# share/bash-completion/completions/vdisk). Nothing here lists commands
# or options by hand, so it cannot go stale: the subcommands and the
# format names come from `vdisk --help` ("Command syntax:" and
# "Supported formats:"), each subcommand's options from the hidden
# `vdisk --list-options CMD`, a dump of the very getopt tables the
# command parses with (tools/help.c). tests/cli/completion.sh checks it.

# The program being completed: the word typed (a path works), else vdisk.
_vdisk_prog()
{
    local p=${COMP_WORDS[0]}
    if [[ $p == */* && -x $p ]] || type -P "$p" >/dev/null 2>&1; then
        printf '%s' "$p"
    else
        printf vdisk
    fi
}

_vdisk()
{
    local cur=${COMP_WORDS[COMP_CWORD]} prev= prog cmd line kind opts arg w
    prog=$(_vdisk_prog)
    COMPREPLY=()
    if ((COMP_CWORD > 0)); then
        prev=${COMP_WORDS[COMP_CWORD - 1]}
    fi
    # "--format=q": bash splits at '=' (COMP_WORDBREAKS), so the word
    # before is '=' and the option is one further back.
    if [[ $cur == = ]]; then
        cur=
    elif [[ $prev == = ]] && ((COMP_CWORD > 1)); then
        prev=${COMP_WORDS[COMP_CWORD - 2]}
    fi

    # The subcommands, once each (diff and snapshot have several lines).
    local -a commands=()
    while read -r line; do
        commands+=("${line%% *}")
    done < <("$prog" --help 2>/dev/null |
             sed -n '/^Command syntax:/,/^$/s/^  \([a-z][a-z-]*\) .*/\1/p' |
             sort -u)

    if ((COMP_CWORD == 1)); then
        if [[ $cur == -* ]]; then
            mapfile -t COMPREPLY < <(compgen -W '-h --help -V --version' -- "$cur")
        else
            mapfile -t COMPREPLY < <(compgen -W "${commands[*]} help" -- "$cur")
        fi
        return 0
    fi
    cmd=${COMP_WORDS[1]}
    if [[ $cmd == help ]]; then
        ((COMP_CWORD == 2)) &&
            mapfile -t COMPREPLY < <(compgen -W "${commands[*]}" -- "$cur")
        return 0
    fi

    # One line per option: its spellings, a tab, arg|optarg|noarg.
    opts=$("$prog" --list-options "$cmd" 2>/dev/null) || return 0

    # The word after an option that takes an argument.
    if [[ $prev == -* ]]; then
        arg=
        while IFS=$'\t' read -r line kind; do
            for w in $line; do
                [[ $w == "$prev" && $kind == arg ]] && arg=1
            done
        done <<< "$opts"
        if [[ -n $arg ]]; then
            case $prev in
            -f|-O|-F|--format)
                mapfile -t COMPREPLY < <(compgen -W "$("$prog" --help 2>/dev/null |
                    sed -n 's/^Supported formats://p')" -- "$cur")
                ;;
            *)
                compopt -o filenames 2>/dev/null
                mapfile -t COMPREPLY < <(compgen -f -- "$cur")
                ;;
            esac
            return 0
        fi
    fi

    if [[ $cur == -* ]]; then
        mapfile -t COMPREPLY < <(compgen -W "$(cut -f1 <<< "$opts")" -- "$cur")
        return 0
    fi
    compopt -o filenames 2>/dev/null
    mapfile -t COMPREPLY < <(compgen -f -- "$cur")
    return 0
}

complete -F _vdisk vdisk
