"""The legw_fused ops, one module per op family: the compiled extension legw_fused._C (C++ CPU and CUDA kernels,
every op schema: csrc/legw_fused.cpp) loaded here, and per family its wrappers, fake implementations, autograd
and Triton registrations (``fused_step``, ``lstm``) beside a readable pure-PyTorch reference
(``fused_step_reference``, ``lstm_reference``).

The package works without the extension (the "torch" reference backends need none of it); ``EXTENSION_ERROR``
says why it could not be loaded, and ``legw_fused.backend_info()`` reports it.
"""

from __future__ import annotations

import importlib

import torch

try:
    # Importing the shared library registers the legw_fused:: ops with the dispatcher.
    _C = importlib.import_module("legw_fused._C")

    EXTENSION_ERROR: str | None = None
    WITH_CUDA: bool = bool(_C.WITH_CUDA)
    # The C++ CPU LSTM in this process (csrc/lstm.h): whether fp32 sequences run the whole-sequence kernel, which
    # build of the row loops runs ("avx512", "avx2", "baseline"), the sequence kernel's GEMMs ("brgemm": oneDNN's
    # micro-kernel, "blas": the sgemm ATen calls, MKL in x86-64 wheels; LEGW_FUSED_LSTM_CPU_GEMM may choose) and
    # whether that BLAS sgemm was found.
    LSTM_CPU_SEQUENCE: bool = bool(_C.LSTM_CPU_SEQUENCE)
    LSTM_CPU_ROWS: str = _C.LSTM_CPU_ROWS
    LSTM_CPU_GEMM: str = _C.LSTM_CPU_GEMM
    LSTM_CPU_BLAS: bool = bool(_C.LSTM_CPU_BLAS)
except ImportError as exc:
    _C = None
    EXTENSION_ERROR = (f"legw_fused._C is not built or failed to load ({exc}); reinstall with "
                       f"`pip install --no-build-isolation .` against the torch you run")
    WITH_CUDA = False
    LSTM_CPU_SEQUENCE = False
    LSTM_CPU_ROWS = "none"
    LSTM_CPU_GEMM = "none"
    LSTM_CPU_BLAS = False


def _torch_cpu_gemm_native(dtype: torch.dtype) -> bool:
    """Whether torch's CPU GEMMs run ``dtype`` (bf16/fp16) on this CPU's own instructions: oneDNN's check, the one
    torch's CPU kernels follow (bf16 from AVX-512 up, fp16 from AVX-512 FP16 / AMX up). Without them a bf16 or fp16
    GEMM takes a slow generic path (an AVX2 EPYC: a [128, 128]·[128, 512] bf16 GEMM 11x the fp32 one's time)."""
    name = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    check = getattr(torch.ops.mkldnn, name, None)
    return bool(check()) if check is not None else False


# The half-precision dtypes the C++ CPU LSTM computes in fp32 — the layer on the whole-sequence kernel, the cell on
# fp32 GEMMs (inputs and weights widened on entry, the outputs rounded once on exit, gradients likewise): those
# torch has no native GEMM for on this CPU. Elsewhere, and without the sequence kernel, half precision runs the
# per-step path in its own dtype.
LSTM_CPU_HALF_IN_FP32: frozenset[torch.dtype] = frozenset(
    dt for dt in (torch.bfloat16, torch.float16) if LSTM_CPU_SEQUENCE and not _torch_cpu_gemm_native(dt))


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``legw_fused::<op>`` has a kernel registered for ``dispatch_key`` ("CPU", "CUDA")."""
    return _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"legw_fused::{op}", dispatch_key)
