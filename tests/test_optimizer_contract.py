"""The torch.optim contract of legw_fused.SGD / LARS: state_dict, interop, GradScaler, hooks, and bad input."""

import io
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import legw_fused
from _helpers import (
    assert_close,
    assert_unchanged,
    clone_params,
    make_params,
    require_backend,
    set_random_grads,
    snapshot,
    tol_for,
)
from legw_fused import LARS, LEGW, SGD

SCHED = LEGW(0.1, 32, 128, 0.5, 10, 4)


def make_opt(kind, params, lr, backend="auto"):
    if kind == "sgd":
        return SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-3, backend=backend)
    return LARS(params, lr=lr, momentum=0.9, weight_decay=1e-3, trust_clip=True, trust_coefficient=0.02,
                backend=backend)


def steps(opts_and_params, n, gen):
    for _ in range(n):
        set_random_grads([p for _, p in opts_and_params], gen)
        for opt, _ in opts_and_params:
            opt.step()


def save_load(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # plain values only: no legw_fused class needed to read it


# ---------------------------------------------------------------------------------------------- state_dict

@pytest.mark.parametrize("kind", ["sgd", "lars"])
@pytest.mark.parametrize("lr", [0.05, SCHED], ids=["float-lr", "legw-lr"])
def test_state_dict_round_trip_continues_identically(kind, lr):
    a = make_params()
    ref = make_opt(kind, a, lr)
    gen = torch.Generator().manual_seed(0)
    steps([(ref, a)], 7, gen)
    sd = save_load(ref.state_dict())
    assert all(int(s["step"]) == 7 for s in sd["state"].values())
    b = clone_params(a)
    resumed = make_opt(kind, b, 0.123)  # a different lr: the state_dict's must win
    resumed.load_state_dict(sd)
    assert resumed.param_groups[0]["lr"] == lr
    counters = {id(resumed.state[p]["step"]) for p in b if p in resumed.state}
    assert len(counters) == 1 and int(resumed.state[b[0]]["step"]) == 7  # one shared device counter
    steps([(ref, a), (resumed, b)], 8, gen)
    for pa, pb in zip(a, b):
        assert_close(pa, pb, "exact")
        assert_close(ref.state[pa]["momentum_buffer"], resumed.state[pb]["momentum_buffer"], "exact")
    assert int(resumed.state[b[0]]["step"]) == 15


@pytest.mark.parametrize("cfg", [dict(momentum=0.9), dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
                                 dict(momentum=0.5, dampening=0.3)])
def test_torch_sgd_state_dict_loads_and_continues_identically(cfg, backend):
    a = make_params()
    theirs = torch.optim.SGD(a, lr=0.05, **cfg)
    gen = torch.Generator().manual_seed(1)
    steps([(theirs, a)], 5, gen)
    b = clone_params(a)
    ours = SGD(b, lr=0.9, backend=backend, **cfg)
    ours.load_state_dict(save_load(theirs.state_dict()))
    # torch's group keys load as they are (foreach, fused, differentiable, maximize: ours mean the same).
    assert {k: v for k, v in ours.param_groups[0].items() if k != "master_weights"} == theirs.param_groups[0] | \
        {"params": ours.param_groups[0]["params"]}
    steps([(theirs, a), (ours, b)], 10, gen)
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, **tol_for(backend))


@pytest.mark.parametrize("cfg", [dict(momentum=0.9), dict(momentum=0.9, nesterov=True, weight_decay=1e-2)])
def test_our_state_dict_loads_into_torch_sgd_and_continues_identically(cfg, backend):
    a = make_params()
    ours = SGD(a, lr=0.05, backend=backend, **cfg)
    gen = torch.Generator().manual_seed(2)
    steps([(ours, a)], 5, gen)
    b = clone_params(a)
    theirs = torch.optim.SGD(b, lr=0.9, **cfg)
    theirs.load_state_dict(save_load(ours.state_dict()))
    steps([(theirs, b), (ours, a)], 10, gen)
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, **tol_for(backend))


def test_state_dict_with_mismatching_shapes_is_rejected_and_nothing_changes():
    a = make_params()
    opt = SGD(a, lr=0.1, momentum=0.9)
    steps([(opt, a)], 2, torch.Generator().manual_seed(3))
    sd = save_load(opt.state_dict())
    sd["state"][4]["momentum_buffer"] = torch.zeros(5, 4)
    snap = snapshot(opt)
    with pytest.raises(ValueError, match=r"momentum_buffer of parameter 4 has shape \(5, 4\)"):
        opt.load_state_dict(sd)
    assert_unchanged(opt, snap)
    with pytest.raises(ValueError, match="param groups"):
        opt.load_state_dict({"state": {}, "param_groups": []})
    bad_lr = save_load(opt.state_dict())
    bad_lr["param_groups"][0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
        opt.load_state_dict(bad_lr)
    assert_unchanged(opt, snap)


# ---------------------------------------------------------------------------------------------- GradScaler

@pytest.mark.parametrize("kind", ["sgd", "lars"])
def test_grad_scaler_skips_inf_steps_without_touching_anything(kind, backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    opt = make_opt(kind, model.parameters(), SCHED, backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x = torch.randn(16, 6)

    def backward():
        opt.zero_grad()
        scaler.scale(model(x).pow(2).mean()).backward()

    for _ in range(3):
        backward()
        scaler.step(opt)
        scaler.update()
    assert int(opt.state[model[0].weight]["step"]) == 3
    backward()
    model[2].weight.grad[0, 1] = math.inf
    snap = snapshot(opt)
    scale_before = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert_unchanged(opt, snap)
    assert int(opt.state[model[0].weight]["step"]) == 3
    assert scaler.get_scale() == scale_before / 2
    # The next good step uses the LR of step 3, not 4: the skipped step did not advance the schedule.
    backward()
    scaler.unscale_(opt)
    expected = {p: p.detach().clone() for p in model.parameters()}
    shadow = make_opt(kind, [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()], SCHED, backend)
    shadow.load_state_dict(save_load(opt.state_dict()))
    for ps, p in zip(shadow.param_groups[0]["params"], model.parameters()):
        ps.grad = p.grad.clone()
    shadow.step()
    scaler.step(opt)
    for ps, p in zip(shadow.param_groups[0]["params"], model.parameters()):
        assert not torch.equal(p.detach(), expected[p])
        assert_close(p.detach(), ps.detach(), "exact")
    assert int(opt.state[model[0].weight]["step"]) == 4


def _scaled_training(opt, model, scaler, inf_at, clip=None, steps=8):
    """Steps of GradScaler training on a fixed batch; an inf is put into one gradient at the steps in inf_at."""
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    for t in range(steps):
        opt.zero_grad()
        scaler.scale(model(x).pow(2).mean()).backward()
        if t in inf_at:
            model[0].weight.grad[1, 2] = math.inf
        if clip is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(opt)
        scaler.update()


@pytest.mark.parametrize("dampening", [0.0, 0.3])
@pytest.mark.parametrize("clip", [None, 0.05], ids=["scaled", "unscale-and-clip"])
def test_grad_scaler_training_matches_torch_sgd(backend, dampening, clip):
    """The fused path (grads unscaled as read, skips decided on the device) against torch.optim.SGD driven by the
    same GradScaler, including a skipped first step, where momentum buffers must not start."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)))
    ours = SGD(models[0].parameters(), lr=0.05, momentum=0.9, dampening=dampening, weight_decay=1e-3,
               backend=backend)
    theirs = torch.optim.SGD(models[1].parameters(), lr=0.05, momentum=0.9, dampening=dampening, weight_decay=1e-3)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2) for _ in range(2)]
    for opt, model, scaler in zip((ours, theirs), models, scalers):
        _scaled_training(opt, model, scaler, inf_at={0, 3}, clip=clip)
    assert scalers[0].get_scale() == scalers[1].get_scale()
    assert int(ours.state[models[0][0].weight]["step"]) == 6  # 8 steps, 2 skipped
    for pa, pb in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(pa, pb, **tol_for(backend))
        torch.testing.assert_close(ours.state[pa]["momentum_buffer"], theirs.state[pb]["momentum_buffer"],
                                   **tol_for(backend))


def test_non_finite_grads_without_scaler_behave_like_torch(backend):
    a = make_params()
    b = clone_params(a)
    ours, theirs = SGD(a, lr=0.1, momentum=0.9, backend=backend), torch.optim.SGD(b, lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(4)
    set_random_grads([a, b], gen)
    for params in (a, b):
        params[0].grad[0, 0] = math.nan
        params[4].grad[1, 1, 1] = math.inf
    ours.step()
    theirs.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, equal_nan=True, **tol_for(backend))
    assert torch.isnan(a[0][0, 0]) and torch.isinf(a[4][1, 1, 1])


# ---------------------------------------------------------------------------------------------- torch.optim API

def test_closure_zero_grad_hooks_and_add_param_group(backend):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    extra = torch.nn.Parameter(torch.randn(5))
    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    twin_extra = torch.nn.Parameter(extra.detach().clone())
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9, backend=backend)
    ref = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o)))
    x = torch.randn(8, 4)

    def closure_for(m, o, e=None):
        def closure():
            o.zero_grad()
            loss = m(x).pow(2).sum() + (0 if e is None else e.pow(2).sum())
            loss.backward()
            return loss
        return closure

    loss = opt.step(closure_for(model, opt))
    ref_loss = ref.step(closure_for(twin, ref))
    assert calls == [("pre", opt), ("post", opt)]
    assert torch.equal(loss, ref_loss)
    opt.add_param_group({"params": [extra], "lr": 0.05, "nesterov": True})
    ref.add_param_group({"params": [twin_extra], "lr": 0.05, "nesterov": True})
    for _ in range(5):
        opt.step(closure_for(model, opt, extra))
        ref.step(closure_for(twin, ref, twin_extra))
    for pa, pb in zip(list(model.parameters()) + [extra], list(twin.parameters()) + [twin_extra]):
        torch.testing.assert_close(pa, pb, **tol_for(backend))
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    # The new group joins the shared step count.
    assert opt.state[extra]["step"] is opt.state[model.weight]["step"]
    assert int(opt.state[extra]["step"]) == 6


@pytest.mark.parametrize("cls", [SGD, LARS])
def test_global_hooks_argument_rewrites_and_profiler_range_as_torch(cls):
    # torch.optim's step wrapper is the oracle: the same hooks on torch.optim.SGD and on ours must see the same calls
    # (global and per-optimizer, pre and post, in torch's order), a pre hook's new arguments must reach step(), and a
    # profiler must record the same "Optimizer.step#<class>.step" range (ours opens it only while one runs).
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 2))
    ours = cls([w], lr=0.1, momentum=0.9)
    ref_w = torch.nn.Parameter(w.detach().clone())
    ref = torch.optim.SGD([ref_w], lr=0.1, momentum=0.9)
    w0 = w.detach().clone()
    calls = []
    loss_of = {}

    def replace_closure(opt, args, kwargs):
        calls.append(("pre", type(opt).__module__, len(args), sorted(kwargs)))
        p = next(iter(opt.param_groups[0]["params"]))

        def closure():
            p.grad = torch.ones_like(p)
            loss_of[id(opt)] = torch.tensor(2.0)
            return loss_of[id(opt)]
        return args[:1], {"closure": closure}

    handles = [register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("global pre", type(o).__module__))),
               register_optimizer_step_post_hook(
                   lambda o, a, k: calls.append(("global post", type(o).__module__, sorted(k))))]
    try:
        for opt in (ref, ours):
            opt.register_step_pre_hook(replace_closure)
            opt.register_step_post_hook(lambda o, a, k: calls.append(("post", type(o).__module__)))
        got = [opt.step(lambda: torch.tensor(-1.0)) for opt in (ref, ours)]
    finally:
        for h in handles:
            h.remove()
    assert got[0] is loss_of[id(ref)] and got[1] is loss_of[id(ours)]  # step() ran the hook's closure
    # The closure's grad was used: torch's SGD, or for LARS one without hooks given that grad, lands on the same values.
    twin = ref_w
    if cls is LARS:
        twin = torch.nn.Parameter(w0)
        twin.grad = torch.ones_like(twin)
        LARS([twin], lr=0.1, momentum=0.9).step()
    torch.testing.assert_close(w, twin, rtol=0, atol=0)
    ref_calls, our_calls = calls[:4], calls[4:]
    mod = type(ours).__module__
    assert our_calls == [(c[0], mod, *c[2:]) for c in ref_calls]
    assert [c[0] for c in ref_calls] == ["global pre", "pre", "post", "global post"]

    from torch.profiler import ProfilerActivity, profile

    for opt in (ref, ours):
        opt.zero_grad()
        opt.param_groups[0]["params"][0].grad = torch.ones(3, 2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ref.step()
        ours.step()
    names = {e.name for e in prof.events()}
    assert "Optimizer.step#SGD.step" in names
    assert f"Optimizer.step#{cls.__name__}.step" in names


def test_a_subclass_that_overrides_step_is_wrapped_by_torch():
    # Our step carries torch's "hooked" mark so that torch does not wrap it again; a subclass's own step does not,
    # and torch wraps it as it wraps any optimizer's: its hooks run.
    class Counting(SGD):
        def step(self, closure=None):
            self.calls = getattr(self, "calls", 0) + 1
            return super().step(closure)

    w = torch.nn.Parameter(torch.randn(4))
    opt = Counting([w], lr=0.1)
    seen = []
    opt.register_step_post_hook(lambda o, a, k: seen.append(o.calls))
    w.grad = torch.ones(4)
    opt.step()
    opt.step()
    assert seen == [1, 2]


def test_lr_schedule_runs_without_host_reads(monkeypatch):
    """The LEGW LR and LARS ratios stay tensors: no .item()/float()/bool() on a tensor inside step() (a fused
    backend; the reference reads CPU values on the host, where that costs no sync)."""
    a = make_params()
    opt = LARS(a, lr=SCHED, momentum=0.9, trust_clip=True, weight_decay=1e-4, backend=require_backend("cpp"))
    gen = torch.Generator().manual_seed(5)
    set_random_grads([a], gen)
    opt.step()

    def forbid(*_args, **_kwargs):
        raise AssertionError("host read of a tensor value inside step()")

    set_random_grads([a], gen)
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbid)
    opt.step()
    monkeypatch.undo()
    assert int(opt.state[a[0]]["step"]) == 2


class _HostTraffic(TorchDispatchMode):
    """Every op that, with the parameters on a GPU, would read a value to the host (a sync) or copy host memory to
    the device: .item()-style reads, tensors made from Python data (torch.tensor -> lift_fresh), factory ops made
    without an explicit device (on a GPU they land on the CPU and must then be copied; seen as "meta" under
    ``torch.device("meta")``, since torch fills in the default device), and cross-device copies."""

    HOST_READS = {"_local_scalar_dense", "is_nonzero", "equal"}
    FROM_PYTHON = {"lift_fresh", "lift_fresh_copy"}
    FACTORIES = {"arange", "empty", "zeros", "ones", "full", "scalar_tensor", "empty_strided", "tensor", "linspace"}

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in self.HOST_READS:
            self.found.append(f"host read: {func}")
        elif name in self.FROM_PYTHON:
            self.found.append(f"tensor from Python data: {func}")
        elif name in self.FACTORIES and torch.device(kwargs.get("device") or "cpu").type == "meta":
            # Made without an explicit device (the test's default device is "meta"): on a GPU, a CPU tensor that
            # must then be copied over. Made on the CPU here so that the step goes on.
            self.found.append(f"factory without device=: {func}")
            kwargs = {**kwargs, "device": torch.device("cpu")}
        elif name in ("_to_copy", "copy_") and isinstance(args[0], torch.Tensor):
            dst = kwargs.get("device") if name == "_to_copy" else args[0].device
            src = args[0].device if name == "_to_copy" else args[1].device
            if dst is not None and torch.device(dst) != src:
                self.found.append(f"cross-device copy {src} -> {dst}: {func}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("backend", ["cpp", "triton", "torch"])
@pytest.mark.parametrize("kind,cache", [("sgd", True), ("lars", True), ("lars", False)])
def test_step_after_the_first_makes_no_host_read_or_host_to_device_copy(kind, cache, backend, monkeypatch):
    """After the first step, step() is graph-capturable: no sync, no copy from (pageable) host memory. Also the step
    in which some parameters start their momentum while others continue it (the LARS |p|^2 cache then splits its
    chunks by index: the index must be made on the device, not copied from the host)."""
    require_backend(backend)
    # The reference reads a CPU step count or lr as a Python number (no sync on the CPU: torch's float-lr
    # arithmetic); on a GPU it takes its device path, which is the one checked here.
    monkeypatch.setattr(legw_fused.ops.fused_step_reference, "_read_on_host", lambda t: False)
    a = make_params()
    opt = (SGD(a, lr=SCHED, momentum=0.9, weight_decay=1e-4, backend=backend) if kind == "sgd" else
           LARS(a, lr=SCHED, momentum=0.9, weight_decay=1e-4, trust_clip=True, cache_norms=cache, backend=backend))
    gen = torch.Generator().manual_seed(3)
    set_random_grads([a], gen, skip=(1, 3))  # parameters 1 and 3 start their momentum at step 2
    opt.step()
    for step in (2, 3):
        set_random_grads([a], gen)
        with torch.device("meta"), _HostTraffic() as traffic:
            opt.step()
        assert traffic.found == [], f"step {step}: {traffic.found}"
    assert int(opt.state[a[1]]["step"]) == 3 and "momentum_buffer" in opt.state[a[1]]


# ---------------------------------------------------------------------------------------------- backends

def test_backend_selection_explains_itself():
    info = legw_fused.backend_info()
    assert info["torch"]["available"] and info["torch"]["reason"] is None
    assert info["auto"]["cpu"] in info and info[info["auto"]["cpu"]]["available"]
    for name in legw_fused.backends.STEP_BACKENDS:
        row = info[name]
        if row["available"]:
            continue
        assert row["reason"], name
        with pytest.raises(RuntimeError, match="cannot run"):
            SGD(make_params(), lr=0.1, backend=name)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        SGD(make_params(), lr=0.1, backend="fast")


# ---------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kind,kwargs,error,match", [
    ("sgd", dict(lr=-0.1), ValueError, "lr must be a finite number >= 0"),
    ("sgd", dict(lr=math.nan), ValueError, "lr must be a finite number >= 0"),
    ("sgd", dict(lr="0.1"), TypeError, "lr must be a real number"),
    ("sgd", dict(lr=torch.tensor(-0.1)), ValueError, "lr must be a finite number >= 0"),
    ("sgd", dict(lr=torch.tensor(math.inf)), ValueError, "lr must be a finite number >= 0"),
    ("sgd", dict(lr=torch.tensor([0.1, 0.2])), ValueError, "Tensor lr must be 1-element"),
    ("sgd", dict(lr=torch.tensor(1)), ValueError, "Tensor lr must be 1-element and floating-point"),
    ("sgd", dict(lr=0.1, momentum=-0.9), ValueError, "Invalid momentum value: -0.9; momentum must be a finite "
                                                     "number >= 0"),
    ("sgd", dict(lr=-0.1), ValueError, "Invalid learning rate: -0.1"),
    ("sgd", dict(lr=0.1, momentum=0.9, dampening=-0.1), ValueError, "dampening must be"),
    ("sgd", dict(lr=0.1, weight_decay=-1e-4), ValueError, "weight_decay must be"),
    ("sgd", dict(lr=0.1, nesterov=True), ValueError, "Nesterov momentum requires a momentum and zero dampening"),
    ("sgd", dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), ValueError, "dampening = 0"),
    ("sgd", dict(lr=0.1, nesterov=1), TypeError, "nesterov must be a bool"),
    ("sgd", dict(maximize=1), TypeError, "maximize must be a bool"),
    ("sgd", dict(foreach="yes"), TypeError, "foreach must be None or a bool"),
    ("sgd", dict(fused=True, differentiable=True), RuntimeError, "`fused` does not support `differentiable`"),
    ("sgd", dict(fused=True, foreach=True), RuntimeError, "`fused` and `foreach` cannot be `True` together"),
    ("sgd", dict(fused=True, backend="torch"), RuntimeError, "fused=True needs a fused backend"),
    ("sgd", dict(differentiable=True, backend="cpp"), RuntimeError, "differentiable=True runs on the reference"),
    ("lars", dict(lr=0.1, max_trust_ratio=0.0), ValueError, "max_trust_ratio must be > 0"),
    ("lars", dict(lr=0.1, max_trust_ratio=math.nan), ValueError, "max_trust_ratio must be > 0"),
    ("lars", dict(lr=0.1, max_trust_ratio="1"), TypeError, "max_trust_ratio must be None or a real number"),
    ("lars", dict(lr=0.1, eps=-1e-8), ValueError, "eps must be"),
    ("lars", dict(lr=0.1, trust_coefficient=-0.001), ValueError, "trust_coefficient must be"),
    ("lars", dict(lr=0.1, trust_clip="yes"), TypeError, "trust_clip must be a bool"),
])
def test_bad_hyperparameters_raise_at_construction(kind, kwargs, error, match):
    cls = SGD if kind == "sgd" else LARS
    with pytest.raises(error, match=match):
        cls(make_params(), **kwargs)


@pytest.mark.parametrize("key,value,match", [
    ("lr", -1.0, "lr must be"), ("momentum", -0.5, "momentum must be"), ("weight_decay", math.inf, "weight_decay"),
    ("nesterov", True, "Nesterov momentum requires"), ("trust_coefficient", -1.0, "trust_coefficient"),
    ("eps", -1.0, "eps must be"), ("lars", "no", "lars must be a bool"), ("maximize", 1, "maximize must be a bool"),
    ("max_trust_ratio", -1.0, "max_trust_ratio must be > 0"),
])
def test_bad_group_edit_raises_at_step_before_any_change(key, value, match):
    a = make_params()
    opt = LARS([{"params": a[:3]}, {"params": a[3:], "momentum": 0.0}], lr=0.1)
    gen = torch.Generator().manual_seed(6)
    steps([(opt, a)], 2, gen)
    set_random_grads([a], gen)
    opt.param_groups[1][key] = value  # only the second group is bad: the first must not be stepped either
    snap = snapshot(opt)
    with pytest.raises((ValueError, TypeError), match=match):
        opt.step()
    assert_unchanged(opt, snap)


def test_param_made_non_contiguous_mid_training_goes_to_a_backend_that_takes_it():
    """step() remembers its backend choices; one made for contiguous params must not serve a param that has become a
    non-contiguous view since (``p.data = ...``): auto moves its bucket to the reference, an explicit fused backend
    refuses before any change."""
    require_backend("cpp")
    a, b, c = make_params(), make_params(), make_params()
    ours = SGD(a, lr=0.1, momentum=0.9, backend="auto")
    theirs = torch.optim.SGD(b, lr=0.1, momentum=0.9)
    explicit = SGD(c, lr=0.1, momentum=0.9, backend="cpp")
    gen = torch.Generator().manual_seed(4)
    steps([(ours, a), (theirs, b), (explicit, c)], 2, gen)
    assert [bk.backend.name for bk in ours._buckets()] == ["cpp"]
    matrix = next(i for i, p in enumerate(a) if p.dim() == 2)
    for params in (a, b, c):
        p = params[matrix]
        p.data = p.data.t().contiguous().t()  # the same values, as a non-contiguous view
        assert not p.is_contiguous()
    steps([(ours, a), (theirs, b)], 2, gen)
    assert [bk.backend.name for bk in ours._buckets()] == ["torch"]  # the bucket is no longer all contiguous
    for pa, pb in zip(a, b):
        assert_close(pa.detach(), pb.detach(), "fused")
    set_random_grads([c], gen)
    snap = snapshot(explicit)
    with pytest.raises(RuntimeError, match="needs contiguous tensors"):
        explicit.step()
    assert_unchanged(explicit, snap)


@pytest.mark.parametrize("lr", [0.1, SCHED], ids=["float-lr", "legw-lr"])
@pytest.mark.parametrize("cfg", [dict(), dict(momentum=0.9, dampening=0.2), dict(maximize=True)], ids=str)
def test_sparse_gradients_step_as_torch_sgd(cfg, lr):
    """Sparse gradients (an nn.Embedding(sparse=True)) take torch.optim.SGD's own step, bit for bit; the dense
    params of the same group keep theirs."""
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Embedding(10, 3, sparse=True), torch.nn.Linear(3, 2)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    ours = SGD(models[0].parameters(), lr=lr, **cfg)
    theirs = torch.optim.SGD(models[1].parameters(), lr=1.0 if isinstance(lr, LEGW) else lr, **cfg)
    schedule = torch.optim.lr_scheduler.LambdaLR(theirs, SCHED.lr) if isinstance(lr, LEGW) else None
    for t in range(6):
        x = torch.tensor([[t % 10, 3, 7], [1, 2, (5 * t) % 10]])
        for opt, model in zip((ours, theirs), models):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
        if schedule is not None:
            schedule.step()
        assert models[0][0].weight.grad.is_sparse
        for pa, pb in zip(models[0].parameters(), models[1].parameters()):
            assert_close(pa, pb, "exact")


@pytest.mark.parametrize("kind", ["lars", "sgd-cpp"])
def test_sparse_gradient_in_lars_group_or_on_fused_backend_raises_before_any_change(kind):
    a = make_params()
    opt = LARS(a, lr=0.1) if kind == "lars" else SGD(a, lr=0.1, momentum=0.9, backend=require_backend("cpp"))
    gen = torch.Generator().manual_seed(7)
    steps([(opt, a)], 1, gen)
    set_random_grads([a], gen)
    a[-1].grad = a[-1].grad.to_sparse()
    snap = snapshot(opt)
    match = "not supported by LARS" if kind == "lars" else "sparse gradients runs on the reference backend"
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    assert_unchanged(opt, snap)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.complex32, torch.bool])
def test_non_float_params_are_rejected(dtype):
    good = make_params()
    bad = torch.zeros(3, dtype=dtype)
    with pytest.raises(TypeError, match=f"parameter 1 has dtype {dtype}"):
        SGD([good[0], bad], lr=0.1)
    opt = SGD(good, lr=0.1)
    with pytest.raises(TypeError, match="only floating-point and complex64/complex128 parameters"):
        opt.add_param_group({"params": [bad]})
    assert len(opt.param_groups) == 1


def test_bad_param_group_is_not_added():
    a = make_params()
    opt = SGD(a[:2], lr=0.1)
    with pytest.raises(ValueError, match="momentum must be"):
        opt.add_param_group({"params": a[2:], "momentum": -1.0})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("bad,match", [
    (torch.tensor(-3), "step of parameter 0 must be one integer >= 0"),
    (torch.tensor([1, 2]), "must be one integer"),
    (torch.tensor(2.5), "must be one integer"),
    (math.nan, "must be one integer"),
    ("7", "must be one integer"),
])
def test_bad_step_in_state_dict_is_rejected_before_loading(bad, match):
    a = make_params()
    opt = SGD(a, lr=SCHED, momentum=0.9)
    steps([(opt, a)], 3, torch.Generator().manual_seed(8))
    sd = save_load(opt.state_dict())
    sd["state"][0]["step"] = bad
    sd["param_groups"][0]["momentum"] = 0.5  # would show if the groups were loaded before the error
    snap = snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert_unchanged(opt, snap)
    assert opt.param_groups[0]["momentum"] == 0.9


def test_non_tensor_momentum_buffer_is_rejected():
    a = make_params()
    opt = SGD(a, lr=0.1, momentum=0.9)
    steps([(opt, a)], 1, torch.Generator().manual_seed(9))
    sd = save_load(opt.state_dict())
    sd["state"][0]["momentum_buffer"] = [0.0] * 35
    with pytest.raises(ValueError, match="momentum_buffer of parameter 0 must be a tensor"):
        opt.load_state_dict(sd)


@pytest.mark.parametrize("kind", ["sgd", "lars"])
def test_deepcopy_and_pickle_continue_identically(kind):
    import copy
    import pickle

    a = make_params()
    opt = make_opt(kind, a, SCHED)
    gen = torch.Generator().manual_seed(10)
    steps([(opt, a)], 4, gen)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        b = clone.param_groups[0]["params"]
        assert clone.backend == opt.backend and int(clone.state[b[0]]["step"]) == 4
        assert clone.state[b[0]]["step"] is clone.state[b[1]]["step"]  # one shared counter again
        ref = make_opt(kind, clone_params(a), SCHED)
        ref.load_state_dict(save_load(opt.state_dict()))
        steps([(clone, b), (ref, ref.param_groups[0]["params"])], 3, torch.Generator().manual_seed(11))
        for pb, pr in zip(b, ref.param_groups[0]["params"]):
            assert_close(pb, pr, "exact")


def test_every_step_call_counts_even_without_gradients(backend):
    a = make_params()
    opt = SGD(a, lr=SCHED, momentum=0.9, backend=backend)
    opt.step()  # no gradients at all yet: still a step of the schedule, as with a torch LR scheduler
    assert float(opt.current_lrs()[0]) == pytest.approx(SCHED(1))
    set_random_grads([a], torch.Generator().manual_seed(12))
    opt.step()
    assert int(opt.state[a[0]]["step"]) == 2


@pytest.mark.skipif(legw_fused.ops.EXTENSION_ERROR is not None, reason=str(legw_fused.ops.EXTENSION_ERROR))
def test_params_are_bucketed_in_cpp_as_by_the_python_passes():
    """step()'s bucketing of plain tensors in one C++ pass (_C.group_params) against its Python passes, the oracle
    (_group_params, which torch.compile, DTensors and sparse grads take): the same buckets, in the same order, of
    the same tensor objects; None, so that the Python passes run, for anything but plain tensors."""
    gen = torch.Generator().manual_seed(0)
    shapes_dtypes = [((3, 4), torch.float32), ((5,), torch.float64), ((4, 3), torch.float32), ((2,), torch.bfloat16),
                     ((3,), torch.complex64), ((6,), torch.float32), ((1,), torch.float64), ((2, 2), torch.float32)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(d)) for s, d in shapes_dtypes]
    params[2] = torch.nn.Parameter(torch.randn(3, 4, generator=gen).t())  # not contiguous
    params[7] = torch.randn(2, 2, generator=gen, requires_grad=True)  # a plain tensor, not a Parameter
    for i, p in enumerate(params):
        if i != 5:  # one without a gradient
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
    params[7].grad = torch.randn(2, 2, generator=gen).t()  # a non-contiguous grad
    opt = SGD(params, lr=0.1, backend="torch")
    group = opt.param_groups[0]
    fast = legw_fused.ops._C.group_params(group["params"])
    slow = opt._group_params(group, 0, opt._checked_hyperparameters(group, 0))
    assert [(f[0], f[1], f[4], f[5]) for f in fast] == [(s[0], s[1], s[4], s[5]) for s in slow] == [
        (torch.device("cpu"), torch.float32, False, False), (torch.device("cpu"), torch.float64, True, True),
        (torch.device("cpu"), torch.bfloat16, True, True), (torch.device("cpu"), torch.complex64, True, True)]
    for f, s in zip(fast, slow):
        for fast_list, slow_list in ((f[2], s[2]), (f[3], s[3])):
            assert len(fast_list) == len(slow_list) and all(map(lambda x, y: x is y, fast_list, slow_list))
    assert legw_fused.ops._C.group_params([]) == []

    class Sub(torch.Tensor):
        pass

    sparse = torch.nn.Parameter(torch.randn(4, 2))
    sparse.grad = torch.randn(4, 2).to_sparse()
    sub = torch.randn(3).as_subclass(Sub)
    sub.grad = torch.randn(3)
    for other in (sparse, sub):
        assert legw_fused.ops._C.group_params(params + [other]) is None

    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        assert legw_fused.ops._C.group_params(params) is None


def test_trust_clip_at_zero_lr_leaves_params_finite(backend):
    a = make_params()
    before = [p.detach().clone() for p in a]
    opt = LARS(a, lr=0.0, trust_coefficient=0.0, trust_clip=True, backend=backend)
    set_random_grads([a], torch.Generator().manual_seed(13))
    opt.step()
    for p, q in zip(a, before):
        assert_close(p.detach(), q, "exact")  # r = 1 (the limit), lr = 0: no move, no NaN


def test_scheduler_state_with_wrong_number_of_schedules_is_rejected():
    a, b = make_params()[:2]
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=1.0)
    sched = legw_fused.LEGWScheduler(opt, SCHED)
    sd = sched.state_dict()
    sd["schedules"] = sd["schedules"][:1]
    with pytest.raises(ValueError, match="1 schedules saved for an optimizer with 2 param groups"):
        sched.load_state_dict(sd)


# ---------------------------------------------------------------------------------------------- autograd


def _backward_after_step_raises(module, opt, x):
    """A backward through a graph that saved the weights, after a step changed them: bumps and raises?"""
    loss = (module(x) ** 2).sum()
    loss.backward(retain_graph=True)
    before = [p._version for p in module.parameters()]
    opt.step()
    assert all(p._version > v for p, v in zip(module.parameters(), before))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("kind", ["sgd", "lars"])
@pytest.mark.parametrize("master_weights", [False, True])
def test_step_bumps_version_counters_so_autograd_sees_the_writes(kind, master_weights, backend):
    # As with torch.optim.SGD (the oracle, same scenario): a backward through a graph that saved the weights before
    # the step must raise, not use the updated weights. That needs the step to bump the version counters of all it
    # writes.
    torch.manual_seed(0)
    dtype = torch.bfloat16 if master_weights else torch.float32
    x = torch.randn(5, 4, dtype=dtype, requires_grad=True)
    theirs = torch.nn.Linear(4, 3).to(dtype)
    _backward_after_step_raises(theirs, torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9), x)
    ours = torch.nn.Linear(4, 3).to(dtype)
    cls = SGD if kind == "sgd" else LARS
    opt = cls(ours.parameters(), lr=0.1, momentum=0.9, master_weights=master_weights, backend=backend)
    _backward_after_step_raises(ours, opt, x)
    # The momentum buffers (and masters) exist now: the next step writes them too.
    written = [s["momentum_buffer"] for s in opt.state.values()]
    written += [s["master_param"] for s in opt.state.values() if "master_param" in s]
    assert len(written) == (4 if master_weights else 2)
    versions = [t._version for t in written]
    opt.step()
    assert all(t._version > v for t, v in zip(written, versions))
