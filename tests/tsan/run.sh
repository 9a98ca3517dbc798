#!/usr/bin/env bash
# Builds vdisk with ThreadSanitizer and runs the tests that put requests
# in flight from many threads (the normal suite does not: TSan is 5-15x
# slower). See docs/testing.md, "The ThreadSanitizer run".
#
#   bash tests/tsan/run.sh [TEST...]      (default: every test listed below)
#
# The tree is build-tsan/ (or $TSAN_BUILD_DIR), configured with
# -Db_sanitize=thread -Db_lundef=false -Dwerror=false -Dbuildtype=debug.
# TSan writes its reports to one file per process under
# $TSAN_BUILD_DIR/tsan-logs/ (log_path), so races in daemons started in
# the background (vdisk serve --fork) are caught too. Each test prints
# one line: PASS, FAIL (the test itself failed) or RACE (it passed but a
# report was written), with its log file; then one line "N passed, M
# failed". Exit status 0 only when nothing failed or raced; 77 when meson
# or the compiler cannot build with TSan here.
#
# Environment: TSAN_OPTIONS (ours are appended to yours), TSAN_BUILD_DIR,
# JOBS (ninja jobs, default 2). On kernels with a high mmap_rnd_bits TSan
# aborts with "unexpected memory mapping": the script then re-runs every
# program under `setarch $(uname -m) -R` (no address randomisation).
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
build=${TSAN_BUILD_DIR:-$root/build-tsan}
jobs=${JOBS:-2}

unit_tests=(tsan-stress test-threads test-qcow2-threads test-qcow2-stress test-core
            test-drivers test-reopen test-snapshot test-qcow2-snapshot
            test-object test-job test-qcow2-zero-race test-bitmap)
cli_tests=(io-threads io-aio chain-deep nbd-basic nbd-fio nbd-snapshot
           qmp-basic serve-daemon qmp-stream qmp-mirror qmp-backup qmp-snapshot
           qmp-transaction jobs-fio qmp-bitmaps)
if [ $# -gt 0 ]; then
    selected=("$@")
else
    selected=("${unit_tests[@]}" "${cli_tests[@]}")
fi

for tool in meson ninja; do
    command -v "$tool" >/dev/null 2>&1 ||
        { echo "run.sh: $tool not found, skipping" >&2; exit 77; }
done

# ---- build --------------------------------------------------------------

if [ -f "$build/build.ninja" ]; then
    meson setup --reconfigure "$build" "$root" >"$build.setup.log" 2>&1
else
    meson setup "$build" "$root" -Db_sanitize=thread -Db_lundef=false \
        -Dwerror=false -Dbuildtype=debug >"$build.setup.log" 2>&1
fi || { tail -20 "$build.setup.log"; echo "0 passed, 1 failed"; exit 1; }
if ! ninja -C "$build" -j "$jobs" >"$build.build.log" 2>&1; then
    tail -30 "$build.build.log"
    echo "0 passed, 1 failed"
    exit 1
fi

# The workload of tests/tsan/tsan-stress.c links the TSan library
# directly (it is not a meson test: it is only useful under TSan). It
# uses internal symbols, so it links the static library, with the
# libraries the build's uninstalled pkg-config file lists as its own
# (whatever optional protocols this build found). Not `--static`: that
# would ask for the static dependencies of gnutls and libcurl too.
pc=$build/meson-uninstalled/vdisk-uninstalled.pc
if ! mods=$(PKG_CONFIG_PATH="$build/meson-uninstalled" \
            pkg-config --print-requires-private vdisk 2>"$build.stress.log") ||
   ! deps=$(pkg-config --libs $(awk '{print $1}' <<<"$mods") 2>>"$build.stress.log"); then
    tail -20 "$build.stress.log"
    echo "0 passed, 1 failed"
    exit 1
fi
deps="$deps $(sed -n 's/^Libs.private: //p' "$pc")"
if ! cc -std=gnu11 -Wall -Wextra -g -O1 -fsanitize=thread -D_GNU_SOURCE \
        -I"$root/include" -I"$root/src" "$here/tsan-stress.c" \
        "$build/libvdisk.a" $deps \
        -lpthread -o "$build/tests/tsan-stress" >"$build.stress.log" 2>&1; then
    tail -20 "$build.stress.log"
    echo "0 passed, 1 failed"
    exit 1
fi

logs=$build/tsan-logs
rm -rf "$logs"
mkdir -p "$logs"

# halt_on_error=0 shows every race of a run, not just the first;
# exitcode=86 is the status tests/functions.sh knows as "sanitizer report".
export TSAN_OPTIONS="${TSAN_OPTIONS:+$TSAN_OPTIONS:}halt_on_error=0:second_deadlock_stack=1:exitcode=86"

# Some kernels map memory where TSan's shadow should go; without address
# randomisation the layout fits.
prefix=()
if "$build/tests/test-iov" 2>&1 | grep -q 'unexpected memory mapping'; then
    prefix=(setarch "$(uname -m)" -R)
    echo "== TSan needs setarch -R on this kernel"
fi

export VDISK=$build/tools/vdisk
export VDISK_SRCDIR=$root VDISK_TESTS_SRCDIR=$root/tests
export VDISK_BUILDDIR=$build VDISK_TEST_TRACE=0

passed=0 failed=0 skipped=0
for t in "${selected[@]}"; do
    log=$logs/$t.log
    start=$(date +%s)
    # Each process of the test writes its reports to $logs/$t.tsan.PID.
    if [ "$t" = tsan-stress ]; then
        rm -rf "$logs/stress" && mkdir -p "$logs/stress"
        TSAN_OPTIONS="$TSAN_OPTIONS:log_path=$logs/$t.tsan" \
            timeout 900 "${prefix[@]}" "$build/tests/$t" "$logs/stress" \
            "${QEMU_IMG:-qemu-img}" >"$log" 2>&1
    elif [ -x "$build/tests/$t" ]; then
        TSAN_OPTIONS="$TSAN_OPTIONS:log_path=$logs/$t.tsan" \
            timeout 900 "${prefix[@]}" "$build/tests/$t" >"$log" 2>&1
    elif [ -f "$root/tests/cli/$t.sh" ]; then
        TSAN_OPTIONS="$TSAN_OPTIONS:log_path=$logs/$t.tsan" \
            timeout 900 "${prefix[@]}" bash "$root/tests/cli/$t.sh" >"$log" 2>&1
    else
        echo "SKIP  $t (no such test)"
        skipped=$((skipped + 1))
        continue
    fi
    rc=$?
    secs=$(( $(date +%s) - start ))
    races=$(cat "$logs/$t.tsan".* 2>/dev/null | grep -c '^WARNING: ThreadSanitizer')
    if [ "$rc" = 77 ]; then
        echo "SKIP  $t (${secs}s)"
        skipped=$((skipped + 1))
    elif [ "$races" -gt 0 ]; then
        echo "RACE  $t: $races report(s) (${secs}s, exit $rc), see $logs/$t.tsan.*"
        cat "$logs/$t.tsan".* | grep '^SUMMARY' | sort | uniq -c | sed 's/^/      /'
        failed=$((failed + 1))
    elif [ "$rc" != 0 ]; then
        echo "FAIL  $t (${secs}s, exit $rc), see $log"
        tail -15 "$log" | sed 's/^/      /'
        failed=$((failed + 1))
    else
        echo "PASS  $t (${secs}s)"
        passed=$((passed + 1))
    fi
done

summary="$passed passed, $failed failed"
[ "$skipped" -gt 0 ] && summary="$summary, $skipped skipped"
echo "$summary"
[ "$failed" -eq 0 ]
