#!/usr/bin/env bash
# Compatibility check beside .ci/run's environment: the Triton kernels under the newest triton's interpreter (3.9,
# with the CPU build of torch 2.13) and compiled ahead of time by the oldest triton we support (3.6, the GPU
# machine's). About 15 minutes on 2 cores, most of it the interpreter tests.
#
# The extension is built CPU-only against this env's torch, in place in a copy of the working tree under
# .venv-compat/tree: built in the checkout itself it would replace the .venv build (same file name, other torch).
set -euo pipefail
cd "$(dirname "$0")/.."
ENV="$PWD/.venv-compat"
TREE="$ENV/tree"
PY="$ENV/bin/python"

test -x "$PY" || python3 -m venv "$ENV"
"$PY" -m pip install -q -r requirements-compat.txt

rm -rf "$TREE"
mkdir -p "$TREE"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp -P --parents -t "$TREE"
cd "$TREE"
# The package layout setup.py installs (legw_fused.kernels, legw_fused.bench), for imports from the tree.
ln -sfn ../kernels legw_fused/kernels
ln -sfn ../bench legw_fused/bench
LEGW_FUSED_SKIP_CUDA_BUILD=1 "$PY" setup.py -q build_ext --inplace
# This build is CPU-only on purpose (torch 2.13's CPU wheel has no CUDA headers): the tests that check a forced CUDA
# build (.ci/run exports LEGW_FUSED_FORCE_CUDA_BUILD=1 for the main environment) do not apply to it.
unset LEGW_FUSED_FORCE_CUDA_BUILD

echo "== triton $("$PY" -c 'import triton; print(triton.__version__)'): CPU and Triton-interpreter tests"
TRITON_INTERPRET=1 "$PY" -m pytest -q -x tests/test_fused_step.py tests/test_lars_norms.py tests/test_lstm.py \
    tests/test_triton_fused_step.py tests/test_triton_lstm.py

"$PY" -m pip install -q triton==3.6.0
echo "== triton $("$PY" -c 'import triton; print(triton.__version__)'): ahead-of-time compile for sm_80 / sm_90"
"$PY" -m pytest -q -x tests/test_triton_aot.py
