"""Shared test utilities: parameter sets, identical random gradients, state snapshots, the LEGW formula."""

from __future__ import annotations

import copy
import math

import torch

# Awkward sizes: empty, scalar-like, odd, and one past a power of two.
SHAPES = [(7, 5), (13,), (1,), (0,), (3, 4, 5), (65,), (2, 33)]


def make_params(shapes=SHAPES, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float32).to(dtype=dtype, device=device))
            for s in shapes]


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def set_random_grads(param_sets, gen, skip=()):
    """Give every parameter set the same fresh random gradients (cloned, so no set can alter another's)."""
    first = param_sets[0]
    for i, p in enumerate(first):
        g = None if i in skip else torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * 0.5
        for params in param_sets:
            params[i].grad = None if g is None else g.clone().to(params[i].device)


def snapshot(opt):
    """Deep copy of everything an optimizer step could change: parameters and state."""
    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    state = {id(p): {k: (v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v))
                     for k, v in s.items()} for p, s in opt.state.items()}
    return params, state


def assert_unchanged(opt, snap):
    params, state = snap
    now = [p.detach() for g in opt.param_groups for p in g["params"]]
    assert len(now) == len(params)
    for a, b in zip(now, params):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert set(id(p) for p in opt.state) == set(state)
    for p, s in opt.state.items():
        assert set(s) == set(state[id(p)])
        for k, v in s.items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(v, state[id(p)][k], rtol=0, atol=0, equal_nan=True)


def expected_lr(t, base_lr, base_bs, bs, base_warmup_epochs, spe, epochs, decay="poly", power=2.0, end_lr=0.0,
                gamma=0.1, milestones=(), scaling="sqrt", warmup_scaling="linear"):
    """The schedule as the issue states it, from the raw arguments."""
    k = bs / base_bs
    peak = {"sqrt": base_lr * k ** 0.5, "linear": base_lr * k, "none": base_lr}[scaling]
    warm_epochs = base_warmup_epochs * k if warmup_scaling == "linear" else base_warmup_epochs
    W = round(warm_epochs * spe)
    T = round(epochs * spe)
    if t < W:
        return peak * (t + 1) / W
    s = 1.0 if T == W else min((t - W) / (T - W), 1.0)
    if decay == "poly":
        return end_lr + (peak - end_lr) * (1 - s) ** power
    if decay == "cosine":
        return end_lr + (peak - end_lr) * (1 + math.cos(math.pi * s)) / 2
    if decay == "exp":
        return peak * gamma ** ((t - W) / spe)
    if decay == "step":
        return peak * gamma ** len([m for m in milestones if t >= round(m * spe)])
    return peak


def legw_formula(base_lr, base_bs, bs, base_warmup_epochs, spe, epochs, **kwargs):
    """expected_lr as a function of t, for torch's LambdaLR."""
    return lambda t: expected_lr(t, base_lr, base_bs, bs, base_warmup_epochs, spe, epochs, **kwargs)


EXACT = dict(rtol=0, atol=0)
# Fused kernels round differently from torch's op sequence (fused multiply-adds, the LR as a device value): each step
# may differ by one ulp of a value's magnitude, which reaches ~8 in these tests (ulp(8) = 9.5e-7).
FUSED_TOL = dict(rtol=1e-6, atol=2e-6)


def require_backend(name):
    """Skip (with the stored reason) if backend ``name`` cannot run on CPU tensors here."""
    import pytest

    import legw_fused

    reason = legw_fused.backends.BACKENDS[name].unavailable_reason("cpu")
    if reason is not None:
        pytest.skip(f"backend {name!r} unavailable: {reason}")
    return name
