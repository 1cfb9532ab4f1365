#!/usr/bin/env bash
# Command-line checks of the example programs (issue 9): --help works; every bad input is refused at once with
# exit status 2 and a one-line message on stderr naming the option, before any work starts; and train_gpt's
# --out-dir is never interpreted by a shell (nor by gnuplot as a pipe).
#
#   test_example_cli.sh POLYATTN_DEMO TRAIN_GPT ACCURACY_FRONTIER [DISTRIBUTED_ATTENTION]
#
# DISTRIBUTED_ATTENTION (built with MPI only) runs without mpirun, as a single MPI process (MPI's singleton
# start-up, a few tenths of a second); its runs under mpirun are tests of their own (examples/CMakeLists.txt).
set -u

if [ $# -ne 3 ] && [ $# -ne 4 ]; then
  echo "usage: $0 POLYATTN_DEMO TRAIN_GPT ACCURACY_FRONTIER [DISTRIBUTED_ATTENTION]" >&2
  exit 2
fi
demo=$(realpath "$1") train=$(realpath "$2") frontier=$(realpath "$3")
distributed=""
[ $# -eq 4 ] && distributed=$(realpath "$4")

passed=0 failed=0
work=$(mktemp -d "${TMPDIR:-/tmp}/polyattn_cli.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work" || exit 1

pass() { passed=$((passed + 1)); echo "ok    $*"; }
fail() { failed=$((failed + 1)); echo "FAIL  $*"; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }

# expect_help PROGRAM: --help exits 0 and prints a usage text on stdout.
expect_help() {
  local name
  name=$(basename "$1")
  "$1" --help >"$work/out" 2>"$work/err"
  local status=$?
  if [ $status -eq 0 ] && grep -qi '^usage' "$work/out"; then
    pass "$name --help: exit 0, usage on stdout"
  else
    fail "$name --help: exit $status, stdout: $(head -c 200 "$work/out")"
  fi
}

# expect_usage_error FLAG PROGRAM ARGS...: exit 2 within a second, nothing on stdout (no work started), exactly
# one line on stderr and it names FLAG.
expect_usage_error() {
  local flag=$1 program=$2
  shift 2
  local name shown
  name=$(basename "$program")
  shown="$name$(printf " '%s'" "$@")"
  local start
  start=$(now_ms)
  timeout 20 "$program" "$@" >"$work/out" 2>"$work/err"
  local status=$? elapsed=$(($(now_ms) - start))
  local lines
  lines=$(wc -l <"$work/err")
  local message
  message=$(head -n 1 "$work/err")
  if [ $status -ne 2 ]; then
    fail "$shown: exit $status (expected 2); stderr: $message"
  elif [ -s "$work/out" ]; then
    fail "$shown: printed on stdout (work started?): $(head -n 1 "$work/out")"
  elif [ "$lines" -ne 1 ]; then
    fail "$shown: $lines lines on stderr (expected 1): $(head -c 300 "$work/err")"
  elif ! grep -qF -- "$flag" "$work/err"; then
    fail "$shown: message does not name $flag: $message"
  elif [ $elapsed -ge 1000 ]; then
    fail "$shown: took $elapsed ms (expected well under a second)"
  else
    pass "$shown -> exit 2 in $elapsed ms: $message"
  fi
}

echo "== --help"
expect_help "$demo"
expect_help "$train"
expect_help "$frontier"

echo "== polyattn_demo: bad input"
expect_usage_error --bogus "$demo" --bogus
expect_usage_error --bogus "$demo" --bogus 3
expect_usage_error --reps "$demo" --reps
expect_usage_error --reps "$demo" --reps 3x
expect_usage_error --reps "$demo" --reps abc
expect_usage_error --reps "$demo" --reps -3
expect_usage_error --reps "$demo" --reps ''
expect_usage_error --reps "$demo" --reps 99999999999999999999
expect_usage_error --seed "$demo" --seed -1
expect_usage_error --d-max "$demo" --d-max 99
expect_usage_error --d-min "$demo" --d-min 9 --d-max 5
expect_usage_error --csv "$demo" --csv
expect_usage_error extra "$demo" extra

echo "== accuracy_frontier: bad input"
expect_usage_error --bogus "$frontier" --bogus
expect_usage_error --bogus "$frontier" --bogus 3
expect_usage_error --n "$frontier" --n
expect_usage_error --n "$frontier" --n 10abc
expect_usage_error --n "$frontier" --n abc
expect_usage_error --n "$frontier" --n 1e8
expect_usage_error --n "$frontier" --n 99999999999
expect_usage_error --seed "$frontier" --seed -1
expect_usage_error --max-degree "$frontier" --max-degree -2
expect_usage_error --max-degree "$frontier" --max-degree ''

if [ -n "$distributed" ]; then
  echo "== distributed_attention (one MPI process): --help and bad input"
  expect_help "$distributed"
  expect_usage_error --bogus "$distributed" --bogus
  expect_usage_error --tokens "$distributed" --tokens
  expect_usage_error --tokens "$distributed" --tokens 10abc
  expect_usage_error --tokens "$distributed" --tokens 0
  expect_usage_error --tokens "$distributed" --tokens 99999999999
  expect_usage_error --heads "$distributed" --heads 0
  expect_usage_error --head-dim "$distributed" --head-dim 65
  expect_usage_error --repeats "$distributed" --repeats -1
  expect_usage_error --seed "$distributed" --seed -1
  expect_usage_error extra "$distributed" --exchange-only extra
  expect_usage_error --method "$distributed" --method softmax
  expect_usage_error --method "$distributed" --method
  expect_usage_error --gpt-step "$distributed" --gpt-step --exchange-only
  expect_usage_error --gpt-step "$distributed" --gpt-step --non-causal
fi

echo "== train_gpt: bad input"
printf 'too short\n' >"$work/short.txt"
printf 'not a directory\n' >"$work/plain_file"
expect_usage_error --bogus "$train" --bogus
expect_usage_error --bogus "$train" --bogus 3
expect_usage_error --steps "$train" --steps
expect_usage_error --steps "$train" --steps 10abc
expect_usage_error --steps "$train" --steps abc
expect_usage_error --steps "$train" --steps 99999999999
expect_usage_error --steps "$train" --steps 0
expect_usage_error --seed "$train" --seed -1
expect_usage_error --degrees "$train" --degrees ''
expect_usage_error --degrees "$train" --degrees -2
expect_usage_error --degrees "$train" --degrees 2,,4
expect_usage_error --degrees "$train" --degrees 2,4,
expect_usage_error --exact-windows "$train" --exact-windows -1
expect_usage_error --exact-windows "$train" --exact-windows 0,64,
expect_usage_error --context "$train" --context 1e8
expect_usage_error --context "$train" --context 99999999
expect_usage_error --context "$train" --context 16 --keys 8 --queries 10
expect_usage_error --lr "$train" --lr abc
expect_usage_error --lr "$train" --lr nan
expect_usage_error --heads "$train" --d-model 64 --heads 5
expect_usage_error --log-every "$train" --log-every -1
expect_usage_error --text "$train" --text "$work/no such file.txt"
expect_usage_error --text "$train" "$work/no such file.txt"
expect_usage_error --text "$train" --text "$work/short.txt"
expect_usage_error --text "$train" --text "$work"
expect_usage_error --out-dir "$train" --out-dir ''
expect_usage_error --out-dir "$train" --out-dir "$work/plain_file/sub"
expect_usage_error extra "$train" "$work/short.txt" extra
# the late checks come after the steps/options parsing: a missing text file must stop before training
expect_usage_error --text "$train" --steps 1 --context 64 --text "$work/missing.txt"

echo "== train_gpt: --out-dir is never given to a shell"
head -c 20000 /dev/urandom | base64 >"$work/text.txt"
tiny=(--steps 1 --text-steps 1 --context 64 --layers 1 --d-model 16 --heads 2 --log-every 1)
gnuplot_installed=0
command -v gnuplot >/dev/null 2>&1 && gnuplot_installed=1

# run_tiny DIR [ARGS...]: a one-step training into DIR (run in $work, where an injected 'touch' would land).
run_tiny() {
  local dir=$1
  shift
  local start
  start=$(now_ms)
  timeout 100 "$train" "${tiny[@]}" --out-dir "$dir" "$@" >"$work/out" 2>"$work/err"
  local status=$?
  echo "      (train_gpt ran for $(($(now_ms) - start)) ms, exit $status)"
  return $status
}

check_outputs() {
  local dir=$1 label=$2
  shift 2
  local injected
  injected=$(find / "$HOME" -maxdepth 1 -name 'INJECTED*' 2>/dev/null; find "$work" -name 'INJECTED*' 2>/dev/null)
  if [ -n "$injected" ]; then
    fail "$label: injected command ran: $injected"
    echo "$injected" | while IFS= read -r file; do rm -f "$file"; done  # so later cases report their own
  else
    pass "$label: no INJECTED file under $work (the working directory), in / or in \$HOME"
  fi
  local task
  for task in "$@"; do
    if [ -s "$dir/${task}_loss.csv" ]; then
      pass "$label: $task CSV written into the literal directory"
    else
      fail "$label: no $dir/${task}_loss.csv; stdout: $(tail -n 3 "$work/out") stderr: $(cat "$work/err")"
    fi
    if [ $gnuplot_installed -eq 1 ]; then
      if [ -s "$dir/${task}_loss.png" ]; then
        pass "$label: $task PNG written into the literal directory"
      else
        fail "$label: gnuplot installed but no $dir/${task}_loss.png; stdout: $(grep -i gnuplot "$work/out")"
      fi
    fi
  done
}

evil="$work/x'; touch INJECTED; echo '\$(touch INJECTED2) \`touch INJECTED3\` \"dir"
if run_tiny "$evil" --text "$work/text.txt"; then
  pass "train_gpt --out-dir with quotes, spaces, \$(...) and backquotes: exit 0"
else
  fail "train_gpt --out-dir with quotes, spaces, \$(...) and backquotes: stderr: $(cat "$work/err")"
fi
check_outputs "$evil" "quoted out-dir" recall text

# Relative directories starting with '|' (gnuplot's 'set output' reads '|cmd' as a pipe to a shell command) and
# with '-' (an option to any program that gets it as a leading argument).
for dir in "|touch INJECTED4;" "-e touch INJECTED5;"; do
  if run_tiny "$dir"; then
    pass "train_gpt --out-dir '$dir': exit 0"
  else
    fail "train_gpt --out-dir '$dir': stderr: $(cat "$work/err")"
  fi
  check_outputs "$work/$dir" "out-dir '$dir'" recall
done
[ $gnuplot_installed -eq 1 ] || echo "      (gnuplot not installed: PNG output not checked)"

echo "cli: $passed passed, $failed failed"
[ $failed -eq 0 ]
