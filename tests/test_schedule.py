"""LEGW schedule against the paper's rule and the issue's formulas, written out here independently of the code."""

import copy
import io
import itertools
import math
import pickle

import pytest
import torch

from _helpers import assert_close, expected_lr
from legw_fused import LEGW, LEGWScheduler

DECAYS = ["poly", "cosine", "exp", "step", "constant"]


def make(decay, scaling="sqrt", warmup_scaling="linear", **over):
    kw = dict(base_lr=0.2, base_bs=128, bs=1024, base_warmup_epochs=0.5, spe=37, epochs=9, decay=decay,
              power=1.5, end_lr=0.01, gamma=0.5, milestones=(3, 6.5) if decay == "step" else (), scaling=scaling,
              warmup_scaling=warmup_scaling)
    kw.update(over)
    sched = LEGW(kw["base_lr"], kw["base_bs"], kw["bs"], kw["base_warmup_epochs"], kw["spe"], kw["epochs"],
                 decay=kw["decay"], power=kw["power"], end_lr=kw["end_lr"], gamma=kw["gamma"],
                 milestones=kw["milestones"], scaling=kw["scaling"], warmup_scaling=kw["warmup_scaling"])
    return sched, kw


def probe_steps(W, T):
    return sorted({0, 1, max(W - 1, 0), W, W + 1, (W + T) // 2, T - 1, T, T + 5, T + 100})


@pytest.mark.parametrize("decay,scaling,warmup_scaling",
                         list(itertools.product(DECAYS, ["sqrt", "linear", "none"], ["linear", "constant"])))
def test_schedule_matches_formula(decay, scaling, warmup_scaling):
    # k = 8; warmup 0.5 epochs (x8 under LEGW); T = 9 * 37 = 333.
    sched, kw = make(decay, scaling, warmup_scaling, end_lr=0.01 if scaling != "none" else 0.0)
    k = kw["bs"] / kw["base_bs"]
    assert sched.peak_lr == pytest.approx({"sqrt": 0.2 * math.sqrt(8), "linear": 0.2 * 8, "none": 0.2}[scaling])
    assert sched.warmup_steps == round(0.5 * (k if warmup_scaling == "linear" else 1) * 37)
    assert sched.total_steps == 333
    for t in probe_steps(sched.warmup_steps, sched.total_steps):
        want = expected_lr(t, **kw)
        assert sched(t) == pytest.approx(want, rel=1e-12, abs=1e-15), t
        assert sched.lr(t) == sched(t)


def test_legw_keeps_warmup_iterations_constant():
    # The point of LEGW: k times the batch, k times the warmup epochs, the same number of warmup steps.
    base = LEGW(0.1, 128, 128, base_warmup_epochs=2, steps_per_epoch=400, epochs=20)
    big = LEGW(0.1, 128, 1024, base_warmup_epochs=2, steps_per_epoch=50, epochs=20)
    assert big.warmup_epochs == 16 and base.warmup_steps == big.warmup_steps == 800
    assert big.peak_lr == pytest.approx(0.1 * math.sqrt(8))
    assert base.peak_lr == pytest.approx(0.1)


def test_sqrt_scaling_is_base_lr_times_sqrt_k_not_sqrt_of_product():
    sched = LEGW(0.5, 100, 400, 0, 10, 1, scaling="sqrt")
    assert sched.peak_lr == pytest.approx(1.0)  # 0.5 * sqrt(4), not sqrt(0.5 * 4) = 1.414


def test_warmup_ramp_and_zero_warmup():
    sched = LEGW(0.1, 1, 1, base_warmup_epochs=1, steps_per_epoch=4, epochs=10, decay="constant")
    assert [sched(t) for t in range(5)] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1])
    no_warm, kw = make("poly", base_warmup_epochs=0)
    assert no_warm.warmup_steps == 0
    assert no_warm(0) == pytest.approx(expected_lr(0, **kw)) and no_warm(0) == pytest.approx(no_warm.peak_lr)
    for t in probe_steps(0, no_warm.total_steps):
        assert no_warm(t) == pytest.approx(expected_lr(t, **kw), rel=1e-12, abs=1e-15)


def test_warmup_equal_to_total_uses_s_equal_one():
    sched = LEGW(0.1, 1, 1, base_warmup_epochs=2, steps_per_epoch=5, epochs=2, decay="poly", end_lr=0.02)
    assert sched.warmup_steps == sched.total_steps == 10
    assert sched(9) == pytest.approx(0.1)
    assert sched(10) == pytest.approx(0.02) and sched(50) == pytest.approx(0.02)


def test_rounding_of_fractional_steps():
    # W = round(0.3 * 2 * 7) = round(4.2) = 4; T = round(2.5 * 7) = round(17.5) = 18 (Python rounds half to even)
    sched = LEGW(0.1, 64, 128, 0.3, 7, 2.5)
    assert (sched.warmup_steps, sched.total_steps) == (4, 18)


@pytest.mark.parametrize("decay", DECAYS)
def test_lr_tensor_equals_host_formula(decay):
    sched, _ = make(decay)
    t = torch.arange(0, sched.total_steps + 50)
    got = sched.lr_tensor(t)
    assert got.dtype == torch.float64 and got.shape == t.shape
    want = torch.tensor([sched(i) for i in range(len(t))], dtype=torch.float64)
    assert_close(got, want, "schedule_fp64")
    zero_dim = sched.lr_tensor(torch.tensor(sched.warmup_steps + 3))
    assert zero_dim.shape == () and zero_dim.item() == pytest.approx(sched(sched.warmup_steps + 3), rel=1e-12)


def test_packed_layout():
    sched, _ = make("step")
    packed = sched.packed("cpu")
    assert packed.dtype == torch.float64
    assert packed.tolist() == [3.0, sched.peak_lr, 0.01, sched.warmup_steps, 333.0, 37.0, 1.5, 0.5, 2.0,
                               round(3 * 37), round(6.5 * 37)]
    assert sched.packed("cpu") is packed  # made once per device


@pytest.mark.parametrize("decay", DECAYS)
def test_round_trips(decay):
    sched, _ = make(decay)
    for other in (LEGW.from_dict(sched.to_dict()), copy.deepcopy(sched), pickle.loads(pickle.dumps(sched))):
        assert other == sched and hash(other) == hash(sched)
        assert [other(t) for t in range(0, 400, 7)] == [sched(t) for t in range(0, 400, 7)]
    buf = io.BytesIO()
    torch.save(sched.to_dict(), buf)
    buf.seek(0)
    assert LEGW.from_dict(torch.load(buf, weights_only=True)) == sched


BAD = [
    (dict(base_batch_size=0), "base_batch_size"),
    (dict(base_batch_size=-4), "base_batch_size"),
    (dict(batch_size=0), "batch_size"),
    (dict(base_lr=0.0), "base_lr"),
    (dict(base_lr=-0.1), "base_lr"),
    (dict(base_warmup_epochs=-1), "base_warmup_epochs"),
    (dict(epochs=0), "epochs"),
    (dict(steps_per_epoch=0), "steps_per_epoch"),
    (dict(steps_per_epoch=-3), "steps_per_epoch"),
    (dict(base_warmup_epochs=2, epochs=3), "warmup_steps"),  # k = 2: 4 warmup epochs > 3 epochs
    (dict(epochs=0.01, steps_per_epoch=10), "total_steps"),  # T = round(0.1) = 0
    (dict(decay="linear"), "decay"),
    (dict(scaling="log"), "scaling"),
    (dict(warmup_scaling="sqrt"), "warmup_scaling"),
    (dict(power=0), "power"),
    (dict(power=-1), "power"),
    (dict(gamma=0), "gamma"),
    (dict(gamma=1.5), "gamma"),
    (dict(end_lr=-0.1), "end_lr"),
    (dict(end_lr=10.0), "end_lr"),
    (dict(decay="step", milestones=(-1, 2)), "milestones"),
    (dict(decay="step", milestones=(3, 2)), "milestones"),
    (dict(decay="poly", milestones=(3,)), "milestones"),
    (dict(base_lr=float("nan")), "base_lr"),
    (dict(epochs=float("inf")), "epochs"),
]


@pytest.mark.parametrize("override,name", BAD, ids=[f"{n}-{i}" for i, (_, n) in enumerate(BAD)])
def test_bad_arguments_raise_value_error_naming_them(override, name):
    kw = dict(base_lr=0.1, base_batch_size=128, batch_size=256, base_warmup_epochs=1, steps_per_epoch=10, epochs=5)
    kw.update(override)
    with pytest.raises(ValueError, match=name):
        LEGW(**kw)


def test_bad_types_and_steps():
    with pytest.raises(TypeError, match="base_lr"):
        LEGW("0.1", 128, 256, 1, 10, 5)
    with pytest.raises(TypeError, match="milestones"):
        LEGW(0.1, 128, 256, 1, 10, 5, decay="step", milestones=3)
    sched = LEGW(0.1, 128, 256, 1, 10, 5)
    with pytest.raises(ValueError, match="t must be >= 0"):
        sched(-1)
    with pytest.raises(TypeError):
        sched(1.5)


# ---------------------------------------------------------------------------------------------- LEGWScheduler

def _model_params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam])
def test_scheduler_drives_any_torch_optimizer(opt_cls):
    sched = LEGW(0.1, 32, 128, base_warmup_epochs=1, steps_per_epoch=5, epochs=6, decay="cosine")
    params = _model_params()
    opt = opt_cls(params, lr=123.0)
    scheduler = LEGWScheduler(opt, sched)
    seen = []
    for _ in range(sched.total_steps + 3):
        seen.append(opt.param_groups[0]["lr"])
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        scheduler.step()
    assert seen == pytest.approx([expected_lr(t, 0.1, 32, 128, 1, 5, 6, decay="cosine")
                                  for t in range(sched.total_steps + 3)], rel=1e-12)


def test_scheduler_one_schedule_per_group_and_state_dict():
    a = LEGW(0.1, 32, 128, 1, 5, 6)
    b = LEGW(0.01, 32, 128, 0, 5, 6, decay="exp", gamma=0.9)
    p1, p2 = _model_params()
    opt = torch.optim.SGD([{"params": [p1]}, {"params": [p2]}], lr=1.0)
    scheduler = LEGWScheduler(opt, [a, b])
    for _ in range(7):
        opt.step()
        scheduler.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([a(7), b(7)])
    sd = scheduler.state_dict()
    opt2 = torch.optim.SGD([{"params": [p1]}, {"params": [p2]}], lr=1.0)
    other = LEGWScheduler(opt2, LEGW(1.0, 1, 1, 0, 1, 1))
    other.load_state_dict(sd)
    assert other.schedules == [a, b] and other.last_epoch == 7


def test_scheduler_rejects_mismatches():
    import legw_fused

    params = _model_params()
    sched = LEGW(0.1, 32, 128, 1, 5, 6)
    with pytest.raises(TypeError, match="optimizer"):
        LEGWScheduler(params, sched)
    with pytest.raises(TypeError, match="schedule"):
        LEGWScheduler(torch.optim.SGD(params, lr=0.1), lambda t: 0.1)
    opt = torch.optim.SGD([{"params": [params[0]]}, {"params": [params[1]]}], lr=0.1)
    with pytest.raises(ValueError, match="2 param groups"):
        LEGWScheduler(opt, [sched, sched, sched])
    driven = legw_fused.SGD(params, lr=sched)
    with pytest.raises(ValueError, match="already driven by its own LEGW"):
        LEGWScheduler(driven, sched)
    assert driven.param_groups[0]["lr"] is sched  # untouched
