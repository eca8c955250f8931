#!/usr/bin/env bash
# One call on a lent GPU machine (see DEVELOPERS guide / the device tool): versions, the machine's copy bandwidth
# and bf16 matmul rate, an in-place build of the extension for Hopper, the GPU tests, then the benchmarks.
# Results go to $OUT (JSON, Markdown, logs); a short table is printed last. Usage: bash bench/gpu_session.sh
set -uo pipefail
OUT=${OUT:-bench/results/gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export LEGW_FUSED_FORCE_CUDA_BUILD=1
PY=${PY:-python3}

nvidia-smi | tee "$OUT/nvidia-smi.txt"
$PY - <<'PY' | tee "$OUT/machine.txt"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "device", torch.cuda.get_device_name())
from triton.testing import do_bench
n = 1 << 28
x, y = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
ms = do_bench(lambda: y.copy_(x), return_mode="median")
print(f"copy bandwidth: {8 * n / ms / 1e6:.0f} GB/s (read + write, {n * 4 / 2**30:.0f} GiB)")
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
ms = do_bench(lambda: a @ b, return_mode="median")
print(f"bf16 matmul 8192^3: {2 * 8192**3 / ms / 1e9:.0f} TFLOP/s")
PY

echo "== build"
$PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
$PY -m legw_fused info | tee "$OUT/info.txt"

echo "== GPU tests"
$PY -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu-tests.log" | tail -25

echo "== benchmarks"
$PY -m legw_fused.bench.optimizer --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -30
$PY -m legw_fused.bench.lstm --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench-lstm.log" | tail -60
