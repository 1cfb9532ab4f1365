#!/usr/bin/env bash
# Runs every check CI runs: optimised tests, AddressSanitizer+UBSan tests, ThreadSanitizer tests of concurrent use
# and both ways of consuming the package, then prints how long each stage took. `--bench` adds a short benchmark
# smoke run. All build trees live under build/.
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
timings=()
stage_start=$SECONDS
step() {
  printf '\n=== %s\n' "$*"
  stage_name=$*
  stage_start=$SECONDS
}
step_done() { timings+=("$(printf '%5ds  %s' $((SECONDS - stage_start)) "$stage_name")"); }

bash "$root/scripts/install-deps.sh"

# Ninja, because it compiles a target's objects while the library they link is still being built. A tree
# configured earlier with another generator is configured afresh.
configure() {
  local tree=$1
  shift
  if [[ -f $tree/CMakeCache.txt ]] && ! grep -q '^CMAKE_GENERATOR:INTERNAL=Ninja$' "$tree/CMakeCache.txt"; then
    rm -rf "$tree"
  fi
  cmake -G Ninja -S "$root" -B "$tree" "$@"
}

step "Release build and tests"
# Debian's python3, whose numpy, torch and pytest install-deps.sh installs (the first python3 on PATH may be
# another one); only this tree builds the Python package and runs its tests (ctest -L python).
configure "$build/release" -DCMAKE_BUILD_TYPE=Release -DPOLYATTN_NATIVE=ON \
  -DCMAKE_COMPILE_WARNING_AS_ERROR=ON -DPython3_EXECUTABLE=/usr/bin/python3
# The tests, the MPI tests, the examples (example_cli runs them) and the Python package; the benchmarks only with
# --bench.
targets=(--target polyattn_tests polyattn_mpi_tests polyattn_demo train_gpt accuracy_frontier distributed_attention
         polyattn_python)
(( bench )) && targets+=(polyattn_bench)
cmake --build "$build/release" -j2 "${targets[@]}"
ctest --test-dir "$build/release" --output-on-failure -j2
step_done

step "AddressSanitizer+UBSan build and tests"
# Debug keeps Eigen's index assertions on; -O1 keeps the sanitized suite fast. Only the tests are built here.
# Measured on the largest instantiation TU (CPU s): -g 149, -g1 102, and 64 without UBSan's alignment, null and
# pointer-overflow checks. -g1 (line tables) is all a report needs for file:line stack traces. The three checks
# left out instrument every pointer use a second time, after ASan; ASan still reports a null dereference (its
# fault handler, with the stack) and an out-of-range pointer when it is dereferenced. What is lost: misaligned
# scalar accesses that x86 tolerates, and pointer arithmetic that overflows without a dereference. Every other
# UBSan check (signed overflow, shifts, division, bounds, object-size, bool/enum loads, vptr, return,
# unreachable, nonnull, ...) stays on.
sanitizer_env=(env ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1)
configure "$build/sanitize" -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g1" \
  -DPOLYATTN_SANITIZE=address,undefined -DPOLYATTN_SANITIZE_SKIP=alignment,null,pointer-overflow \
  -DPOLYATTN_BUILD_BENCHMARKS=OFF -DPOLYATTN_BUILD_EXAMPLES=OFF
# The build runs the test binary to discover test cases, so it needs the sanitizer settings too.
"${sanitizer_env[@]}" cmake --build "$build/sanitize" -j2 --target polyattn_tests
"${sanitizer_env[@]}" ctest --test-dir "$build/sanitize" --output-on-failure -j2
step_done

step "ThreadSanitizer build and tests (clang, LLVM OpenMP with its Archer race annotations)"
# GCC's libgomp is not instrumented, so ThreadSanitizer would report its barriers as races; LLVM's OpenMP
# runtime with the Archer tool makes polyattn's own parallel loops checkable too.
archer=$(clang++ -print-file-name=libarcher.so)
tsan_env=(env "OMP_TOOL_LIBRARIES=$archer" "TSAN_OPTIONS=halt_on_error=1 ignore_noninstrumented_modules=1"
          OMP_NUM_THREADS=3)
configure "$build/tsan" -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=Debug \
  -DCMAKE_CXX_FLAGS_DEBUG="-O1 -gline-tables-only" -DPOLYATTN_SANITIZE=thread -DPOLYATTN_BUILD_BENCHMARKS=OFF \
  -DPOLYATTN_BUILD_EXAMPLES=OFF
"${tsan_env[@]}" cmake --build "$build/tsan" -j2 --target polyattn_thread_tests
"${tsan_env[@]}" ctest --test-dir "$build/tsan" --output-on-failure -j2
step_done

step "Consumers: the installed package and add_subdirectory"
rm -rf "$build/prefix" "$build/consumer-installed" "$build/consumer-subdir"
cmake --install "$build/release" --prefix "$build/prefix"
cmake -S "$root/tests/consumer" -B "$build/consumer-installed" -DCMAKE_PREFIX_PATH="$build/prefix"
cmake -S "$root/tests/consumer" -B "$build/consumer-subdir" -DPOLYATTN_SOURCE_DIR="$root"
# The two consumer builds are independent single files: build them side by side, one per core.
cmake --build "$build/consumer-installed" -j1 &
installed_build=$!
cmake --build "$build/consumer-subdir" -j1
wait "$installed_build"
"$build/consumer-installed/polyattn_consumer"
"$build/consumer-subdir/polyattn_consumer"
# The installed Python package, imported from the prefix alone (tests/consumer/consumer.py).
PYTHONPATH="$build/prefix/lib/python$(/usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')/site-packages" \
  /usr/bin/python3 "$root/tests/consumer/consumer.py"
step_done

checks="release tests (Python included), sanitizer tests, thread-sanitizer tests, installed and add_subdirectory consumers"
if (( bench )); then
  step "Benchmark smoke run"
  "$build/release/bench/polyattn_bench" --benchmark_min_time=0.01
  step_done
  checks+=", benchmark smoke run"
fi

echo
echo "Time per stage:"
printf '  %s\n' "${timings[@]}"
echo "test.sh: PASSED ($checks) in ${SECONDS}s"
