#!/usr/bin/env bash
# The whole GPU check in one command, on a machine with torch, Triton and nvcc and no network
# (../shared/GPU.md): build in place, the test suite on CUDA, compute-sanitizer on the CUDA
# extension's tests, `fastunet bench`, the start-up figures and a profile. Everything lands in
# OUT; a short summary is printed last.
#
#   benchmarks/gpu_check.sh OUT [build] [tests] [sanitizer] [bench] [startup] [profile]
#                                                   (default: build tests sanitizer bench)
#
# Files in OUT, at most 8 whatever the stages (the device tool brings back 8): info.txt,
# stages.log (every stage's output but the tests', each under a "== stage" header), tests.log,
# bench.json, bench.md, bench.png (the plot needs matplotlib), startup.json, profile.json.
#
# Variables:
# - BENCH_ARGS and TEST_ARGS pass arguments on (TEST_ARGS="-n 8" with pytest-xdist; without
#   it the tests run in one process, and tests.log says so). The `bigmem` tests (10-20 GiB of
#   GPU memory each) run after the others, one at a time, as the stage "bigmem".
# - DEADLINE (seconds after the start): every stage ends by then, each cut short (exit 124)
#   where it would run longer, and a stage with under 20 s left is skipped, so the logs and a
#   summary come back inside the call's limit.
# - TIMEOUT_<stage> (e.g. TIMEOUT_tests=240), else STAGE_TIMEOUT: one stage's own limit, so the
#   stages after it still run.
# - FASTUNET_TESTS_ONE_TILE (default 1 here): the tests run each conv kernel's fallback tile
#   untimed (tests/conftest.py), not autotune's up to 9 per new shape; 0 autotunes.
#
# Within one 15-minute lease of a fresh H100 (a start takes 1-2 minutes; a call 10 at most):
#   call 1, timeout_s 570:
#     DEADLINE=540 TIMEOUT_tests=240 TEST_ARGS="-n 8" BENCH_ARGS="--compile none" \
#       benchmarks/gpu_check.sh $OUT build tests sanitizer bench
#   call 2, at once (the machine stays warm 30 s), with what is left:
#     DEADLINE=... BENCH_ARGS="--case N16-256-bf16 --model-seconds 0.5" \
#       benchmarks/gpu_check.sh $OUT build startup bench
#   (call 2's bench is the compile baseline: --compile standard is the default.)
#
# The GPU machine cannot download, and has no pytest-xdist or MONAI. The build stage installs
# the wheels in .gpu-wheels/ (git-ignored) first, if there are any: fetch them where a registry
# is reachable and carry the folder along:
#   pip download pytest-xdist execnet monai --no-deps -d .gpu-wheels
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT [build] [tests] [sanitizer] [bench] [startup] [profile]}
shift
stages=${*:-build tests sanitizer bench}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1
log=$out/stages.log
summary=()

note() {  # name, exit code, start, last line
  summary+=("$(printf '%-10s exit %-3s %4ss  %s' "$1" "$2" $((SECONDS - $3)) "${4:0:110}")")
}

run_stage() {  # name, log file, command...: runs it within its time, keeps its exit code
  local name=$1 file=$2
  shift 2
  local start=$SECONDS cap_name="TIMEOUT_$name"
  local limit=${!cap_name:-${STAGE_TIMEOUT:-0}}
  if [ -n "${DEADLINE:-}" ]; then
    local left=$((DEADLINE - SECONDS - 5))
    if [ "$left" -lt 20 ]; then
      note "$name" skip "$start" "skipped: ${left}s left before DEADLINE=$DEADLINE"
      return 0
    fi
    if [ "$limit" -eq 0 ] || [ "$limit" -gt "$left" ]; then limit=$left; fi
  fi
  echo "== $name: $* (limit ${limit}s; 0 is none)" >>"$file"
  timeout "$limit" "$@" >>"$file" 2>&1
  local code=$?
  echo "== $name: exit $code after $((SECONDS - start))s" >>"$file"
  note "$name" "$code" "$start" "$(grep -v -e '^\s*$' -e '^== ' "$file" | tail -n 1)"
  return $code
}

for stage in $stages; do
  case $stage in
    build)
      if compgen -G ".gpu-wheels/*.whl" >/dev/null; then
        run_stage wheels "$log" python3 -m pip install --no-deps --no-index .gpu-wheels/*.whl
      fi
      # The GPU's own arch only, unless FASTUNET_CUDA_ARCHS says otherwise: a quicker build.
      arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d .)
      # A warm machine keeps the last call's build (build/ and the .so are git-ignored): kept
      # when the CUDA sources are the same, which saves a second call a minute.
      sources=$(cat setup.py csrc/* | sha256sum | cut -c1-16)-${FASTUNET_CUDA_ARCHS:-$arch}
      if [ "$(cat build/gpu_check_sources 2>/dev/null)" = "$sources" ] &&
        python3 -c "from fastunet import _C; assert _C.build_info()['cuda']" 2>/dev/null; then
        note build 0 "$SECONDS" "kept the build of the same sources ($sources)"
      elif FASTUNET_CUDA=1 FASTUNET_CUDA_ARCHS=${FASTUNET_CUDA_ARCHS:-$arch} run_stage build \
        "$log" python3 -m pip install --no-build-isolation --no-deps -e .; then
        mkdir -p build && echo "$sources" >build/gpu_check_sources
      fi
      python3 -m fastunet.cli info >"$out/info.txt" 2>&1
      nvidia-smi >>"$out/info.txt" 2>&1
      ;;
    tests)
      test_args=${TEST_ARGS:-}
      if ! python3 -c "import xdist" 2>/dev/null && [[ " $test_args" =~ \ -n ]]; then
        echo "== no pytest-xdist here: TEST_ARGS='$test_args' without -n" >>"$out/tests.log"
        test_args=$(sed -E 's/(^|[[:space:]])-n[[:space:]]*[^[:space:]]+//g' <<<"$test_args")
      fi
      # One tile per conv kernel, untimed (tests/conftest.py), unless FASTUNET_TESTS_ONE_TILE=0.
      export FASTUNET_TESTS_ONE_TILE=${FASTUNET_TESTS_ONE_TILE:-1}
      # shellcheck disable=SC2086
      run_stage tests "$out/tests.log" python3 -m pytest tests -q -rs -p no:cacheprovider \
        --durations=15 -m "not bigmem" $test_args \
        --deselect tests/test_max_pool2d.py::test_compute_sanitizer_finds_no_errors
      run_stage bigmem "$out/tests.log" python3 -m pytest tests -q -rs -p no:cacheprovider \
        -m bigmem
      ;;
    sanitizer)
      run_stage sanitizer "$log" python3 -m pytest tests/test_max_pool2d.py -q -rs \
        -p no:cacheprovider -k compute_sanitizer
      ;;
    bench)
      plot=()
      python3 -c "import matplotlib" 2>/dev/null && plot=(--plot "$out/bench.png")
      # shellcheck disable=SC2086
      run_stage bench "$log" python3 -m fastunet.cli bench --no-progress \
        --output "$out/bench.json" --markdown "$out/bench.md" "${plot[@]}" ${BENCH_ARGS:-}
      ;;
    startup)
      run_stage startup "$log" python3 benchmarks/startup.py "$out"
      ;;
    profile)
      run_stage profile "$log" python3 benchmarks/profile_model.py "$out" --reduce-overhead
      ;;
    *)
      echo "unknown stage $stage (build, tests, sanitizer, bench, startup, profile)" >&2
      exit 2
      ;;
  esac
done

[ -f "$out/bench.md" ] && sed -n '/^### Model/,$p' "$out/bench.md" | head -n 14
echo
printf '%s\n' "${summary[@]}"
! printf '%s\n' "${summary[@]}" | grep -qv "exit 0 "
