"""The reference optimizer step: readable fp32 PyTorch, over ``torch._foreach_*`` ops.

This is at once the "torch" backend (the fallback on every device), the oracle every fused backend is tested
against, and the benchmark baseline. It never reads a value back to the host and never loops over elements.

One call updates one bucket: tensors of one device and one dtype. Lists are indexed by tensor; ``lr`` is a float,
a 0-dim tensor on the bucket's device, or a LEGW schedule evaluated at the device step count ``step``. On CPU a
tensor LR and the step count are read as Python numbers (no device to sync with), so that ``p - lr * d`` is one
rounding as in torch.optim.SGD; on GPUs and under torch.compile they stay tensors (``p - (lr * d)``: two roundings).

Update (torch.optim.SGD's, with LARS's trust ratio r; r = 1 without LARS; g = -g first with maximize):
    d   = r * (g + weight_decay * p)
    buf = d                                          on the first step
    buf = momentum * buf + (1 - dampening) * d       after
    d   = d + momentum * buf   if nesterov else buf
    p   = p - lr * d
LARS: r = min(trust_coefficient * |p| / (|g| + weight_decay * |p| + eps), max_trust_ratio) where |p| > 0 and
|g| > 0, else 1; with trust_clip, r = min(r / lr, 1) where r was computed.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.sgd import sgd as _torch_functional_sgd

from ..schedule import LEGW

__all__ = ["step_", "sum_squares", "trust_ratios", "torch_sgd_"]


def _read_on_host(t: Tensor) -> bool:
    """Whether a 0-dim tensor is read as a Python number: on CPU, where .item() waits for nothing (not while
    torch.compile traces, where it would break the graph)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def sum_squares(params: list[Tensor], grads: list[Tensor], masters: list[Tensor] | None = None,
                param_sq: Tensor | None = None, grad_scale: Tensor | None = None) -> Tensor:
    """Per-tensor sums of squares, float64 [2, N]: row 0 of the params (the fp32 masters where given), row 1 of
    the grads times 1/grad_scale. This backend keeps no |p|^2 cache: ``param_sq`` must be None."""
    if param_sq is not None:
        raise AssertionError("the reference backend keeps no |p|^2 cache")
    if not params:
        return torch.zeros(2, 0, dtype=torch.float64)
    if grad_scale is not None:
        grads = torch._foreach_mul([g.float() if g.dtype in (torch.float16, torch.bfloat16) else g for g in grads],
                                   grad_scale.double().reciprocal().float())
    sq = [torch.stack(torch._foreach_norm(x, 2, dtype=torch.float64)) ** 2 for x in (masters or params, grads)]
    return torch.stack(sq)


def trust_ratios(params: list[Tensor], grads: list[Tensor], *, lr, weight_decay: float, trust_coefficient: float,
                 eps: float, trust_clip: bool, max_trust_ratio: float | None = None,
                 norms_sq: Tensor | None = None) -> Tensor:
    """LARS trust ratio of every tensor, as one vector (the tensors' dtype) on the bucket's device; the norms are
    the square roots of ``norms_sq`` ([2, N], see sum_squares) where given."""
    if norms_sq is not None:
        p_norm, g_norm = norms_sq.to(device=params[0].device, dtype=torch.float64).sqrt().to(params[0].dtype)
    else:
        # Norms accumulate in fp64: torch's fp32 accumulation is off by 1e-6 (relative) at 3e5 elements and 8e-5
        # at 4e6 on CPU, more than the fused kernels' error; an oracle must be the more accurate side.
        p_norm = torch.stack(torch._foreach_norm(params, 2, dtype=torch.float64)).to(params[0].dtype)
        g_norm = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64)).to(params[0].dtype)
    ratio = trust_coefficient * p_norm / (g_norm + weight_decay * p_norm + eps)
    if max_trust_ratio is not None:
        ratio = torch.clamp(ratio, max=max_trust_ratio)
    if trust_clip:
        # min(r / lr, 1), and 1 at lr = 0 (the limit; 0/0 would otherwise give NaN when trust_coefficient = 0).
        if isinstance(lr, Tensor):
            ratio = torch.where(lr > 0, torch.clamp(ratio / lr, max=1.0), 1.0).to(ratio.dtype)
        else:
            ratio = torch.clamp(ratio / lr, max=1.0) if lr > 0 else torch.ones_like(ratio)
    # A zero-norm weight (fresh zero init) or gradient would give r = 0 or inf; such tensors take the plain step.
    return torch.where((p_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))


def _update_(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor | None], *, lr, momentum: float,
             dampening: float, weight_decay: float, nesterov: bool, maximize: bool, lars: bool,
             trust_coefficient: float, eps: float, trust_clip: bool, max_trust_ratio: float | None,
             norms_sq: Tensor | None = None) -> list[Tensor | None]:
    """The update in the tensors' own precision (fp32 or fp64)."""
    # `grads` may be the parameters' own .grad tensors: every op below that could write them is out-of-place.
    if maximize:
        grads = torch._foreach_neg(grads)
    d = grads
    if weight_decay != 0:
        d = torch._foreach_add(grads, params, alpha=weight_decay)
    if lars:
        r = trust_ratios(params, grads, lr=lr, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                         eps=eps, trust_clip=trust_clip, max_trust_ratio=max_trust_ratio, norms_sq=norms_sq)
        d = torch._foreach_mul(d, list(r.unbind(0)))
    if momentum != 0:
        if all(b is not None for b in bufs):
            # Same op sequence as torch.optim.SGD(foreach=True), so fp32 results match it bit for bit.
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, d, alpha=1 - dampening)
        else:
            bufs = [d_i.detach().clone() if b is None else b.mul_(momentum).add_(d_i, alpha=1 - dampening)
                    for b, d_i in zip(bufs, d)]
        d = torch._foreach_add(d, bufs, alpha=momentum) if nesterov else bufs
    if isinstance(lr, Tensor):
        torch._foreach_sub_(params, torch._foreach_mul(d, lr))
    else:
        torch._foreach_add_(params, d, alpha=-lr)
    return bufs


def step_(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor | None], *, lr, step: Tensor,
          momentum: float, dampening: float, weight_decay: float, nesterov: bool, maximize: bool = False,
          lars: bool = False, trust_coefficient: float = 0.0, eps: float = 0.0, trust_clip: bool = False,
          max_trust_ratio: float | None = None, grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
          masters: list[Tensor] | None = None, norms_sq: Tensor | None = None, param_sq: Tensor | None = None,
          param_sq_cached: bool = False, torch_sgd: bool = False, differentiable: bool = False,
          advance_step: bool = False) -> list[Tensor | None]:
    """Update ``params`` (and the momentum buffers) in place; return the buffers, new ones made on first use.

    ``step`` is the device int64 step count (steps already taken); it is read only when ``lr`` is a LEGW schedule,
    and with ``advance_step`` it is then advanced by one (as the fused ops do in their last call of a step).
    bf16/fp16 tensors are computed in fp32 and rounded once when written back; with ``masters`` (fp32 copies of
    bf16/fp16 params, fp32 buffers) the update runs on the masters and the params receive their rounding. Grads are
    multiplied by 1/grad_scale (GradScaler's unscale, into new tensors). This backend cannot skip on the device:
    the optimizer reads found_inf on the host and calls it only for finite steps. ``norms_sq`` ([2, N], sums of
    squares of the params and the unscaled grads, e.g. all-reduced over the ranks of a sharded model) replaces the
    LARS norms. This backend keeps no |p|^2 cache: ``param_sq`` must be None. ``torch_sgd``: the plain SGD step
    of torch.optim's own functional SGD (sparse gradients; ``differentiable``: with autograd recording the update).
    """
    if found_inf is not None or param_sq is not None:
        raise AssertionError("the reference backend is only called for steps known to be finite, without a "
                             "|p|^2 cache")
    bufs = _step_(params, grads, bufs, lr=lr, step=step, momentum=momentum, dampening=dampening,
                  weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, lars=lars,
                  trust_coefficient=trust_coefficient, eps=eps, trust_clip=trust_clip, max_trust_ratio=max_trust_ratio,
                  grad_scale=grad_scale, masters=masters, norms_sq=norms_sq, torch_sgd=torch_sgd,
                  differentiable=differentiable)
    if advance_step:
        step.add_(1)
    return bufs


def _step_(params, grads, bufs, *, lr, step, momentum, dampening, weight_decay, nesterov, maximize, lars,
           trust_coefficient, eps, trust_clip, max_trust_ratio, grad_scale, masters, norms_sq, torch_sgd,
           differentiable):
    if not params:
        return bufs
    if torch_sgd:
        return torch_sgd_(params, grads, bufs, lr=lr, step=step, momentum=momentum, dampening=dampening,
                          weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, grad_scale=grad_scale,
                          differentiable=differentiable)
    if isinstance(lr, LEGW):
        # The schedule in Python (LEGW.lr, the definition) where the step count is at hand: the float torch's
        # LambdaLR(lr_lambda=LEGW.lr) would give. Else its tensor twin, in torch ops on the device.
        lr = lr.lr(int(step)) if _read_on_host(step) else lr.lr_tensor(step)
    elif isinstance(lr, Tensor) and _read_on_host(lr):
        lr = lr.item()
    hp = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
              maximize=maximize, lars=lars, trust_coefficient=trust_coefficient, eps=eps, trust_clip=trust_clip,
              max_trust_ratio=max_trust_ratio, norms_sq=norms_sq)
    low_precision = params[0].dtype in (torch.float16, torch.bfloat16)
    if low_precision:
        grads = [g.float() for g in grads]
    if grad_scale is not None:
        # GradScaler.unscale_'s arithmetic, in fp32 or wider: g * fp32(1 / double(scale)).
        grads = torch._foreach_mul(grads, grad_scale.double().reciprocal().float())
    if not low_precision:  # fp32 and fp64 run in their own precision
        return _update_(params, grads, bufs, **hp)
    if masters is not None:
        bufs = _update_(masters, grads, bufs, **hp)
        torch._foreach_copy_(params, masters)
        return bufs

    p32 = [p.float() for p in params]
    b32 = [None if b is None else b.float() for b in bufs]
    b32 = _update_(p32, grads, b32, **hp)
    torch._foreach_copy_(params, p32)
    out: list[Tensor | None] = []
    for b, new in zip(bufs, b32):
        if new is None:
            out.append(None)
        elif b is None:
            out.append(new.to(params[0].dtype))
        else:
            b.copy_(new)
            out.append(b)
    return out


def torch_sgd_(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor | None], *, lr, step: Tensor,
               momentum: float, dampening: float, weight_decay: float, nesterov: bool, maximize: bool,
               grad_scale: Tensor | None, differentiable: bool) -> list[Tensor | None]:
    """torch.optim.SGD's own single-tensor step (torch.optim.sgd.sgd): for sparse gradients, which our update
    does not take, and for ``differentiable=True``, where autograd records the update as torch's does. A LEGW lr
    is evaluated on the host (a device sync on GPUs: these are torch's slow paths anyway)."""
    if isinstance(lr, LEGW):
        lr = lr.lr(int(step))
    if grad_scale is not None:  # GradScaler's unscale (torch's functional SGD takes no grad_scale)
        inv_scale = grad_scale.double().reciprocal().float()
        grads = [g * inv_scale for g in grads]
    bufs = list(bufs)
    with torch.set_grad_enabled(differentiable):
        _torch_functional_sgd(params, grads, bufs, has_sparse_grad=any(g.is_sparse for g in grads),
                              foreach=False, fused=False, weight_decay=weight_decay, momentum=momentum, lr=lr,
                              dampening=dampening, nesterov=nesterov, maximize=maximize)
    return bufs
