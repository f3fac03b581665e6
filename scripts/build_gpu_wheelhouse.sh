#!/usr/bin/env bash
# For a GPU/TPU machine without internet: downloads, here, every wheel of one install line
# (README, Install) for the target's Python and platform into wheelhouse/ (git-ignored), with
# setuptools and wheel for the `pip install -e .` build. Copy the repository there, then install
# offline:
#
#   scripts/build_gpu_wheelhouse.sh [REQUIREMENTS] [PYTHON_VERSION] [ARCH]
#     defaults: requirements/cuda12.txt 3.11 x86_64 (CUDA 12: about 3 GB of wheels, the CUDA and
#     cuDNN libraries; requirements/tpu.txt: about 0.5 GB; ARCH aarch64 for Arm hosts)
#   python3 -m pip install --no-index --find-links wheelhouse -r requirements/cuda12.txt \
#     && python3 -m pip install --no-index --find-links wheelhouse -e .
#
# Binary-only: the sdist-only dependencies (tensorflow-datasets' promise) are built into
# wheelhouse/ first, as pure-Python wheels. A machine with internet needs none of this.
set -euo pipefail
cd "$(dirname "$0")/.."
REQUIREMENTS=${1:-requirements/cuda12.txt}
PY_VERSION=${2:-3.11}
ARCH=${3:-x86_64}
PYTHON=${PYTHON:-python3}
OUT=wheelhouse

PLATFORMS=()
for minor in $(seq 35 -1 17); do PLATFORMS+=(--platform "manylinux_2_${minor}_${ARCH}"); done
PLATFORMS+=(--platform "manylinux2014_${ARCH}")

rm -rf "$OUT" && mkdir -p "$OUT"
"$PYTHON" -m pip wheel -q --no-deps promise -w "$OUT"
"$PYTHON" -m pip download -q --python-version "$PY_VERSION" --implementation cp \
  "${PLATFORMS[@]}" --only-binary=:all: --find-links "$OUT" -d "$OUT" \
  -r "$REQUIREMENTS" setuptools wheel
ls -1 "$OUT" | wc -l
du -sh "$OUT"
