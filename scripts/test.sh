#!/usr/bin/env bash
# Builds vdisk three times and runs every test; the one command CI and
# developers use (see docs/testing.md).
#
# Steps: install missing Debian packages (apt-get update only when
# something is missing); configure and build build/ (normal, -Werror)
# and build-asan/ (AddressSanitizer + UndefinedBehaviorSanitizer), and
# compile build-release/ (-O3, -Werror; nothing runs there);
# run the unit tests in build/ and every test (unit + cli) in
# build-asan/ through `meson test`; then list each test's result from
# meson's testlog.json, show the log tail of each failure, and end with
# exactly one line "N passed, M failed[, K skipped]". A build that fails
# counts as one failed test. Exit status 0 only when nothing failed.
#
# Environment: JOBS (default: number of CPUs, at most 2 test processes
# unless set), VDISK_TEST_SUITES (e.g. "unit" to skip the cli suite in
# the sanitizer build), SKIP_INSTALL=1 to never call apt-get,
# SKIP_RELEASE_BUILD=1 to leave out the release compile.

set -uo pipefail

start=$(date +%s)
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

jobs=${JOBS:-2}
suites=${VDISK_TEST_SUITES:-}
tail_lines=${VDISK_LOG_TAIL:-40}

# ---- packages -----------------------------------------------------------

# binutils: readelf and nm, which tests/cli/lib-install.sh reads the
# installed library with.
packages=(build-essential binutils meson ninja-build pkg-config zlib1g-dev
          libbz2-dev
          libzstd-dev libjson-c-dev liburing-dev libnbd-dev libgnutls28-dev
          qemu-utils qemu-system-common libnbd-bin nbdkit fio python3 clang
          gnutls-bin libclang-rt-14-dev
          # the Python module (python/, docs/python.md): Debian's
          # python3's headers
          python3-dev
          # the manual pages (docs/man/): scdoc builds them, man-db's
          # man renders them in tests/cli/man.sh
          scdoc man-db
          # tests/cli/qcow2-grow-ahead-memory.sh counts system calls
          strace
          # remote protocols (docs/remote.md): the libraries and the real
          # servers and peers their tests start
          libcurl4-gnutls-dev libssh-dev libiscsi-dev librbd-dev
          librados-dev qemu-block-extra nginx-light openssh-server
          openssh-client tgt libiscsi-bin ceph-mon ceph-mgr ceph-osd
          ceph-common vsftpd tinyproxy)
# abidw and abidiff: the ABI check against abi/libvdisk.abi
# (tests/cli/abi.sh, docs/library.md).
packages+=(abigail-tools)

install_missing()
{
    local missing=() p
    command -v dpkg-query >/dev/null 2>&1 || return 0
    for p in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null |
                grep -q 'install ok installed'; then
            missing+=("$p")
        fi
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "== installing missing packages: ${missing[*]}"
    local sudo=
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo=sudo
        else
            echo "error: need root (or sudo) to install: ${missing[*]}" >&2
            return 1
        fi
    fi
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -q </dev/null &&
        $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
}

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    if ! install_missing "${packages[@]}"; then
        echo "error: package installation failed" >&2
        echo "0 passed, 1 failed"
        exit 1
    fi
fi

# ---- sanitizer settings -------------------------------------------------

# Any sanitizer report is fatal and exits 86, a status no vdisk command
# uses, so tests can tell it from an ordinary failure. LeakSanitizer works
# in our sandbox (checked: it needs ptrace-like thread suspension); if a
# machine forbids that, run with ASAN_OPTIONS=detect_leaks=0.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:halt_on_error=1:exitcode=86:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1:exitcode=86}
# tests/lsan.supp: leaks inside libraries vdisk does not own (each one
# explained there).
export LSAN_OPTIONS=${LSAN_OPTIONS:-exitcode=86:suppressions=$root/tests/lsan.supp}

# ---- build --------------------------------------------------------------

build_failures=()

# setup_and_build DIR MESON-ARGS...: configure (or reconfigure, so new
# test files are globbed) and build; on failure print the log tail.
setup_and_build()
{
    local dir=$1 log
    shift
    log=$(mktemp)
    echo "== building $dir"
    if [ -f "$dir/build.ninja" ]; then
        meson setup --reconfigure "$dir" "$@" >"$log" 2>&1
    else
        rm -rf "$dir"
        meson setup "$dir" "$@" >"$log" 2>&1
    fi &&
    ninja -C "$dir" -j "$jobs" >>"$log" 2>&1
    local st=$?
    if [ $st -ne 0 ]; then
        echo "FAIL build $dir"
        echo "---- last $tail_lines lines of the $dir build log ----"
        tail -n "$tail_lines" "$log"
        echo "----"
        build_failures+=("$dir")
    fi
    rm -f "$log"
    return $st
}

normal_ok=0
asan_ok=0
setup_and_build build && normal_ok=1
# -Werror stays on in build/; gcc's sanitizer instrumentation produces
# known false-positive warnings (-Wmaybe-uninitialized and friends) at
# -O2, so the sanitizer tree only reports warnings.
setup_and_build build-asan -Db_sanitize=address,undefined -Db_lundef=false \
    -Dwerror=false && asan_ok=1
# Users and packagers build with --buildtype=release; gcc -O3 inlines
# more and warns about paths -O2 does not see, and -Werror makes those
# build failures. Only compiled here, the tests run in the trees above.
if [ "${SKIP_RELEASE_BUILD:-0}" != 1 ]; then
    setup_and_build build-release --buildtype=release || true
fi

# ---- run ----------------------------------------------------------------

# run_suite DIR LABEL [SUITE]: run the tests of DIR through meson; the
# results are read afterwards from DIR/meson-logs/testlog.json.
run_suite()
{
    local dir=$1 label=$2 suite=${3:-}
    local args=(-C "$dir" --no-rebuild --num-processes "$jobs")
    [ -n "$suite" ] && args+=(--suite "$suite")
    echo "== running $label tests in $dir"
    rm -f "$dir/meson-logs/testlog.json"
    # Show meson's one line per finished test as it happens; its own
    # verdict is recomputed from testlog.json below.
    meson test "${args[@]}" 2>&1 | tee "$dir/meson-logs/vdisk-test-run.log" |
        grep --line-buffered -E '^ *[0-9]+/[0-9]+ ' || true
    return 0
}

results=()
if [ $normal_ok = 1 ]; then
    run_suite build normal unit
    results+=("build:build/meson-logs/testlog.json")
fi
if [ $asan_ok = 1 ]; then
    run_suite build-asan sanitizer "$suites"
    results+=("build-asan:build-asan/meson-logs/testlog.json")
fi

# ---- fuzzing (bounded) --------------------------------------------------

# FUZZ_SECONDS > 0 runs every libFuzzer target that long (CI: briefly);
# the run counts as one test.
fuzz_result=
if [ "${FUZZ_SECONDS:-0}" -gt 0 ]; then
    echo "== fuzzing each target for ${FUZZ_SECONDS}s"
    fuzz_status=0
    bash tests/fuzz/run.sh "$FUZZ_SECONDS" > build-fuzz.log 2>&1 || fuzz_status=$?
    case $fuzz_status in
    0) fuzz_result=PASS ;;
    77) fuzz_result=SKIP ;;
    *) fuzz_result=FAIL; tail -n "$tail_lines" build-fuzz.log ;;
    esac
fi
export FUZZ_RESULT=$fuzz_result

# ---- report -------------------------------------------------------------

summary=$(python3 - "$tail_lines" "${#build_failures[@]}" "${results[@]}" <<'EOF'
import json, os, sys

tail_lines = int(sys.argv[1])
build_failures = int(sys.argv[2])
passed = failed = skipped = 0
failures = []
results = []

for spec in sys.argv[3:]:
    label, path = spec.split(":", 1)
    if not os.path.exists(path):
        results.append("FAIL       %s: no test results (meson test did not run)" % label)
        failed += 1
        continue
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for r in rows:
        # meson 1.0 names a test "project:suite / name" or just "name"
        # and its testlog.json has no suite field: a shell script in the
        # command line means the cli suite.
        name = r.get("name", "?").rsplit(" / ", 1)[-1].strip()
        cmd = r.get("command") or []
        suite = "cli" if any(str(c).endswith(".sh") for c in cmd) else "unit"
        full = "%s/%s/%s" % (label, suite, name)
        res = r.get("result", "ERROR")
        dur = r.get("duration", 0.0)
        if res in ("OK", "EXPECTEDFAIL"):
            tag = "PASS"
            passed += 1
        elif res == "SKIP":
            tag = "SKIP"
            skipped += 1
        else:
            tag = "FAIL" if res == "FAIL" else "FAIL(%s)" % res
            failed += 1
            failures.append((full, r))
        results.append("%-10s %-50s %6.1fs" % (tag, full, dur))

fuzz = os.environ.get("FUZZ_RESULT", "")
if fuzz:
    results.append("%-10s %-50s" % (fuzz, "fuzz/all-targets"))
    if fuzz == "PASS":
        passed += 1
    elif fuzz == "SKIP":
        skipped += 1
    else:
        failed += 1

print("== results")
for line in results:
    print(line)
for full, r in failures:
    out = (r.get("stdout") or "")
    if r.get("stderr"):
        out += "\n---- (stderr) ----\n" + r["stderr"]
    lines = out.rstrip("\n").split("\n")
    print("---- %s: last %d lines of output (exit %s) ----"
          % (full, min(tail_lines, len(lines)), r.get("returncode")))
    for line in lines[-tail_lines:]:
        print(line)
    print("----")

failed += build_failures
line = "%d passed, %d failed" % (passed, failed)
if skipped:
    line += ", %d skipped" % skipped
print(line)
sys.exit(1 if failed else 0)
EOF
)
status=$?
if [ -z "$summary" ]; then
    summary="0 passed, 1 failed"
    status=1
fi

# Everything but the summary line, then the elapsed time, then the
# summary last (CI reads the last line).
printf '%s\n' "$summary" | sed '$d'
echo "elapsed: $(( $(date +%s) - start ))s"
printf '%s\n' "$summary" | tail -n 1
exit $status
