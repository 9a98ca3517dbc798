#!/usr/bin/env bash
# The three places that list a command's options agree with the parser:
# for every command of `vdisk --help`, the option tables cli_getopt() (or
# bench's, io's, serve's own getopt_long()) parses with, dumped by the
# hidden `vdisk --list-options CMD`, must equal the options that
# `vdisk CMD --help` (and `vdisk help CMD`, the same text) names and the
# options the man page documents (vdisk(1), and vdisk-serve(1) for
# serve, which must give every spelling: -f and --format); the synopsis
# in `vdisk --help` must name every option but --help (issue 18: it left
# out compare -p/-T and check -T). Each page renders with `man -l` at 80
# columns without a warning, and `meson install` installs the pages and
# the bash completion.
source "$(dirname "$0")/../functions.sh"
requires python3
tmpdir

builddir=${VDISK_BUILDDIR:-$(cd "$(dirname "$VDISK")/.." && pwd)}
mandir=$builddir/docs/man
pages=(vdisk.1 vdisk-serve.1 libvdisk.3)
have_pages=1
for p in "${pages[@]}"; do
    [ -f "$mandir/$p" ] || have_pages=0
done
if [ $have_pages = 1 ] && ! command -v man >/dev/null 2>&1; then
    have_pages=0
fi

# Renders at 80 columns; no warning may come out.
if [ $have_pages = 1 ]; then
    for p in "${pages[@]}"; do
        MANWIDTH=80 man -l "$mandir/$p" > "$p.txt" 2> "$p.err" ||
            fail "man -l $p failed: $(cat "$p.err")"
        warnings=$(MANWIDTH=80 man --warnings -l "$mandir/$p" 2>&1 >/dev/null)
        [ -z "$warnings" ] || fail "man --warnings -l $p: $warnings"
        grep -q . "$p.txt" || fail "man -l $p printed nothing"
    done
fi

python3 - "$VDISK" "$have_pages" <<'PY'
import re, subprocess, sys

vdisk, have_pages = sys.argv[1], sys.argv[2] == "1"
problems = []
TOKEN = re.compile(r"(?<![\w.=/'-])(--?[A-Za-z0-9][A-Za-z0-9-]*)")


def run(*args):
    p = subprocess.run([vdisk] + list(args), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True)
    if p.returncode != 0:
        problems.append("vdisk %s exited %d: %s"
                        % (" ".join(args), p.returncode, p.stderr.strip()))
    return p.stdout


def tokens(text):
    return set(TOKEN.findall(text))


# The commands and their synopses, from the global help.
synopsis = {}
in_syntax = False
for line in run("--help").split("\n"):
    if line == "Command syntax:":
        in_syntax = True
        continue
    if in_syntax:
        if not line.strip():
            break
        m = re.match(r"  (\S+) (.*)", line)
        if m:
            synopsis.setdefault(m.group(1), []).append(m.group(2))
if not synopsis:
    sys.exit("FAIL: no commands in vdisk --help")


def man_sections(path, level):
    """{title: [term lines]} of a rendered page: the terms of a definition
    list are indented 7 and start with '-'; a title is a line indented
    @level (0: sections, 3: subsections)."""
    sections, cur = {}, None
    for line in open(path).read().split("\n"):
        m = re.match(r"( *)(\S.*)$", line)
        if not m:
            continue
        indent = len(m.group(1))
        if indent == level or (level == 3 and indent == 0):
            cur = m.group(2).strip() if indent == level else None
            if cur is not None:
                sections.setdefault(cur, [])
        elif cur is not None and indent == 7 and m.group(2).startswith("-"):
            sections[cur].append(m.group(2))
    return sections


man_cmds = man_sections("vdisk.1.txt", 3) if have_pages else {}
man_serve = man_sections("vdisk-serve.1.txt", 0) if have_pages else {}

for cmd, syn in sorted(synopsis.items()):
    groups = []
    for line in run("--list-options", cmd).split("\n"):
        if line:
            spellings, kind = line.split("\t")
            groups.append(spellings.split())
    if not groups:
        problems.append("%s: vdisk --list-options lists nothing" % cmd)
        continue
    gid = {s: i for i, g in enumerate(groups) for s in g}
    helpgid = gid.get("--help")
    name = lambda ids: ", ".join("/".join(groups[i]) for i in sorted(ids))

    def groups_of(where, toks):
        unknown = sorted(t for t in toks if t not in gid)
        if unknown:
            problems.append("%s: %s names options the parser does not "
                            "take: %s" % (cmd, where, " ".join(unknown)))
        return {gid[t] for t in toks if t in gid}

    every = set(range(len(groups)))
    # 1. The global help's synopsis names every option but --help and
    # --version (forms of their own), unless it sends the reader to the
    # command's own help (serve: two programs' options).
    got = groups_of("the synopsis in vdisk --help", tokens(" ".join(syn)))
    missing = every - got - {helpgid, gid.get("--version")}
    if missing and "vdisk %s --help" % cmd not in " ".join(syn):
        problems.append("%s: the synopsis in vdisk --help leaves out %s"
                        % (cmd, name(missing)))

    # 2. vdisk CMD --help: its usage lines and its option lines.
    text = run(cmd, "--help")
    if run("help", cmd) != text:
        problems.append("%s: vdisk help %s differs from vdisk %s --help"
                        % (cmd, cmd, cmd))
    toks, usage = set(), False
    for line in text.split("\n"):
        if re.match(r"[Uu]sage:", line):
            usage = True
        elif not line.strip():
            usage = False
        if usage:
            toks |= tokens(line)
        elif re.match(r"\s+-", line):
            toks |= tokens(re.split(r"\s{2,}", line.strip() + "  ")[0])
    got = groups_of("vdisk %s --help" % cmd, toks)
    if got != every:
        problems.append("%s: vdisk %s --help leaves out %s"
                        % (cmd, cmd, name(every - got)))

    # 3. The man page: every spelling of every option.
    if not have_pages:
        continue
    if cmd == "serve":
        terms = [t for sec in man_serve.values() for t in sec]
        page = "vdisk-serve(1)"
    elif cmd in man_cmds:
        terms = man_cmds[cmd]
        page = "vdisk(1)"
    else:
        problems.append("%s: vdisk(1) has no section for the command %s "
                        "(a subsection titled '%s' under COMMANDS, its "
                        "options as a list)" % (cmd, cmd, cmd))
        continue
    toks = set()
    for t in terms:
        toks |= tokens(t)
    groups_of(page, toks)
    absent = sorted(s for g in groups for s in g if s not in toks)
    if absent:
        problems.append("%s: %s does not document %s"
                        % (cmd, page, " ".join(absent)))

for p in problems:
    print("FAIL: " + p, file=sys.stderr)
sys.exit(1 if problems else 0)
PY

# `meson install` puts the pages under share/man/man1 and man3, and the
# bash completion (contrib/vdisk.bash, tests/cli/completion.sh) where
# bash-completion looks for it.
if [ $have_pages = 1 ] && command -v meson >/dev/null 2>&1; then
    dest=$PWD/root
    meson install -C "$builddir" --no-rebuild --destdir "$dest" \
        > install.log 2>&1 || { cat install.log; fail "meson install failed"; }
    for p in man1/vdisk.1 man1/vdisk-serve.1 man3/libvdisk.3; do
        f=$(find "$dest" -path "*/share/man/$p")
        [ -n "$f" ] || fail "meson install did not install share/man/$p"
        cmp "$f" "$mandir/${p#*/}" || fail "installed $p differs from the built one"
    done
    f=$(find "$dest" -path '*/share/bash-completion/completions/vdisk')
    [ -n "$f" ] || fail "meson install did not install the bash completion"
    cmp "$f" "${VDISK_SRCDIR:-$(dirname "$0")/../..}/contrib/vdisk.bash" ||
        fail "the installed bash completion differs from contrib/vdisk.bash"
fi

if [ $have_pages = 0 ]; then
    echo "$0: man page checks skipped: the pages were not built (scdoc" \
         "missing at configure time) or man is not installed"
    exit 77
fi
