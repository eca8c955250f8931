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
                trust_coefficient=0.0, eps=0.0, trust_clip=False, grad_scale=None, found_inf=None, masters=None):
    """reference.step_'s calling convention on top of a fused_step_ implementation ``op`` (the C++ op or the
    Triton launcher, same arguments).

    New momentum buffers are allocated here and filled by the kernel (buf = d). Under a GradScaler the step may be
    skipped on the device, so a new buffer must also be right if it is never written: zeros are, when dampening is
    0 (the next step computes m*0 + d = d); otherwise the optimizer reads found_inf on the host first.
    """
    grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
    schedule = lr.packed(step.device) if isinstance(lr, LEGW) else None
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    lr_value = float(lr) if schedule is None and lr_tensor is None else 0.0

    masters = masters or []

    def launch(ps, gs, bs, first_step, ms=masters):
        op(ps, gs, bs, ms, step, schedule, lr_tensor, lr_value, float(momentum), float(dampening),
           float(weight_decay), nesterov, first_step, lars, float(trust_coefficient), float(eps), trust_clip,
           grad_scale, found_inf)

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
    # Some tensors start their momentum now, others continue it: one call for each kind.
    old = sorted(set(range(len(params))) - set(new))
    for idx, first in ((new, True), (old, False)):
        launch([params[i] for i in idx], [grads[i] for i in idx], [bufs[i] for i in idx], first,
               [masters[i] for i in idx] if masters else [])
    return bufs


def _triton_step(*args, **kwargs):
    from legw_fused.kernels import fused_step  # imported on first use: triton's import is slow

    return _fused_step(fused_step.fused_step_, *args, **kwargs)


@dataclass(frozen=True)
class Backend:
    name: str
    device_types: tuple[str, ...] | None  # None: any device torch runs on
    dtypes: tuple[torch.dtype, ...] | None  # None: any floating-point dtype
    step: Callable  # reference.step_'s signature
    description: str
    reason: str | None  # why it cannot run in this process at all (decided once, at import), or None
    contiguous_only: bool = True  # the fused kernels index parameters as flat arrays

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
                     None, contiguous_only=False),
    "cpp": Backend("cpp", ("cpu",), FUSED_DTYPES, functools.partial(_fused_step, _ops.fused_step_),
                   "fused C++ CPU kernel (legw_fused._C)", _cpp_reason()),
    "cuda": Backend("cuda", ("cuda",), FUSED_DTYPES, functools.partial(_fused_step, _ops.fused_step_),
                    "fused multi-tensor CUDA kernel (legw_fused._C)", _cuda_reason()),
    # On CPU tensors only under TRITON_INTERPRET=1 (how it is tested without a GPU).
    "triton": Backend("triton", ("cuda", "cpu") if _TRITON_INTERPRET else ("cuda",), FUSED_DTYPES, _triton_step,
                      "fused multi-tensor Triton kernel" + (" (interpreted: TRITON_INTERPRET=1)"
                                                            if _TRITON_INTERPRET else ""), _triton_reason()),
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
                                 for op in ("legw_lr", "fused_step_")}}
    return info
