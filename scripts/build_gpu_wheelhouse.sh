#!/usr/bin/env bash
# Downloads, for Python 3.12 manylinux x86_64, the wheels the lent GPU machine's image lacks
# (tensorflow-datasets, ml_collections, array_record and what they need that the image does not
# have) into wheelhouse/ (git-ignored), to carry there with the working tree:
#
#   scripts/build_gpu_wheelhouse.sh            # here, with internet (about 8 MB, a minute)
#   run(carry=["wheelhouse"], command="pip install --no-index --no-deps wheelhouse/*.whl && ...")
#
# The image (docs/environment.md: Python 3.12.3, jax 0.11 CUDA, flax, optax, orbax-checkpoint,
# chex, absl-py, scikit-learn, matplotlib, tqdm, pillow, safetensors, torch, transformers) already
# has the packages in PRESENT below (theirs or their own requirements); those wheels are deleted.
# pyarrow (54 MB, a tensorflow-datasets requirement that tfds imports only for some builders,
# never on our paths) is left out unless --with-pyarrow: the carry limit is 64 MiB. Hence the
# --no-deps install above.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=wheelhouse
KEEP_PYARROW=0
[[ "${1:-}" == "--with-pyarrow" ]] && KEEP_PYARROW=1
PYTHON=${PYTHON:-python3}
PRESENT="absl_py numpy etils typing_extensions fsspec pyyaml requests certifi idna urllib3
charset_normalizer tqdm protobuf psutil"

rm -rf "$OUT" && mkdir -p "$OUT"
# promise (a tfds requirement) exists only as an sdist: build its pure-Python wheel first, so
# the binary-only download below finds it in $OUT.
"$PYTHON" -m pip wheel -q --no-deps promise==2.3 -w "$OUT"
"$PYTHON" -m pip download -q --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --only-binary=:all: --find-links "$OUT" -d "$OUT" \
  tensorflow-datasets ml_collections array_record
for name in $PRESENT; do
  rm -f "$OUT/${name}"-[0-9]*.whl
done
if [[ $KEEP_PYARROW == 0 ]]; then
  rm -f "$OUT"/pyarrow-[0-9]*.whl
fi
ls -1 "$OUT"
du -sh "$OUT"
