"""The fused optimizer-step op family: ``legw_lr``, ``fused_step_`` and ``sum_squares`` (C++ CPU / CUDA kernels),
``fused_step_triton_`` and ``sum_squares_triton`` (the Triton kernels of kernels/fused_step.py), their fake
implementations for torch.compile, and ``step_``: the optimizer-level calling convention of
fused_step_reference.step_ on top of either kind of op.

Every schema is in csrc/legw_fused.cpp, with the version-counter (ADInplaceOrView) kernel of both step ops. The
Triton ops are ops of their own, not a second CUDA kernel of fused_step_: both kinds can be present on one device
and ``backend=`` chooses. As ops they are opaque to torch.compile, which cannot trace the Triton launcher itself
(it builds pointer tables from data_ptr()).
"""

from __future__ import annotations

import os

import torch

from ..schedule import LEGW
from . import _C, EXTENSION_ERROR

__all__ = ["legw_lr", "fused_step_", "sum_squares", "fused_step_triton_", "sum_squares_triton", "step_",
           "PARAM_SQ_CHUNK", "TRITON_PARAM_SQ_CHUNK"]

# Elements per entry of the |p|^2 cache of the C++/CUDA kernels (kParamSqChunk, csrc/fused_step_args.h).
PARAM_SQ_CHUNK = 1 << 16
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The Triton kernels' chunk (one program each, and one |p|^2 cache entry): kernels/fused_step.py's PARAM_SQ_CHUNK,
# by the same rule (a test checks), known here without importing triton.
TRITON_PARAM_SQ_CHUNK = 16384 if _TRITON_INTERPRET else 65536
# The Triton ops run on CPU tensors only in the interpreter (how the kernels are tested without a GPU).
TRITON_DEVICES = ("CUDA", "CPU") if _TRITON_INTERPRET else ("CUDA",)


# fused_step_'s way in from Python without torch.ops' boxing (csrc/step_python.cpp); absent from older builds.
_UNBOXED = getattr(_C, "fused_step_unboxed", None)


def _require_extension() -> None:
    if _C is None:
        raise RuntimeError(EXTENSION_ERROR)


def legw_lr(step: torch.Tensor, schedule: torch.Tensor) -> torch.Tensor:
    """LEGW LR (float64) of each int64 step count in ``step``, evaluated by the C++/CUDA kernel on their device.

    ``schedule`` is ``LEGW.packed(step.device)``.
    """
    _require_extension()
    return torch.ops.legw_fused.legw_lr(step, schedule)


def fused_step_(*args) -> None:
    """legw_fused::fused_step_ (C++ CPU / CUDA kernels); arguments as in its schema (csrc/legw_fused.cpp).

    Eager calls with plain tensors enter through ``_C.fused_step_unboxed``: the same op and dispatch, without
    torch.ops' boxing of every tensor; anything else, and torch.compile's tracing, through torch.ops."""
    _require_extension()
    if _UNBOXED is None or torch.compiler.is_compiling() or _UNBOXED(*args) is NotImplemented:
        torch.ops.legw_fused.fused_step_(*args)


def sum_squares(params, grads, master_params, param_sq, grad_scale) -> torch.Tensor:
    """legw_fused::sum_squares: float32 [2, N] per-tensor sums of squares of the params (or masters, or summed from
    the |p|^2 cache ``param_sq``) and of the grads times 1/grad_scale."""
    _require_extension()
    return torch.ops.legw_fused.sum_squares(params, grads, master_params or [], param_sq, grad_scale)


def fused_step_triton_(*args) -> None:
    """legw_fused::fused_step_triton_ (the Triton kernels); arguments and semantics as fused_step_'s."""
    _require_extension()
    torch.ops.legw_fused.fused_step_triton_(*args)


def sum_squares_triton(params, grads, master_params, param_sq, grad_scale) -> torch.Tensor:
    """legw_fused::sum_squares_triton (the Triton kernels); as sum_squares."""
    _require_extension()
    return torch.ops.legw_fused.sum_squares_triton(params, grads, master_params or [], param_sq, grad_scale)


def _fused_step_fake(*args) -> None:
    return None  # writes its mutable arguments only


def _sum_squares_fake(params, grads, master_params, param_sq, grad_scale) -> torch.Tensor:
    device = params[0].device if params else torch.device("cpu")
    return torch.empty((2, len(params)), dtype=torch.float32, device=device)


def _triton_fused_step(*args) -> None:
    from legw_fused.kernels import fused_step  # imported on the first call: triton's import is slow

    fused_step.fused_step_(*args)


def _triton_sum_squares(*args) -> torch.Tensor:
    from legw_fused.kernels import fused_step

    return fused_step.sum_squares(*args)


if _C is not None:
    @torch.library.register_fake("legw_fused::legw_lr")
    def _legw_lr_fake(step: torch.Tensor, schedule: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(step, dtype=torch.float64)

    for _name in ("fused_step_", "fused_step_triton_"):
        torch.library.register_fake(f"legw_fused::{_name}", _fused_step_fake)
    for _name in ("sum_squares", "sum_squares_triton"):
        torch.library.register_fake(f"legw_fused::{_name}", _sum_squares_fake)
    # The schemas are C++'s; the Triton kernels are registered here, without importing triton.
    _triton_lib = torch.library.Library("legw_fused", "IMPL")
    for _key in TRITON_DEVICES:
        _triton_lib.impl("fused_step_triton_", _triton_fused_step, _key)
        _triton_lib.impl("sum_squares_triton", _triton_sum_squares, _key)


def step_(op, params, grads, bufs, *, lr, step, momentum, dampening, weight_decay, nesterov, maximize=False,
          lars=False, trust_coefficient=0.0, eps=0.0, trust_clip=False, max_trust_ratio=None, grad_scale=None,
          found_inf=None, masters=None, norms_sq=None, param_sq=None, param_sq_cached=False, param_sq_chunk=None,
          advance_step=False):
    """fused_step_reference.step_'s calling convention on top of a fused_step_ op ``op`` (C++/CUDA or Triton), for
    contiguous tensors (the op raises otherwise; the optimizer makes non-contiguous grads contiguous).

    New momentum buffers are allocated here and filled by the kernel (buf = d). Under a GradScaler the step may be
    skipped on the device, so a new buffer must also be right if it is never written: zeros are, when dampening is
    0 (the next step computes m*0 + d = d); otherwise the optimizer reads found_inf on the host first.

    ``norms_sq`` ([2, N]: sums of squares of p and of the unscaled g, e.g. all-reduced over ranks) replaces the
    kernels' own norm pass. ``param_sq`` (one float32 per ``param_sq_chunk`` elements of each tensor, the |p|^2
    cache) receives the chunk sums of squares of the stored params; with ``param_sq_cached`` it already holds them
    for the current params and the norm pass reads only the grads. ``advance_step``: the last call of the op then
    advances ``step`` (not when found_inf skips the step).
    """
    schedule = lr.packed(step.device) if isinstance(lr, LEGW) else None
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    lr_value = float(lr) if schedule is None and lr_tensor is None else 0.0
    if norms_sq is not None and norms_sq.dtype != torch.float32:
        norms_sq = norms_sq.float()
    masters = masters or []
    max_ratio = float("inf") if max_trust_ratio is None else float(max_trust_ratio)

    def launch(ps, gs, bs, first_step, ms=masters, norms=norms_sq, sq=param_sq, advance=advance_step):
        op(ps, gs, bs, ms, step, schedule, lr_tensor, lr_value, float(momentum), float(dampening),
           float(weight_decay), nesterov, maximize, first_step, lars, float(trust_coefficient), float(eps),
           trust_clip, max_ratio, grad_scale, found_inf, norms, sq, param_sq_cached and sq is not None, advance)

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
    # the norms and of the |p|^2 cache (copied back after the calls).
    old = sorted(set(range(len(params))) - set(new))
    for idx, first in ((new, True), (old, False)):
        sub_norms = None if norms_sq is None else norms_sq[:, idx].contiguous()
        chunk_idx = None if param_sq is None else _chunk_index(params, idx, param_sq_chunk, param_sq.device)
        sub_sq = None if chunk_idx is None else param_sq[chunk_idx]
        launch([params[i] for i in idx], [grads[i] for i in idx], [bufs[i] for i in idx], first,
               [masters[i] for i in idx] if masters else [], sub_norms, sub_sq, advance_step and idx is old)
        if chunk_idx is not None:
            param_sq[chunk_idx] = sub_sq
    return bufs


def _chunk_index(params, idx, chunk, device) -> torch.Tensor:
    """Positions in the |p|^2 cache of the chunks of tensors ``idx``: made on ``device`` (no host copy)."""
    counts = [-(-p.numel() // chunk) for p in params]
    starts = [sum(counts[:i]) for i in range(len(params))]
    ranges = [torch.arange(starts[i], starts[i] + counts[i], device=device) for i in idx]
    return torch.cat(ranges) if ranges else torch.empty(0, dtype=torch.int64, device=device)
