"""Which implementation runs an LSTM layer: the same names and the same "auto" rule as the optimizer backends.

Every backend implements one layer in one direction with autograd (see functional.py for the maths):
``layer(x [T,B,I], h0 [B,H], c0 [B,H], w_ih, w_hh, b_ih, b_hh, reverse) -> (out [T,B,H], h_n, c_n)``.
"""

from __future__ import annotations

import importlib.util

import torch

from . import _ops
from .lstm_autograd import compiled_layer, triton_layer
from .backends import _TRITON_INTERPRET, FUSED_DTYPES, Backend

__all__ = ["LSTM_BACKENDS", "LSTM_AUTO_ORDER", "select_lstm_backend"]


def _reference_layer(*args):
    from .functional import lstm_layer_reference

    return lstm_layer_reference(*args)


def _compiled_reason(dispatch_key: str) -> str | None:
    if _ops.EXTENSION_ERROR:
        return _ops.EXTENSION_ERROR
    if dispatch_key == "CUDA" and not _ops.WITH_CUDA:
        return "legw_fused._C was built without CUDA sources"
    if not hasattr(torch.ops.legw_fused, "lstm_layer_fwd") or not _ops.has_kernel("lstm_layer_fwd", dispatch_key):
        return f"legw_fused._C has no {dispatch_key} kernel for lstm_layer_fwd (rebuild the extension)"
    return None


def _triton_reason() -> str | None:
    return None if importlib.util.find_spec("triton") else "triton is not installed (pip install triton)"


# Decided once at import, as for the optimizer backends. ``Backend.step`` is the layer function here.
LSTM_BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch", None, None, _reference_layer, "pure-PyTorch reference (autograd through torch ops)",
                     None, contiguous_only=False),
    "cpp": Backend("cpp", ("cpu",), FUSED_DTYPES + (torch.float64,), compiled_layer,
                   "C++ CPU layer: hoisted input GEMM, fused pointwise forward/backward, batched weight grads",
                   _compiled_reason("CPU")),
    "cuda": Backend("cuda", ("cuda",), FUSED_DTYPES + (torch.float64,), compiled_layer,
                    "CUDA layer: cuBLAS GEMMs + fused pointwise kernels", _compiled_reason("CUDA")),
    "triton": Backend("triton", ("cuda", "cpu") if _TRITON_INTERPRET else ("cuda",), FUSED_DTYPES, triton_layer,
                      "Triton: persistent whole-sequence kernel (small H) or per-step fused cell"
                      + (" (interpreted: TRITON_INTERPRET=1)" if _TRITON_INTERPRET else ""), _triton_reason()),
}

LSTM_AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}


def select_lstm_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> Backend:
    """The LSTM backend for tensors of ``device``/``dtype``; raises with the reason if an explicit one cannot run."""
    if backend == "auto":
        for name in LSTM_AUTO_ORDER.get(device.type, ("torch",)):
            if LSTM_BACKENDS[name].unavailable_reason(device.type, dtype) is None:
                return LSTM_BACKENDS[name]
        raise AssertionError("the torch backend is always available")
    if backend not in LSTM_BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(map(repr, LSTM_BACKENDS))}, got {backend!r}")
    chosen = LSTM_BACKENDS[backend]
    reason = chosen.unavailable_reason(device.type, dtype)
    if reason is not None:
        raise RuntimeError(f"LSTM backend {backend!r} cannot run on {device}"
                           f"{'' if dtype is None else f' with {dtype}'}: {reason}")
    return chosen
