"""The ops of the fused optimizer step: loading legw_fused._C (C++ CPU / CUDA kernels), the Triton kernels'
ops, fake (meta) implementations, and thin Python wrappers.

The package works without the extension (the "torch" reference backend needs none of it); ``EXTENSION_ERROR`` says
why it could not be loaded, and ``backend_info()`` reports it.
"""

from __future__ import annotations

import importlib
import os

import torch

try:
    # Importing the shared library registers the legw_fused:: ops with the dispatcher.
    _C = importlib.import_module("legw_fused._C")

    EXTENSION_ERROR: str | None = None
    WITH_CUDA: bool = bool(_C.WITH_CUDA)
except ImportError as exc:
    _C = None
    EXTENSION_ERROR = (f"legw_fused._C is not built or failed to load ({exc}); reinstall with "
                       f"`pip install --no-build-isolation .` against the torch you run")
    WITH_CUDA = False


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``legw_fused::<op>`` has a kernel registered for ``dispatch_key`` ("CPU", "CUDA")."""
    return _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"legw_fused::{op}", dispatch_key)


def _fused_step_fake(params, grads, momentum_buffers, master_params, step, schedule, lr_tensor, lr, momentum,
                     dampening, weight_decay, nesterov, first_step, lars, trust_coefficient, eps, trust_clip,
                     grad_scale, found_inf, norms_sq, param_sq_partials, param_sq_cached) -> None:
    return None  # writes its mutable arguments only


def _sum_squares_fake(params, grads, master_params, param_sq_partials, grad_scale) -> torch.Tensor:
    device = params[0].device if params else torch.device("cpu")
    return torch.empty((2, len(params)), dtype=torch.float32, device=device)


if _C is not None:
    @torch.library.register_fake("legw_fused::legw_lr")
    def _legw_lr_fake(step: torch.Tensor, schedule: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(step, dtype=torch.float64)

    torch.library.register_fake("legw_fused::fused_step_", _fused_step_fake)
    torch.library.register_fake("legw_fused::sum_squares", _sum_squares_fake)


def legw_lr(step: torch.Tensor, schedule: torch.Tensor) -> torch.Tensor:
    """LEGW LR (float64) of each int64 step count in ``step``, evaluated by the C++/CUDA kernel on their device.

    ``schedule`` is ``LEGW.packed(step.device)``.
    """
    if _C is None:
        raise RuntimeError(EXTENSION_ERROR)
    return torch.ops.legw_fused.legw_lr(step, schedule)


# Elements per entry of the |p|^2 cache of the C++/CUDA kernels (kParamSqChunk, csrc/fused_step_args.h).
PARAM_SQ_CHUNK = 1 << 16


def fused_step_(*args) -> None:
    """legw_fused::fused_step_ (C++ CPU / CUDA kernels); arguments as in its schema (csrc/legw_fused.cpp)."""
    if _C is None:
        raise RuntimeError(EXTENSION_ERROR)
    torch.ops.legw_fused.fused_step_(*args)


def sum_squares(params, grads, master_params, param_sq_partials, grad_scale) -> torch.Tensor:
    """legw_fused::sum_squares: float32 [2, N] per-tensor sums of squares of the params (or masters, or summed from
    the |p|^2 cache) and of the grads times 1/grad_scale."""
    if _C is None:
        raise RuntimeError(EXTENSION_ERROR)
    return torch.ops.legw_fused.sum_squares(params, grads, master_params or [], param_sq_partials, grad_scale)


# The Triton kernels (kernels/fused_step.py) as ops of their own, with the same schemas as the C++ ops above
# (csrc/legw_fused.cpp; a test checks they stay equal). As ops they are opaque to torch.compile, which cannot trace
# the launcher itself: it builds pointer tables from data_ptr(). They are separate ops, not a second CUDA kernel of
# fused_step_, because both kinds of kernel can be present at once and backend= chooses between them. Registered
# without importing triton (slow); the kernels module is imported on the first call.
FUSED_STEP_ARGS = (
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] master_params, Tensor step, "
    "Tensor? schedule, Tensor? lr_tensor, float lr, float momentum, float dampening, float weight_decay, "
    "bool nesterov, bool first_step, bool lars, float trust_coefficient, float eps, bool trust_clip, "
    "Tensor? grad_scale, Tensor? found_inf, Tensor? norms_sq, Tensor(d!)? param_sq_partials, "
    "bool param_sq_cached) -> ()")
SUM_SQUARES_ARGS = ("(Tensor[] params, Tensor[] grads, Tensor[] master_params, Tensor? param_sq_partials, "
                    "Tensor? grad_scale) -> Tensor")
# On CPU tensors only in the interpreter (how the kernels are tested without a GPU).
TRITON_DEVICES = ("CUDA", "CPU") if os.environ.get("TRITON_INTERPRET") == "1" else ("CUDA",)

_triton_lib = torch.library.Library("legw_fused", "FRAGMENT")
_triton_lib.define("fused_step_triton_" + FUSED_STEP_ARGS)
_triton_lib.define("sum_squares_triton" + SUM_SQUARES_ARGS)


def _triton_fused_step(*args) -> None:
    from legw_fused.kernels import fused_step

    fused_step.fused_step_(*args)


def _triton_sum_squares(*args) -> torch.Tensor:
    from legw_fused.kernels import fused_step

    return fused_step.sum_squares(*args)


for _key in TRITON_DEVICES:
    _triton_lib.impl("fused_step_triton_", _triton_fused_step, _key)
    _triton_lib.impl("sum_squares_triton", _triton_sum_squares, _key)
# The device kernel, then the version counters of what it wrote (params, buffers, masters, |p|^2 chunk sums), as
# the C++ op's ADInplaceOrView kernel does (csrc/legw_fused.cpp, which says why).
_WRITTEN = tuple(i for i, a in enumerate(torch._C.parse_schema("f" + FUSED_STEP_ARGS).arguments)
                 if a.alias_info is not None and a.alias_info.is_write)


def _triton_fused_step_bump_versions(keyset, *args) -> None:
    torch.ops.legw_fused.fused_step_triton_.default.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset,
                                                               *args)
    for i in _WRITTEN:
        if args[i] is not None:
            torch.autograd.graph.increment_version(args[i])


_triton_lib.impl("fused_step_triton_", _triton_fused_step_bump_versions, "ADInplaceOrView", with_keyset=True)
torch.library.register_fake("legw_fused::fused_step_triton_", _fused_step_fake, lib=_triton_lib)
torch.library.register_fake("legw_fused::sum_squares_triton", _sum_squares_fake, lib=_triton_lib)


def fused_step_triton_(*args) -> None:
    """legw_fused::fused_step_triton_ (the Triton kernels); arguments and semantics as fused_step_'s."""
    torch.ops.legw_fused.fused_step_triton_(*args)


def sum_squares_triton(params, grads, master_params, param_sq_partials, grad_scale) -> torch.Tensor:
    """legw_fused::sum_squares_triton (the Triton kernels); as sum_squares."""
    return torch.ops.legw_fused.sum_squares_triton(params, grads, master_params or [], param_sq_partials, grad_scale)
