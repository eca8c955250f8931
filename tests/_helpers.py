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


# ---------------------------------------------------------------- tolerances
# Every tolerance the tests use, in one table, each with the reason for its size. Compare with assert_close(actual,
# expected, "<key>"), or for a backend against the reference, assert_close_to_reference.
TOL = {
    "exact": dict(rtol=0, atol=0),
    # Fused kernels round differently from torch's op sequence (fused multiply-adds, the LR as a device value):
    # each step may differ by one ulp of a value's magnitude, which reaches ~8 in these tests (ulp(8) = 9.5e-7);
    # measured worst case over 40 steps: 9.5e-7. The same for a LEGW lr on the reference backend.
    "fused": dict(rtol=1e-6, atol=2e-6),
    # LARS norms reduced in another order than p.norm() per tensor: fp32 rounding of the ratio (~1e-7 relative).
    "lars_ratio": dict(rtol=1e-6, atol=2e-6),
    # A LARS step against its formula in float64: the fp32 ratio and update (a few ulps of |p|).
    "lars_formula": dict(rtol=1e-5, atol=1e-6),
    # fp32 sums of squares per chunk (the |p|^2 cache, sum_squares) against float64 sums: 16-lane fp32
    # accumulation over up to 64K elements.
    "chunk_sums": dict(rtol=2e-6, atol=1e-6),
    "sum_squares": dict(rtol=2e-6, atol=1e-7),
    # Two ranks against one process: the gradients differ by fp32 rounding (two 4-sample means averaged by the
    # reduce-scatter / all-reduce instead of one 8-sample mean), and momentum with a peak LR of 0.42 carries that
    # over 10 steps: seen 4.6e-6 absolute on weights of magnitude ~0.25 (elements near 0 take their neighbours').
    "distributed": dict(rtol=1e-5, atol=1e-5),
    # Trust ratios from all-reduced sums against one process's norms (float64 on the wire, fp32 sums).
    "distributed_ratio": dict(rtol=2e-5, atol=0),
    # The LEGW LR in float64 on a GPU (pow/cos in CUDA's libdevice against Python's math).
    "legw_lr_gpu": dict(rtol=1e-14, atol=1e-18),
    # One fp32 step against its value written out in Python (float64, rounded once): within an ulp of |p| ~ 1.
    "formula_fp32": dict(rtol=0, atol=1e-7),
    # bf16/fp16 params against an fp32 computation rounded to the dtype: one fp32 rounding difference (fma or not)
    # may flip the final rounding: one unit in the last place of the dtype.
    "bf16_rounding": dict(rtol=2 ** -7, atol=1e-6),
    "fp16_rounding": dict(rtol=2 ** -10, atol=1e-6),
    # The opposite check: two runs that must differ clearly (a changed input was not ignored).
    "clearly_different": dict(rtol=1e-4, atol=1e-5),
    # The schedule in float64 computed two ways (closed form against the step-by-step formula).
    "schedule_fp64": dict(rtol=1e-12, atol=1e-15),
}
# Backends against the reference, in ulps of the tensor's largest magnitude: both compute in fp32 and round once per
# stored value, but fp32 results can differ by an ulp (fma, the order of the norm reductions), which can flip a
# low-precision rounding, and a value keeps the difference it picked up at the largest magnitude it had (LEGW peak
# LR 1.41 swings values from |x| ~ 4 to 0.4 in one step; momentum 0.9 grows buffers ~10x). Seen: fp32 LARS buffers
# 2.9e-6 off at max |buf| ~ 10 (~2.4 ulps); bf16 params 0.023 off at max |p| ~ 4.5 (0.7 ulp).
ULPS = {torch.float32: 8, torch.bfloat16: 2, torch.float16: 2}
# LSTM against torch.nn.LSTM, per dtype: (forward, gradients), relative to max(1, the largest magnitude). fp32: GEMMs
# in another order and a polynomial exp (a few ulps, through T steps); bf16/fp16: GEMM inputs rounded, as torch's;
# fp64 (the C++ kernel's exact exp, GEMMs in another order): a few ulps of 2^-52 (seen 1.7e-16 over 6 steps).
LSTM_TOL = {torch.float32: (2e-5, 5e-5), torch.bfloat16: (4e-2, 6e-2), torch.float16: (5e-3, 8e-3),
            torch.float64: (1e-15, 1e-15)}


def tol_for(backend: str) -> dict:
    """legw_fused against torch.optim.SGD: bit for bit on the reference backend, TOL["fused"] on fused ones."""
    return TOL["exact"] if backend == "torch" else TOL["fused"]


def assert_close(actual, expected, kind: str, msg=None):
    """torch.testing.assert_close with the tolerance TOL[kind]."""
    torch.testing.assert_close(actual, expected, **TOL[kind], msg=msg)


def assert_close_to_reference(actual, expected, dtype, msg=None):
    """A backend's tensor against the reference's: within ULPS[dtype] ulps of the expected tensor's magnitude."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=ULPS[dtype] * torch.finfo(dtype).eps * scale, msg=msg)


def assert_close_scaled(name, got, want, tol):
    """Max |got - want| <= tol * max(1, max |want|) (the LSTM comparisons: errors grow with the magnitude)."""
    dtype = torch.float64 if want.dtype == torch.float64 else torch.float32  # fp64 compared in fp64
    got, want = got.to(dtype).cpu(), want.to(dtype)
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol:g} x {scale:.3g}"


def require_backend(name):
    """Skip (with the stored reason) if backend ``name`` cannot run on CPU tensors here."""
    import pytest

    import legw_fused

    reason = legw_fused.backends.STEP_BACKENDS[name].unavailable_reason("cpu")
    if reason is not None:
        pytest.skip(f"backend {name!r} unavailable: {reason}")
    return name
