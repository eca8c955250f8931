"""Optimizer-step backends: which exist, which can run here, and which "auto" picks per device.

Choice is explicit and explains itself: an explicit backend that cannot run raises with the stored reason, and
"auto" takes the first available backend in ``AUTO_ORDER`` for the parameters' device type. Nothing falls back
silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import _ops, reference

__all__ = ["Backend", "BACKENDS", "AUTO_ORDER", "backend_info", "select_backend", "check_backend_name"]

_FUSED_STEP_PENDING = "the fused optimizer-step kernels are not implemented yet (issue: fused optimizer step)"


@dataclass(frozen=True)
class Backend:
    name: str
    device_types: tuple[str, ...] | None  # None: any device torch runs on
    step: Callable | None  # signature of reference.step_
    description: str
    reason_fn: Callable[[], str | None]  # why it cannot run here at all, or None

    def unavailable_reason(self, device_type: str | None = None) -> str | None:
        reason = self.reason_fn()
        if reason is None and device_type is not None and self.device_types is not None \
                and device_type not in self.device_types:
            reason = f"runs on {'/'.join(self.device_types)} tensors only, not {device_type}"
        return reason


BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch", None, reference.step_, "pure-PyTorch reference over torch._foreach_* ops",
                     lambda: None),
    "cpp": Backend("cpp", ("cpu",), None, "fused C++ CPU kernel (legw_fused._C)",
                   lambda: _ops.EXTENSION_ERROR or _FUSED_STEP_PENDING),
    "cuda": Backend("cuda", ("cuda",), None, "fused multi-tensor CUDA kernel (legw_fused._C)",
                    lambda: _ops.EXTENSION_ERROR or ("legw_fused._C was built without CUDA sources"
                                                     if not _ops.WITH_CUDA else _FUSED_STEP_PENDING)),
    "triton": Backend("triton", ("cuda",), None, "fused multi-tensor Triton kernel",
                      lambda: _FUSED_STEP_PENDING),
}

# Fastest first; "torch" closes every list so that auto always finds a backend.
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}


def check_backend_name(backend: str) -> str:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    return backend


def select_backend(backend: str, device: torch.device) -> Backend:
    """The backend that runs a step on ``device``; raises with the reason if an explicit one cannot."""
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("torch",)):
            if BACKENDS[name].unavailable_reason(device.type) is None:
                return BACKENDS[name]
        raise AssertionError("the torch backend is always available")
    chosen = BACKENDS[check_backend_name(backend)]
    reason = chosen.unavailable_reason(device.type)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} cannot run on {device}: {reason}")
    return chosen


def backend_info() -> dict[str, dict]:
    """For each backend: whether it can run here, on which devices, and if not why; plus the compiled extension.

    ``info["auto"]`` maps each device type to the backend that ``backend="auto"`` would choose for it.
    """
    info: dict[str, dict] = {}
    for name, b in BACKENDS.items():
        reason = b.unavailable_reason()
        info[name] = {"available": reason is None, "reason": reason, "device_types": b.device_types or "any",
                      "description": b.description}
    info["auto"] = {dev: select_backend("auto", torch.device(dev)).name for dev in AUTO_ORDER}
    info["extension"] = {"available": _ops.EXTENSION_ERROR is None, "reason": _ops.EXTENSION_ERROR,
                         "with_cuda": _ops.WITH_CUDA,
                         "ops": {"legw_lr": [k for k in ("CPU", "CUDA") if _ops.has_kernel("legw_lr", k)]}}
    return info
