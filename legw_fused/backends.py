"""Backends: which implementations of the optimizer step and of the LSTM layer exist, which can run here, and which
"auto" picks per device. One mechanism for both op families: a registry of ``Backend`` entries and ``select``.

Choice is explicit and explains itself: an explicit backend that cannot run raises with the stored reason, and
"auto" takes the first available backend in ``AUTO_ORDER`` for the tensors' device type. Nothing falls back
silently.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

from . import ops
from .ops import fused_step, fused_step_reference, lstm, lstm_reference

__all__ = ["Backend", "StepBackend", "LSTMBackend", "STEP_BACKENDS", "LSTM_BACKENDS", "AUTO_ORDER", "select",
           "check_backend_name", "backend_info"]

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TRITON_INTERPRET = fused_step._TRITON_INTERPRET
_TRITON_DEVICES = ("cuda", "cpu") if _TRITON_INTERPRET else ("cuda",)  # CPU tensors only in the interpreter
_INTERPRETED = " (interpreted: TRITON_INTERPRET=1)" if _TRITON_INTERPRET else ""


@dataclass(frozen=True)
class Backend:
    name: str
    device_types: tuple[str, ...] | None  # None: any device torch runs on
    dtypes: tuple[torch.dtype, ...] | None  # None: any floating-point dtype
    description: str
    reason: str | None  # why it cannot run in this process at all (decided once, at import), or None
    contiguous_only: bool = True  # the fused kernels index tensors as flat arrays

    def unavailable_reason(self, device_type: str | None = None, dtype: torch.dtype | None = None,
                           contiguous: bool = True) -> str | None:
        reason = self.reason
        if reason is None and device_type is not None and self.device_types is not None \
                and device_type not in self.device_types:
            reason = f"runs on {'/'.join(self.device_types)} tensors only, not {device_type}"
        if reason is None and dtype is not None and self.dtypes is not None and dtype not in self.dtypes:
            reason = f"supports {', '.join(str(d).removeprefix('torch.') for d in self.dtypes)} tensors, not {dtype}"
        if reason is None and not contiguous and self.contiguous_only:
            reason = "needs contiguous tensors"
        return reason


@dataclass(frozen=True)
class StepBackend(Backend):
    # fused_step_reference.step_'s signature: one optimizer step over one bucket of tensors.
    step_: Callable = None
    # sum_squares(params, grads, masters, param_sq, grad_scale) -> [2, N] per-tensor sums of squares (the local half
    # of LARS's norms for sharded params).
    sum_squares: Callable = None
    # Elements per |p|^2 cache entry (param_sq); None: the backend keeps no |p|^2 cache.
    param_sq_chunk: int | None = None


@dataclass(frozen=True)
class LSTMBackend(Backend):
    # lstm_reference.layer's signature: one layer in one direction, with autograd.
    layer: Callable = None


def _triton_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    return ops.EXTENSION_ERROR  # the Triton ops' schemas live in the extension


def _extension_reason(op: str, dispatch_key: str) -> str | None:
    if ops.EXTENSION_ERROR:
        return ops.EXTENSION_ERROR
    if dispatch_key == "CUDA" and not ops.WITH_CUDA:
        return "legw_fused._C was built without CUDA sources"
    if not ops.has_kernel(op, dispatch_key):
        return f"legw_fused._C has no {dispatch_key} kernel for {op} (rebuild the extension)"
    return None


def _fused(name: str, device_types: tuple[str, ...], description: str, reason: str | None, op: Callable,
           sum_squares: Callable, param_sq_chunk: int) -> StepBackend:
    """A backend over one of the fused_step_ ops, through fused_step.step_'s calling convention."""
    return StepBackend(name, device_types, FUSED_DTYPES, description, reason,
                       step_=functools.partial(fused_step.step_, op, param_sq_chunk=param_sq_chunk),
                       sum_squares=sum_squares, param_sq_chunk=param_sq_chunk)


# What was built and installed does not change while the process runs: reasons are decided here, once, which also
# keeps step() free of dispatcher queries (torch.compile traces it).
STEP_BACKENDS: dict[str, StepBackend] = {
    "torch": StepBackend("torch", None, None, "pure-PyTorch reference over torch._foreach_* ops", None,
                         contiguous_only=False, step_=fused_step_reference.step_,
                         sum_squares=fused_step_reference.sum_squares),
    "cpp": _fused("cpp", ("cpu",), "fused C++ CPU kernel (legw_fused._C)", _extension_reason("fused_step_", "CPU"),
                  fused_step.fused_step_, fused_step.sum_squares, fused_step.PARAM_SQ_CHUNK),
    "cuda": _fused("cuda", ("cuda",), "fused multi-tensor CUDA kernel (legw_fused._C)",
                   _extension_reason("fused_step_", "CUDA"), fused_step.fused_step_, fused_step.sum_squares,
                   fused_step.PARAM_SQ_CHUNK),
    "triton": _fused("triton", _TRITON_DEVICES, "fused multi-tensor Triton kernel" + _INTERPRETED, _triton_reason(),
                     fused_step.fused_step_triton_, fused_step.sum_squares_triton, fused_step.TRITON_PARAM_SQ_CHUNK),
}

LSTM_BACKENDS: dict[str, LSTMBackend] = {
    "torch": LSTMBackend("torch", None, None, "pure-PyTorch reference (autograd through torch ops)", None,
                         contiguous_only=False, layer=lstm_reference.layer),
    "cpp": LSTMBackend("cpp", ("cpu",), FUSED_DTYPES + (torch.float64,),
                       "C++ CPU layer: hoisted input GEMM, fused pointwise forward/backward, batched weight grads",
                       _extension_reason("lstm_layer_fwd", "CPU"), contiguous_only=False,
                       layer=lstm.extension_layer),
    "cuda": LSTMBackend("cuda", ("cuda",), FUSED_DTYPES + (torch.float64,),
                        "CUDA layer: cuBLAS GEMMs + fused pointwise kernels",
                        _extension_reason("lstm_layer_fwd", "CUDA"), contiguous_only=False, layer=lstm.extension_layer),
    "triton": LSTMBackend("triton", _TRITON_DEVICES, FUSED_DTYPES,
                          "Triton: persistent whole-sequence kernel (small H) or per-step fused cell" + _INTERPRETED,
                          _triton_reason(), contiguous_only=False, layer=lstm.triton_layer),
}

# Fastest first; "torch" closes every list so that auto always finds a backend. The same order for both families.
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}

_FAMILY = {id(STEP_BACKENDS): "", id(LSTM_BACKENDS): "LSTM "}


def check_backend_name(backend: str, registry: dict[str, Backend] = STEP_BACKENDS) -> str:
    if backend != "auto" and backend not in registry:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(map(repr, registry))}, got {backend!r}")
    return backend


def select(registry: dict[str, Backend], backend: str, device: torch.device, dtype: torch.dtype | None = None,
           contiguous: bool = True) -> Backend:
    """The backend of ``registry`` that runs on tensors of ``device``/``dtype``; raises with the reason if an
    explicit one cannot. "auto" takes the first in AUTO_ORDER that can (the reference always can)."""
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("torch",)):
            if registry[name].unavailable_reason(device.type, dtype, contiguous) is None:
                return registry[name]
        raise AssertionError("the torch backend is always available")
    chosen = registry[check_backend_name(backend, registry)]
    reason = chosen.unavailable_reason(device.type, dtype, contiguous)
    if reason is not None:
        raise RuntimeError(f"{_FAMILY.get(id(registry), '')}backend {backend!r} cannot run on {device}"
                           f"{'' if dtype is None else f' with {dtype} tensors'}: {reason}")
    return chosen


def _describe(registry: dict[str, Backend]) -> dict[str, dict]:
    info: dict[str, dict] = {}
    for name, b in registry.items():
        reason = b.unavailable_reason()
        info[name] = {"available": reason is None, "reason": reason, "device_types": b.device_types or "any",
                      "dtypes": [str(d).removeprefix("torch.") for d in b.dtypes] if b.dtypes else "any",
                      "description": b.description}
    info["auto"] = {dev: select(registry, "auto", torch.device(dev)).name for dev in AUTO_ORDER}
    return info


def backend_info() -> dict[str, dict]:
    """For each optimizer-step backend: whether it can run here, on which devices, and if not why; ``"auto"``: the
    backend ``backend="auto"`` chooses per device type; ``"lstm"``: the same for the LSTM backends;
    ``"extension"``: the compiled extension and its kernels."""
    info = _describe(STEP_BACKENDS)
    info["lstm"] = _describe(LSTM_BACKENDS)
    info["extension"] = {"available": ops.EXTENSION_ERROR is None, "reason": ops.EXTENSION_ERROR,
                         "with_cuda": ops.WITH_CUDA,
                         "ops": {op: [k for k in ("CPU", "CUDA") if ops.has_kernel(op, k)]
                                 for op in ("legw_lr", "fused_step_", "sum_squares", "lstm_layer_fwd",
                                            "lstm_layer_bwd")}}
    return info
