"""legw_fused.LARS against a per-parameter reference written from the formula, and against timm's Lars."""

import pytest
import torch

import legw_fused
from _helpers import TOL, assert_close, clone_params, legw_formula, make_params, set_random_grads, tol_for
from legw_fused import LEGW


class FormulaLARS:
    """LARS written out per parameter, straight from the issue's definition, with Python-float control flow."""

    def __init__(self, params, lr, momentum, dampening, weight_decay, nesterov, tc, eps, trust_clip, lars=True,
                 max_trust_ratio=None, maximize=False):
        self.params, self.lr, self.m, self.damp, self.wd, self.nesterov = params, lr, momentum, dampening, \
            weight_decay, nesterov
        self.tc, self.eps, self.clip, self.lars = tc, eps, trust_clip, lars
        self.cap, self.maximize = max_trust_ratio, maximize
        self.bufs = [None] * len(params)
        self.t = 0

    @torch.no_grad()
    def step(self):
        lr = self.lr(self.t) if callable(self.lr) else self.lr
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = -p.grad if self.maximize else p.grad
            r = 1.0
            p_norm, g_norm = p.double().norm().item(), g.double().norm().item()  # exact enough to be the oracle
            if self.lars and p_norm > 0 and g_norm > 0:
                r = self.tc * p_norm / (g_norm + self.wd * p_norm + self.eps)
                if self.cap is not None:
                    r = min(r, self.cap)
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
# The clamp and maximize: with trust_coefficient 0.02 the ratios of these tensors are ~0.01-0.1, so 0.03 clamps some
# and not others.
CAPPED = [
    dict(momentum=0.9, weight_decay=1e-4, trust_clip=False, max_trust_ratio=0.03),
    dict(momentum=0.9, weight_decay=1e-4, trust_clip=True, max_trust_ratio=0.03, maximize=True),
    dict(momentum=0.9, weight_decay=5e-4, nesterov=True, trust_clip=False, maximize=True),
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
                      cfg.get("nesterov", False), trust_coefficient, 1e-8, cfg["trust_clip"], lars=lars,
                      max_trust_ratio=cfg.get("max_trust_ratio"), maximize=cfg.get("maximize", False))
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


@pytest.mark.parametrize("cfg", CAPPED, ids=ids)
def test_max_trust_ratio_and_maximize_match_formula(cfg, backend):
    run_against_formula(cfg, lr=0.5, ref_lr=0.5, backend=backend)


def test_max_trust_ratio_clamps_the_raw_ratio_before_trust_clip(backend):
    """By hand: raw ratio 0.1 clamped to 0.04, then trust_clip's min(0.04 / lr, 1) = 0.4 at lr = 0.1."""
    p = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # |p| = 5
    p.grad = torch.tensor([0.0, 0.5])  # |g| = 0.5: r = 0.01 * 5 / 0.5 = 0.1
    opt = legw_fused.LARS([p], lr=0.1, momentum=0.0, trust_coefficient=0.01, eps=0.0, trust_clip=True,
                          max_trust_ratio=0.04, backend=backend)
    opt.step()
    assert_close(p.detach(), torch.tensor([3.0, 4.0 - 0.1 * 0.4 * 0.5]), "formula_fp32")


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
    with pytest.raises(TypeError, match="exclude must be None or a callable"):
        legw_fused.param_groups(model, weight_decay=0.0, exclude="bias")


class _Block(torch.nn.Module):
    """Parameters a shape rule alone gets wrong: a 2-D bias, a 2-D LayerNorm weight, a 1-D non-bias scale."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.ln = torch.nn.LayerNorm((4, 5))
        self.gn = torch.nn.GroupNorm(2, 4)
        self.rms = torch.nn.RMSNorm(5)
        self.pos_bias = torch.nn.Parameter(torch.zeros(4, 5))
        self.scale = torch.nn.Parameter(torch.ones(5))
        self.lstm = torch.nn.LSTM(5, 3)
        self.emb = torch.nn.Embedding(7, 5)


def test_param_groups_excludes_norm_layers_by_type_and_biases_by_name():
    model = torch.nn.Sequential(_Block(), torch.nn.Linear(5, 2))
    model[1].weight = model[0].emb.weight  # tied: listed once
    # Written out: (name, excluded) for every trainable parameter, in model.named_parameters() order.
    expected = {
        "0.pos_bias": True, "0.scale": True, "0.conv.weight": False, "0.conv.bias": True, "0.bn.weight": True,
        "0.bn.bias": True, "0.ln.weight": True, "0.ln.bias": True, "0.gn.weight": True, "0.gn.bias": True,
        "0.rms.weight": True, "0.lstm.weight_ih_l0": False, "0.lstm.weight_hh_l0": False, "0.lstm.bias_ih_l0": True,
        "0.lstm.bias_hh_l0": True, "0.emb.weight": False, "1.bias": True,
    }
    named = dict(model.named_parameters())
    assert list(named) == list(expected)
    groups = legw_fused.param_groups(model, weight_decay=1e-4)
    adapted, plain = groups
    assert (adapted["weight_decay"], adapted["lars"], plain["weight_decay"], plain["lars"]) == (1e-4, True, 0.0, False)
    assert [id(p) for p in adapted["params"]] == [id(named[n]) for n, ex in expected.items() if not ex]
    assert [id(p) for p in plain["params"]] == [id(named[n]) for n, ex in expected.items() if ex]
    # exclude(name, param): the weight_decay_filter / lars_adaptation_filter of the LARS reference codes.
    calls = []

    def exclude(name, p):
        calls.append(name)
        return name.startswith("0.lstm.")

    adapted, plain = legw_fused.param_groups(model, weight_decay=1e-4, exclude=exclude)
    assert calls == [n for n, ex in expected.items() if not ex]  # asked about the others only
    assert [id(p) for p in adapted["params"]] == [id(named[n]) for n, ex in expected.items()
                                                  if not ex and not n.startswith("0.lstm.")]
    only_exclude = legw_fused.param_groups(model, weight_decay=1e-4, exclude_bias_and_norm=False,
                                           exclude=lambda name, p: name.endswith("bias"))
    assert [id(p) for p in only_exclude[1]["params"]] == [id(named[n]) for n in expected if n.endswith("bias")]
