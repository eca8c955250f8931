"""What makes legw_fused.SGD a drop-in torch.optim.SGD beyond the update itself: differentiable=True, fused/foreach,
complex state, state_dicts that load as saved, and a LEGW schedule that cannot be lost silently to a torch LR
scheduler or to a float written over it."""

import copy
import warnings

import pytest
import torch

from _helpers import TOL, assert_close, clone_params, make_params, require_backend, set_random_grads
from legw_fused import LARS, LEGW, SGD

SCHED = LEGW(0.1, 32, 128, 0.5, 10, 4)


# ---------------------------------------------------------------------------------------------- differentiable

def test_differentiable_step_is_torchs_and_passes_gradcheck():
    """differentiable=True: the step is recorded by autograd as torch's is (torch's TestDifferentiableOptimizer
    does the same gradcheck), and gives torch's values."""
    def step(cls, p, grad, buf, **kw):
        p = p.clone()  # a non-leaf param: allowed with differentiable=True, as in torch
        p.grad = grad
        opt = cls([p], lr=0.1, momentum=0.9, weight_decay=0.05, differentiable=True, **kw)
        opt.state[p]["momentum_buffer"] = buf.clone()  # non-leaf too: the step updates it in place
        opt.step()
        return p, opt.state[p]["momentum_buffer"]

    gen = torch.Generator().manual_seed(0)
    p, grad, buf = (torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    torch.autograd.gradcheck(lambda *t: step(SGD, *t), (p, grad, buf))
    for ours, theirs in zip(step(SGD, p, grad, buf), step(torch.optim.SGD, p, grad, buf)):
        assert ours.requires_grad and torch.equal(ours, theirs)


# ---------------------------------------------------------------------------------------------- fused / foreach

def test_fused_true_runs_a_fused_backend_and_false_the_reference():
    backend = require_backend("cpp")
    a, b, c = make_params(), make_params(), make_params()
    fused = SGD(a, lr=0.05, momentum=0.9, fused=True)
    explicit = SGD(b, lr=0.05, momentum=0.9, backend=backend)
    reference = SGD(c, lr=0.05, momentum=0.9, fused=False, foreach=True)  # foreach: accepted, no effect
    assert [x.backend.name for x in fused._buckets()] == []  # no grads yet: nothing to step
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        set_random_grads([a, b, c], gen)
        assert {x.backend.name for x in fused._buckets()} == {backend}
        assert {x.backend.name for x in reference._buckets()} == {"torch"}
        for opt in (fused, explicit, reference):
            opt.step()
    for pa, pb, pc in zip(a, b, c):
        assert_close(pa, pb, "exact")
        assert_close(pa, pc, "fused")
    with pytest.raises(RuntimeError, match="fused=True needs a fused backend and none can run"):
        SGD(make_params(dtype=torch.float64), lr=0.1, fused=True)  # the fused kernels take no fp64
    with pytest.raises(RuntimeError, match="fused=False runs on the reference backend"):
        SGD(make_params(), lr=0.1, fused=False, backend=backend)


# ---------------------------------------------------------------------------------------------- state_dict

@pytest.mark.parametrize("kind", ["sgd", "lars"])
def test_state_dict_after_load_is_the_one_loaded(kind):
    """load_state_dict used to give every group a "differentiable" key (torch's __setstate__ adds it to the
    defaults, and the defaults fill the groups); the state_dict must come back as saved."""
    a = make_params()
    opt = SGD(a, lr=SCHED, momentum=0.9) if kind == "sgd" else LARS(a, lr=SCHED, max_trust_ratio=10.0)
    set_random_grads([a], torch.Generator().manual_seed(2))
    opt.step()
    saved = opt.state_dict()
    b = clone_params(a)
    other = SGD(b, lr=0.1, momentum=0.9) if kind == "sgd" else LARS(b, lr=0.1)
    for _ in range(2):  # twice: the defaults must not drift either
        other.load_state_dict(copy.deepcopy(saved))
        again = other.state_dict()
        assert again["param_groups"] == saved["param_groups"]
        assert again["state"].keys() == saved["state"].keys()
    assert ("differentiable" in saved["param_groups"][0]) == (kind == "sgd")


def test_complex_params_keep_complex_state_through_a_state_dict(backend):
    a = make_params(dtype=torch.complex64)
    opt = SGD(a, lr=0.01, momentum=0.9, backend=backend)
    for p in a:
        p.grad = torch.randn_like(p)
    opt.step()
    assert all(opt.state[p]["momentum_buffer"].dtype == torch.complex64 for p in a)
    b = clone_params(a)
    theirs = torch.optim.SGD(b, lr=0.01, momentum=0.9)
    theirs.load_state_dict(copy.deepcopy(opt.state_dict()))  # and torch continues from ours
    for p, q in zip(a, b):
        g = torch.randn_like(p)
        p.grad, q.grad = g, g.clone()
    opt.step()
    theirs.step()
    for p, q in zip(a, b):
        assert_close(torch.view_as_real(p.detach()), torch.view_as_real(q.detach()), "fused")


# ---------------------------------------------------------------------------------------------- LR schedulers

SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10),
}


@pytest.mark.parametrize("make", SCHEDULERS.values(), ids=SCHEDULERS.keys())
def test_torch_scheduler_on_a_legw_lr_is_refused_when_built(make):
    a = make_params()
    opt = SGD([{"params": a[:3]}, {"params": a[3:], "lr": 0.05}], lr=SCHED, momentum=0.9)
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    step = opt.step
    with pytest.raises(ValueError, match=r"a torch LR scheduler cannot drive param group\(s\) \[0\].*LEGWScheduler"):
        make(opt)
    # Left as it was: the groups (no initial_lr, no max_lr...), the step method.
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
    assert opt.step == step and not hasattr(opt.step, "_wrapped_by_lr_sched")
    set_random_grads([a], torch.Generator().manual_seed(3))
    opt.step()
    assert opt.param_groups[0]["lr"] is SCHED


def test_torch_scheduler_on_float_lrs_works_as_in_torch():
    a, b = make_params(), make_params()
    ours, theirs = SGD(a, lr=0.1, momentum=0.9), torch.optim.SGD(b, lr=0.1, momentum=0.9)
    sa, sb = (torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (ours, theirs))
    gen = torch.Generator().manual_seed(4)
    for _ in range(5):
        set_random_grads([a, b], gen)
        ours.step()
        theirs.step()
        sa.step()
        sb.step()
    assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"] == 0.025
    for pa, pb in zip(a, b):
        assert_close(pa, pb, "fused")


def test_reduce_lr_on_plateau_on_a_legw_lr_says_why():
    # ReduceLROnPlateau never touches the optimizer when built; its first reduction reads float(group["lr"]).
    opt = SGD(make_params(), lr=SCHED)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0)
    plateau.step(1.0)
    with pytest.raises(TypeError, match="is a schedule, not a number: a torch LR scheduler cannot drive"):
        plateau.step(2.0)
    assert opt.param_groups[0]["lr"] is SCHED


def test_float_written_over_a_legw_warns_once_per_group_and_drives_the_group():
    a = make_params()
    b = clone_params(a)
    opt = SGD([{"params": a[:3]}, {"params": a[3:]}], lr=SCHED, momentum=0.9, backend="torch")
    ref = torch.optim.SGD([{"params": b[:3]}, {"params": b[3:]}], lr=1.0, momentum=0.9)
    gen = torch.Generator().manual_seed(5)
    set_random_grads([a, b], gen)
    opt.step()
    with torch.no_grad():
        for pa, pb in zip(a, b):  # the same state from here on
            pb.copy_(pa)
    for g, r in zip(opt.state_dict()["state"].values(), b):
        ref.state[r]["momentum_buffer"] = g["momentum_buffer"].clone()
    for group in opt.param_groups:
        group["lr"] = 0.01
    for group in ref.param_groups:
        group["lr"] = 0.01
    with pytest.warns(UserWarning) as record:
        set_random_grads([a, b], gen)
        opt.step()
        ref.step()
    messages = [str(w.message) for w in record if "no longer drives" in str(w.message)]
    assert len(messages) == 2 and "param group 0" in messages[0] and "param group 1" in messages[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per group: no second warning
        set_random_grads([a, b], gen)
        opt.step()
        ref.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, **TOL["exact"])
    opt.param_groups[0]["lr"] = SCHED  # a LEGW again: tracked again, warned again if overwritten
    opt.step()
    opt.param_groups[0]["lr"] = torch.tensor(0.01)
    with pytest.warns(UserWarning, match="param group 0"):
        opt.step()


def test_distributed_checkpoint_state_init_is_not_an_override():
    """get_state_dict of a fresh optimizer takes one step at lr = 0.0 and puts the LEGW back (torch's
    _init_optim_state): no warning, and the LEGW still drives the group."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = torch.nn.Linear(3, 2)
    opt = SGD(model.parameters(), lr=SCHED, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, optim_sd = get_state_dict(model, opt)
    assert optim_sd["param_groups"][0]["lr"] == {"legw": SCHED.to_dict()}
    opt.param_groups[0]["lr"] = 0.0  # with state now: a real override
    model(torch.randn(4, 3)).sum().backward()
    with pytest.warns(UserWarning, match="no longer drives this group"):
        opt.step()
