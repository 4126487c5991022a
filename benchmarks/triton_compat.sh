#!/usr/bin/env bash
# Check the alignment kernels against another Triton release without touching .venv (e.g. the device image's
# Triton 3.6 before spending GPU time): installs it (and, for its interpreter, a NumPy it supports) into a
# scratch directory placed first on PYTHONPATH, compiles every launch and tuning candidate for sm_80/sm_90,
# and runs the interpreter kernel tests.
#
#   bash benchmarks/triton_compat.sh 3.6.0 [numpy==2.2.6] [OUT_DIR]
#
# NumPy >= 2.3 refuses int() on one-element arrays, which Triton 3.6's interpreter does; compiled kernels
# are unaffected.
set -euo pipefail
VERSION=${1:?usage: $0 TRITON_VERSION [NUMPY_SPEC] [OUT_DIR]}
NUMPY=${2:-numpy==2.2.6}
OUT=${3:-benchmarks/results}
PY=${PY:-.venv/bin/python}
SCRATCH=${SCRATCH:-/tmp/erw_triton_$VERSION}
if [ ! -d "$SCRATCH/triton" ]; then
  "$PY" -m pip install -q --no-deps --target "$SCRATCH" "triton==$VERSION" "$NUMPY"
fi
export PYTHONPATH="$SCRATCH${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import triton, numpy; print('triton', triton.__version__, 'numpy', numpy.__version__)"
env -u TRITON_INTERPRET "$PY" -m erw_fast.kernels.aot --arch 80 90 \
  --json "$OUT/kernel_resources_triton$VERSION.json" --md "$OUT/kernel_resources_triton$VERSION.md" > /dev/null
env -u TRITON_INTERPRET "$PY" -m erw_fast.kernels.aot --tuning-candidates --arch 90 --dtype bf16 --d 768 1024 \
  > /dev/null
"$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_nt_xent.py tests/test_kernels_cosine.py \
  tests/test_kernels_tiles.py tests/test_kernels_aot.py tests/test_tune_alignment_smoke.py
