#!/usr/bin/env bash
# The tree describes itself truthfully: specs are cited by the relative
# path ../shared/specs/NAME (never an absolute /work/... path, which only
# exists on one machine), every source file opens with a comment (whether
# it is still true is for review), and docs/architecture.md names every
# tracked file of include/, src/, tools/, tests/, bench/ and scripts/ (by
# name or through its folder's "every file" line) and nothing that is
# gone.
source "$(dirname "$0")/../functions.sh"
requires git python3

src=${VDISK_SRCDIR:-$(cd "$(dirname "$0")/../.." && pwd)}
if ! git -C "$src" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    echo "$0: test skipped because $src is not a git checkout"
    exit 77
fi

git -C "$src" ls-files -z > "${TMPDIR:-/tmp}/vdisk-repo-docs.$$"
cleanup_fn rm -f "${TMPDIR:-/tmp}/vdisk-repo-docs.$$"

python3 - "$src" "${TMPDIR:-/tmp}/vdisk-repo-docs.$$" <<'PY'
import os, re, sys

src, listing = sys.argv[1], sys.argv[2]
files = [f for f in open(listing, "rb").read().decode().split("\0") if f]
tracked = set(files)
problems = []

# ---- 1. spec paths ------------------------------------------------------
# Files the qcow2 branch still cites by absolute path; they get fixed
# (and leave this list) after that branch merges. A listed file that no
# longer needs its place here fails too, so the list only shrinks.
KNOWN_ABSOLUTE = set()
self_path = "tests/cli/repo-docs.sh"
spec_ref = re.compile(r"""([^\s`'"(\[<]*)shared/specs""")
absolute = re.compile(r"/work/")
for f in files:
    if f == self_path:
        continue
    try:
        text = open(os.path.join(src, f), encoding="utf-8").read()
    except (UnicodeDecodeError, IsADirectoryError, FileNotFoundError):
        continue
    bad = []
    for n, line in enumerate(text.split("\n"), 1):
        if absolute.search(line):
            bad.append("%s:%d: absolute path: %s" % (f, n, line.strip()))
        for m in spec_ref.finditer(line):
            if m.group(1) != "../":
                bad.append("%s:%d: spec path not ../shared/specs/: %s"
                           % (f, n, line.strip()))
    if f in KNOWN_ABSOLUTE:
        if not bad:
            problems.append("%s cites specs correctly now: remove it from "
                            "KNOWN_ABSOLUTE in %s" % (f, self_path))
        continue
    problems.extend(bad)

# ---- 2. every source file opens with a comment on what it holds -------
roots = ("include/", "src/", "tools/", "tests/", "bench/", "scripts/")
for f in files:
    if not f.startswith(roots) or f.endswith(".md"):
        continue
    lines = open(os.path.join(src, f), encoding="utf-8").read().split("\n")
    if lines and lines[0].startswith("#!"):
        lines = lines[1:]
    first = lines[0] if lines else ""
    if f.endswith((".sh", ".bash", "meson.build", ".py", ".cases",
                   "known-differences", ".supp")):
        ok = first.startswith("# ")
    else:
        ok = first.startswith(("/*", "// "))
    if not ok:
        problems.append("%s does not open with a comment on what it holds"
                        % f)

# ---- 3. docs/architecture.md names every file --------------------------
doc = open(os.path.join(src, "docs/architecture.md"), encoding="utf-8").read()
block = doc.split("```\n")[1].split("\n")
named, every, folders = set(), set(), set()
stack = []          # folder paths by depth
for n, line in enumerate(block, 1):
    if not line.strip():
        continue
    indent = len(line) - len(line.lstrip(" "))
    if indent >= 8:
        continue    # a description's continuation
    if indent % 2:
        problems.append("architecture.md tree line %d: odd indent" % n)
        continue
    depth = indent // 2
    parts = re.split(r"\s{2,}", line.strip(), maxsplit=1)
    names = parts[0].split(" ")
    desc = parts[1] if len(parts) > 1 else ""
    if depth == 0:
        stack = []
        base = ""
    elif depth <= len(stack):
        stack = stack[:depth]
        base = stack[-1]
    else:
        problems.append("architecture.md tree line %d: no folder above "
                        "'%s'" % (n, line.strip()))
        continue
    for name in names:
        path = base + name
        if name.endswith("/"):
            if len(names) != 1:
                problems.append("architecture.md tree line %d: a folder "
                                "shares its line" % n)
            folders.add(path)
            stack.append(path)
            if desc.startswith("every file"):
                every.add(path)
        else:
            named.add(path)

for p in sorted(named):
    if p not in tracked:
        problems.append("docs/architecture.md names %s, which is not a "
                        "tracked file" % p)
for d in sorted(folders):
    if not any(f.startswith(d) for f in files):
        problems.append("docs/architecture.md names %s, which holds no "
                        "tracked file" % d)
for f in files:
    if not f.startswith(roots):
        continue
    if f in named or os.path.dirname(f) + "/" in every:
        continue
    problems.append("docs/architecture.md does not name %s" % f)

for p in problems:
    print(p)
sys.exit(1 if problems else 0)
PY
