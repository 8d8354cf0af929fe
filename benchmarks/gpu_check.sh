#!/usr/bin/env bash
# The whole GPU check in one command, on a machine with torch, Triton and nvcc and no network
# (../shared/GPU.md): build in place, the test suite on CUDA, compute-sanitizer on the CUDA
# extension's tests, and `fastunet bench`. Everything lands in OUT; a short summary is printed
# last. Stages can be run one at a time to fit a 10-minute call:
#
#   benchmarks/gpu_check.sh OUT [build] [tests] [sanitizer] [bench] [profile]
#                                                   (default: build tests sanitizer bench)
#
# Files in OUT: build.log, info.txt, tests.log, sanitizer.log, bench.log, bench.json, bench.md,
# bench.png (the plot needs matplotlib), profile.log, profile.json. Variables: BENCH_ARGS and
# TEST_ARGS (e.g. "-n 8" with pytest-xdist) pass arguments on, STAGE_TIMEOUT (seconds) stops a
# stage that runs longer (exit 124) so the stages after it still run and the logs come back.
#
# The GPU machine cannot download, and has no pytest-xdist or MONAI. The build stage installs
# the wheels in .gpu-wheels/ (git-ignored) first, if there are any: fetch them where a registry
# is reachable and carry the folder along:
#   pip download pytest-xdist execnet monai --no-deps -d .gpu-wheels
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT [build] [tests] [sanitizer] [bench] [profile]}
shift
stages=${*:-build tests sanitizer bench}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1
summary=()

run_stage() {  # name, log, command...: runs it, keeps its exit code and last line
  local name=$1 log=$2
  shift 2
  local start=$SECONDS
  timeout "${STAGE_TIMEOUT:-0}" "$@" >"$out/$log" 2>&1
  local code=$?
  summary+=("$(printf '%-10s exit %-3s %4ss  %s' "$name" "$code" $((SECONDS - start)) \
    "$(grep -v '^\s*$' "$out/$log" | tail -n 1 | cut -c1-110)")")
  return $code
}

for stage in $stages; do
  case $stage in
    build)
      if compgen -G ".gpu-wheels/*.whl" >/dev/null; then
        python3 -m pip install --no-deps --no-index .gpu-wheels/*.whl >"$out/wheels.log" 2>&1
      fi
      # The GPU's own arch only, unless FASTUNET_CUDA_ARCHS says otherwise: a quicker build.
      arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d .)
      FASTUNET_CUDA=1 FASTUNET_CUDA_ARCHS=${FASTUNET_CUDA_ARCHS:-$arch} run_stage build build.log \
        python3 -m pip install --no-build-isolation --no-deps -e .
      python3 -m fastunet.cli info >"$out/info.txt" 2>&1
      nvidia-smi >>"$out/info.txt" 2>&1
      ;;
    tests)
      # shellcheck disable=SC2086
      run_stage tests tests.log python3 -m pytest tests -q -rs -p no:cacheprovider \
        --deselect tests/test_max_pool2d.py::test_compute_sanitizer_finds_no_errors ${TEST_ARGS:-}
      ;;
    sanitizer)
      run_stage sanitizer sanitizer.log python3 -m pytest tests/test_max_pool2d.py -q -rs \
        -p no:cacheprovider -k compute_sanitizer
      ;;
    bench)
      plot=()
      python3 -c "import matplotlib" 2>/dev/null && plot=(--plot "$out/bench.png")
      # shellcheck disable=SC2086
      run_stage bench bench.log python3 -m fastunet.cli bench --no-progress \
        --output "$out/bench.json" --markdown "$out/bench.md" "${plot[@]}" ${BENCH_ARGS:-}
      ;;
    profile)
      run_stage profile profile.log python3 benchmarks/profile_model.py "$out" --reduce-overhead
      ;;
    *)
      echo "unknown stage $stage (build, tests, sanitizer, bench, profile)" >&2
      exit 2
      ;;
  esac
done

[ -f "$out/bench.log" ] && sed -n '/^model/,$p' "$out/bench.log" | head -n 12
echo
printf '%s\n' "${summary[@]}"
! printf '%s\n' "${summary[@]}" | grep -qv 'exit 0 '
