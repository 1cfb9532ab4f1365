#!/usr/bin/env bash
# Runs every check CI runs: optimised tests, sanitizer tests and both ways of consuming the package.
# `--bench` adds a short benchmark smoke run. All build trees live under build/.
set -euo pipefail

bench=0
for arg in "$@"; do
  case $arg in
    --bench) bench=1 ;;
    *) echo "usage: $0 [--bench]" >&2; exit 2 ;;
  esac
done

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=$root/build
step() { printf '\n=== %s\n' "$*"; }

bash "$root/scripts/install-deps.sh"

step "Release build and tests"
cmake -S "$root" -B "$build/release" -DCMAKE_BUILD_TYPE=Release -DPOLYATTN_NATIVE=ON \
  -DCMAKE_COMPILE_WARNING_AS_ERROR=ON
cmake --build "$build/release" -j2
ctest --test-dir "$build/release" --output-on-failure -j2

step "Sanitizer build and tests"
# Debug keeps Eigen's index assertions on; -O1 keeps the sanitized suite fast. Only the tests are
# built here because this compile is the slowest part of the script.
sanitizer_env=(env ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1)
cmake -S "$root" -B "$build/sanitize" -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g" \
  -DPOLYATTN_SANITIZE=ON -DPOLYATTN_BUILD_BENCHMARKS=OFF -DPOLYATTN_BUILD_EXAMPLES=OFF
# The build runs the test binary to discover test cases, so it needs the sanitizer settings too.
"${sanitizer_env[@]}" cmake --build "$build/sanitize" -j2 --target polyattn_tests
"${sanitizer_env[@]}" ctest --test-dir "$build/sanitize" --output-on-failure -j2

step "Consumer of the installed package"
rm -rf "$build/prefix" "$build/consumer-installed" "$build/consumer-subdir"
cmake --install "$build/release" --prefix "$build/prefix"
cmake -S "$root/tests/consumer" -B "$build/consumer-installed" -DCMAKE_PREFIX_PATH="$build/prefix"
cmake --build "$build/consumer-installed" -j2
"$build/consumer-installed/polyattn_consumer"

step "Consumer using add_subdirectory"
cmake -S "$root/tests/consumer" -B "$build/consumer-subdir" -DPOLYATTN_SOURCE_DIR="$root"
cmake --build "$build/consumer-subdir" -j2
"$build/consumer-subdir/polyattn_consumer"

checks="release tests, sanitizer tests, installed and add_subdirectory consumers"
if (( bench )); then
  step "Benchmark smoke run"
  "$build/release/bench/polyattn_bench" --benchmark_min_time=0.01
  checks+=", benchmark smoke run"
fi

echo
echo "test.sh: PASSED ($checks) in ${SECONDS}s"
