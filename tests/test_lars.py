"""legw_fused.LARS against a per-parameter reference written from the formula, and against timm's Lars."""

import pytest
import torch

import legw_fused
from _helpers import TOL, assert_close, clone_params, legw_formula, make_params, set_random_grads, tol_for
from legw_fused import LEGW


class FormulaLARS:
    """LARS written out per parameter, straight from the issue's definition, with Python-float control flow."""

    def __init__(self, params, lr, momentum, dampening, weight_decay, nesterov, tc, eps, trust_clip, lars=True):
        self.params, self.lr, self.m, self.damp, self.wd, self.nesterov = params, lr, momentum, dampening, \
            weight_decay, nesterov
        self.tc, self.eps, self.clip, self.lars = tc, eps, trust_clip, lars
        self.bufs = [None] * len(params)
        self.t = 0

    @torch.no_grad()
    def step(self):
        lr = self.lr(self.t) if callable(self.lr) else self.lr
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad
            r = 1.0
            p_norm, g_norm = p.double().norm().item(), g.double().norm().item()  # exact enough to be the oracle
            if self.lars and p_norm > 0 and g_norm > 0:
                r = self.tc * p_norm / (g_norm + self.wd * p_norm + self.eps)
                if self.clip:
                    r = min(r / lr, 1.0) if lr > 0 else 1.0  # r / 0 = inf, clipped to 1
            d = (g + self.wd * p) * r
            if self.m != 0:
                if self.bufs[i] is None:
                    self.bufs[i] = d.clone()
                else:
                    self.bufs[i] = self.m * self.bufs[i] + (1 - self.damp) * d
                d = d + self.m * self.bufs[i] if self.nesterov else self.bufs[i]
            p.sub_(lr * d)
        self.t += 1


CONFIGS = [
    dict(momentum=0.9, weight_decay=1e-4, trust_clip=False),
    dict(momentum=0.9, weight_decay=1e-4, trust_clip=True),
    dict(momentum=0.9, weight_decay=0.0, trust_clip=True),
    dict(momentum=0.9, weight_decay=5e-4, nesterov=True, trust_clip=False),
    dict(momentum=0.8, weight_decay=5e-4, dampening=0.2, trust_clip=True),
    dict(momentum=0.0, weight_decay=1e-3, trust_clip=False),
]


def ids(cfg):
    return "-".join(f"{k}={v}" for k, v in cfg.items())


def zero_norm_params():
    params = make_params()
    with torch.no_grad():
        params[0].zero_()  # |p| = 0: r = 1
    return params


def run_against_formula(cfg, lr, ref_lr, backend, lars=True, steps=20, trust_coefficient=0.02, seed=0):
    a = zero_norm_params()
    b = clone_params(a)
    ours = legw_fused.LARS([{"params": a, "lars": lars}], lr=lr, trust_coefficient=trust_coefficient, eps=1e-8,
                           backend=backend, **cfg)
    ref = FormulaLARS(b, ref_lr, cfg["momentum"], cfg.get("dampening", 0.0), cfg["weight_decay"],
                      cfg.get("nesterov", False), trust_coefficient, 1e-8, cfg["trust_clip"], lars=lars)
    gen = torch.Generator().manual_seed(seed)
    for t in range(steps):
        set_random_grads([a, b], gen)
        with torch.no_grad():
            for params in (a, b):
                params[1].grad.zero_()  # |g| = 0 on one tensor: r = 1
        ours.step()
        ref.step()
        for i, (pa, pb) in enumerate(zip(a, b)):
            assert_close(pa.detach(), pb.detach(), "lars_ratio", msg=lambda m: f"step {t} param {i}: {m}")
            if cfg["momentum"] != 0:
                torch.testing.assert_close(ours.state[pa]["momentum_buffer"], ref.bufs[i], **TOL["lars_ratio"])


@pytest.mark.parametrize("cfg", CONFIGS, ids=ids)
def test_float_lr_matches_formula(cfg, backend):
    run_against_formula(cfg, lr=0.5, ref_lr=0.5, backend=backend)


@pytest.mark.parametrize("cfg", CONFIGS, ids=ids)
def test_legw_lr_matches_formula(cfg, backend):
    # trust_clip divides by the LR of the step: the schedule's value, evaluated on the device.
    sched = LEGW(2.0, 256, 1024, 0.5, 4, 6)
    run_against_formula(cfg, lr=sched, ref_lr=legw_formula(2.0, 256, 1024, 0.5, 4, 6), backend=backend,
                        steps=sched.total_steps + 2)


@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=ids)
def test_lars_false_group_is_plain_sgd(cfg, backend):
    run_against_formula(cfg, lr=0.05, ref_lr=0.05, backend=backend, lars=False)
    # ... and equals torch.optim.SGD (the reference bit for bit) with a float LR.
    a = make_params()
    b = clone_params(a)
    hp = {k: v for k, v in cfg.items() if k != "trust_clip"}
    ours = legw_fused.LARS([{"params": a, "lars": False}], lr=0.05, trust_clip=cfg["trust_clip"], backend=backend,
                           **hp)
    theirs = torch.optim.SGD(b, lr=0.05, **hp)
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        set_random_grads([a, b], gen)
        ours.step()
        theirs.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, **tol_for(backend))


def test_trust_ratio_actually_scales_the_step(backend):
    """Guard against a test that passes because r = 1 everywhere: a single step of plain LARS, by hand."""
    p = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # |p| = 5
    p.grad = torch.tensor([0.0, 0.5])  # |g| = 0.5
    opt = legw_fused.LARS([p], lr=0.1, momentum=0.0, weight_decay=0.0, trust_coefficient=0.01, eps=0.0,
                          backend=backend)
    opt.step()
    r = 0.01 * 5 / 0.5  # 0.1
    assert_close(p.detach(), torch.tensor([3.0, 4.0 - 0.1 * r * 0.5]), "formula_fp32")


timm = pytest.importorskip("timm.optim", reason="timm is a test dependency (requirements.txt)")


@pytest.mark.parametrize("cfg", CONFIGS, ids=ids)
def test_matches_timm_lars_always_adapt(cfg, backend):
    # timm clips r = 1 too (min(1/lr, 1)); with lr <= 1 that is 1 as well, so the zero-norm cases agree.
    a = zero_norm_params()
    b = clone_params(a)
    hp = dict(momentum=cfg["momentum"], dampening=cfg.get("dampening", 0.0), weight_decay=cfg["weight_decay"],
              nesterov=cfg.get("nesterov", False), eps=1e-8, trust_clip=cfg["trust_clip"])
    ours = legw_fused.LARS(a, lr=0.5, trust_coefficient=0.02, backend=backend, **hp)
    theirs = timm.Lars(b, lr=0.5, trust_coeff=0.02, always_adapt=True, **hp)
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        set_random_grads([a, b], gen)
        ours.step()
        theirs.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, **TOL["lars_ratio"])
        if cfg["momentum"]:
            torch.testing.assert_close(ours.state[pa]["momentum_buffer"], theirs.state[pb]["momentum_buffer"],
                                       **TOL["lars_ratio"])


def test_param_groups_helper():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    model[2].bias.requires_grad_(False)
    groups = legw_fused.param_groups(model, weight_decay=5e-4)
    assert [len(g["params"]) for g in groups] == [2, 3]
    assert groups[0]["weight_decay"] == 5e-4 and groups[0]["lars"] is True
    assert all(p.ndim == 2 for p in groups[0]["params"])
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["lars"] is False
    assert all(p.ndim == 1 for p in groups[1]["params"])
    assert not any(p is model[2].bias for g in groups for p in g["params"])
    flat = legw_fused.param_groups(model, weight_decay=5e-4, exclude_bias_and_norm=False)
    assert len(flat) == 1 and len(flat[0]["params"]) == 5 and flat[0]["lars"] is True
    opt = legw_fused.LARS(groups, lr=0.1)
    assert [g["lars"] for g in opt.param_groups] == [True, False]
    legw_fused.SGD(groups, lr=0.1)  # SGD ignores the lars key
    with pytest.raises(ValueError, match="weight_decay"):
        legw_fused.param_groups(model, weight_decay=-1.0)
    with pytest.raises(TypeError, match="nn.Module"):
        legw_fused.param_groups(list(model.parameters()), weight_decay=0.0)
