"""Optimizer-step backends: which exist, which can run here, and which "auto" picks per device.

Choice is explicit and explains itself: an explicit backend that cannot run raises with the stored reason, and
"auto" takes the first available backend in ``AUTO_ORDER`` for the parameters' device type. Nothing falls back
silently.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import _ops, reference
from .schedule import LEGW

__all__ = ["Backend", "BACKENDS", "AUTO_ORDER", "backend_info", "select_backend", "check_backend_name"]

_STEP_PENDING = "this fused optimizer-step kernel is not implemented yet (issue: fused optimizer step)"
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _fused_step(op, params, grads, bufs, *, lr, step, momentum, dampening, weight_decay, nesterov, lars=False,
                trust_coefficient=0.0, eps=0.0, trust_clip=False, grad_scale=None, found_inf=None, masters=None,
                norms_sq=None, param_sq=None, param_sq_cached=False, norm_chunk=None):
    """reference.step_'s calling convention on top of a fused_step_ implementation ``op`` (the C++ op or the
    Triton launcher, same arguments).

    New momentum buffers are allocated here and filled by the kernel (buf = d). Under a GradScaler the step may be
    skipped on the device, so a new buffer must also be right if it is never written: zeros are, when dampening is
    0 (the next step computes m*0 + d = d); otherwise the optimizer reads found_inf on the host first.

    ``norms_sq`` ([2, N]: sums of squares of p and of the unscaled g, e.g. all-reduced over ranks) replaces the
    kernels' own norm pass. ``param_sq`` (one float32 per ``norm_chunk`` elements of each tensor) receives the
    chunk sums of squares of the stored params; with ``param_sq_cached`` it already holds them for the current
    params and the norm pass reads only the grads.
    """
    grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
    schedule = lr.packed(step.device) if isinstance(lr, LEGW) else None
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    lr_value = float(lr) if schedule is None and lr_tensor is None else 0.0
    if norms_sq is not None and norms_sq.dtype != torch.float32:
        norms_sq = norms_sq.float()

    masters = masters or []

    def launch(ps, gs, bs, first_step, ms=masters, norms=norms_sq, partials=param_sq):
        op(ps, gs, bs, ms, step, schedule, lr_tensor, lr_value, float(momentum), float(dampening),
           float(weight_decay), nesterov, first_step, lars, float(trust_coefficient), float(eps), trust_clip,
           grad_scale, found_inf, norms, partials, param_sq_cached and partials is not None)

    if momentum == 0:
        launch(params, grads, [], False)
        return bufs
    new = [i for i, b in enumerate(bufs) if b is None]
    if not new:
        launch(params, grads, bufs, False)
        return bufs
    zero_init = found_inf is not None
    like = masters or params  # buffers are fp32 with master weights
    bufs = [(torch.zeros_like(x) if zero_init else torch.empty_like(x)) if b is None else b
            for x, b in zip(like, bufs)]
    if zero_init or len(new) == len(params):
        launch(params, grads, bufs, not zero_init)
        return bufs
    # Some tensors start their momentum now, others continue it: one call for each kind, each with its slices of
    # the norms and of the |p|^2 chunk sums (copied back after the calls).
    old = sorted(set(range(len(params))) - set(new))
    if param_sq is not None:
        counts = [-(-p.numel() // norm_chunk) for p in params]
        starts = [sum(counts[:i]) for i in range(len(params))]
    for idx, first in ((new, True), (old, False)):
        sub_norms = None if norms_sq is None else norms_sq[:, idx].contiguous()
        sub_sq = None
        if param_sq is not None:
            ranges = [torch.arange(starts[i], starts[i] + counts[i]) for i in idx]
            chunk_idx = torch.cat(ranges).to(param_sq.device) if ranges else None
            sub_sq = param_sq[chunk_idx].contiguous() if chunk_idx is not None else param_sq[:0]
        launch([params[i] for i in idx], [grads[i] for i in idx], [bufs[i] for i in idx], first,
               [masters[i] for i in idx] if masters else [], sub_norms, sub_sq)
        if sub_sq is not None and chunk_idx is not None:
            param_sq[chunk_idx] = sub_sq
    return bufs


@dataclass(frozen=True)
class Backend:
    name: str
    device_types: tuple[str, ...] | None  # None: any device torch runs on
    dtypes: tuple[torch.dtype, ...] | None  # None: any floating-point dtype
    step: Callable  # reference.step_'s signature
    description: str
    reason: str | None  # why it cannot run in this process at all (decided once, at import), or None
    contiguous_only: bool = True  # the fused kernels index parameters as flat arrays
    # sum_squares(params, grads, masters, param_sq_partials, grad_scale) -> [2, N] per-tensor sums of squares (the
    # local half of LARS's norms for sharded params).
    sum_squares: Callable | None = None
    # Elements per |p|^2 cache entry (the kernels' chunk); None: the backend keeps no |p|^2 cache.
    norm_chunk: int | None = None

    def run_step(self, *args, param_sq=None, param_sq_cached=False, **kwargs):
        """``step`` with the |p|^2 cache arguments only for backends that keep one."""
        if self.norm_chunk is None:
            return self.step(*args, **kwargs)
        return self.step(*args, param_sq=param_sq, param_sq_cached=param_sq_cached, norm_chunk=self.norm_chunk,
                         **kwargs)

    def unavailable_reason(self, device_type: str | None = None, dtype: torch.dtype | None = None,
                           contiguous: bool = True) -> str | None:
        reason = self.reason
        if reason is None and device_type is not None and self.device_types is not None \
                and device_type not in self.device_types:
            reason = f"runs on {'/'.join(self.device_types)} tensors only, not {device_type}"
        if reason is None and dtype is not None and self.dtypes is not None and dtype not in self.dtypes:
            reason = f"supports {', '.join(str(d).removeprefix('torch.') for d in self.dtypes)} params, not {dtype}"
        if reason is None and not contiguous and self.contiguous_only:
            reason = "needs contiguous parameters"
        return reason


_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Elements per program of the Triton kernels: kernels/fused_step.py's CHUNK, by the same rule (a test checks), known
# here without importing triton. It is also the layout of the Triton backend's |p|^2 cache.
TRITON_CHUNK = 16384 if _TRITON_INTERPRET else 65536


def _triton_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    return None


def _cpp_reason() -> str | None:
    return _ops.EXTENSION_ERROR or (None if _ops.has_kernel("fused_step_", "CPU") else
                                    "legw_fused._C has no CPU kernel for fused_step_ (rebuild the extension)")


def _cuda_reason() -> str | None:
    if _ops.EXTENSION_ERROR:
        return _ops.EXTENSION_ERROR
    if not _ops.WITH_CUDA:
        return "legw_fused._C was built without CUDA sources"
    return None if _ops.has_kernel("fused_step_", "CUDA") else _STEP_PENDING


# What was built and installed does not change while the process runs: reasons are decided here, once, which also
# keeps step() free of dispatcher queries (torch.compile traces it).
BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch", None, None, reference.step_, "pure-PyTorch reference over torch._foreach_* ops",
                     None, contiguous_only=False, sum_squares=reference.sum_squares),
    "cpp": Backend("cpp", ("cpu",), FUSED_DTYPES, functools.partial(_fused_step, _ops.fused_step_),
                   "fused C++ CPU kernel (legw_fused._C)", _cpp_reason(), sum_squares=_ops.sum_squares,
                   norm_chunk=_ops.PARAM_SQ_CHUNK),
    "cuda": Backend("cuda", ("cuda",), FUSED_DTYPES, functools.partial(_fused_step, _ops.fused_step_),
                    "fused multi-tensor CUDA kernel (legw_fused._C)", _cuda_reason(), sum_squares=_ops.sum_squares,
                    norm_chunk=_ops.PARAM_SQ_CHUNK),
    # On CPU tensors only under TRITON_INTERPRET=1 (how it is tested without a GPU).
    "triton": Backend("triton", ("cuda", "cpu") if _TRITON_INTERPRET else ("cuda",), FUSED_DTYPES,
                      functools.partial(_fused_step, _ops.fused_step_triton_),
                      "fused multi-tensor Triton kernel" + (" (interpreted: TRITON_INTERPRET=1)"
                                                            if _TRITON_INTERPRET else ""), _triton_reason(),
                      sum_squares=_ops.sum_squares_triton, norm_chunk=TRITON_CHUNK),
}

# Fastest first; "torch" closes every list so that auto always finds a backend.
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}


def check_backend_name(backend: str) -> str:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    return backend


def select_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None,
                   contiguous: bool = True) -> Backend:
    """The backend that runs a step on tensors of ``device``/``dtype``; raises with the reason if an explicit one
    cannot. "auto" takes the first in AUTO_ORDER that can (the reference always can)."""
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("torch",)):
            if BACKENDS[name].unavailable_reason(device.type, dtype, contiguous) is None:
                return BACKENDS[name]
        raise AssertionError("the torch backend is always available")
    chosen = BACKENDS[check_backend_name(backend)]
    reason = chosen.unavailable_reason(device.type, dtype, contiguous)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} cannot run on {device}"
                           f"{'' if dtype is None else f' with {dtype} params'}: {reason}")
    return chosen


def backend_info() -> dict[str, dict]:
    """For each backend: whether it can run here, on which devices, and if not why; plus the compiled extension.

    ``info["auto"]`` maps each device type to the backend that ``backend="auto"`` would choose for it.
    """
    info: dict[str, dict] = {}
    for name, b in BACKENDS.items():
        reason = b.unavailable_reason()
        info[name] = {"available": reason is None, "reason": reason, "device_types": b.device_types or "any",
                      "dtypes": [str(d).removeprefix("torch.") for d in b.dtypes] if b.dtypes else "any",
                      "description": b.description}
    info["auto"] = {dev: select_backend("auto", torch.device(dev)).name for dev in AUTO_ORDER}
    info["extension"] = {"available": _ops.EXTENSION_ERROR is None, "reason": _ops.EXTENSION_ERROR,
                         "with_cuda": _ops.WITH_CUDA,
                         "ops": {op: [k for k in ("CPU", "CUDA") if _ops.has_kernel(op, k)]
                                 for op in ("legw_lr", "fused_step_", "sum_squares")}}
    return info
