"""legw_fused.SGD against torch.optim.SGD: identical gradients, every step, parameters and momentum buffers."""

import pytest
import torch

import legw_fused
from _helpers import TOL, assert_close, clone_params, legw_formula, make_params, set_random_grads, tol_for
from legw_fused import LEGW

STEPS = 30
CONFIGS = [
    dict(momentum=0.0),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.1),
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.9, weight_decay=1e-2),
    dict(momentum=0.8, dampening=0.3, weight_decay=5e-3),
    dict(momentum=0.9, nesterov=True, weight_decay=5e-3),
    dict(momentum=0.0, weight_decay=1e-2),
]




def ids(cfg):
    return "-".join(f"{k}={v}" for k, v in cfg.items())


def compare_states(ours, theirs, params_a, params_b, rtol, atol):
    for pa, pb in zip(params_a, params_b):
        torch.testing.assert_close(pa.detach(), pb.detach(), rtol=rtol, atol=atol)
        ba = ours.state.get(pa, {}).get("momentum_buffer")
        bb = theirs.state.get(pb, {}).get("momentum_buffer")
        assert (ba is None) == (bb is None)
        if ba is not None:
            torch.testing.assert_close(ba, bb, rtol=rtol, atol=atol)


@pytest.mark.parametrize("foreach", [False, True], ids=["torch-single", "torch-foreach"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=ids)
def test_float_lr_with_lambdalr_matches_torch(cfg, foreach, backend):
    a = make_params()
    b = clone_params(a)
    ours = legw_fused.SGD(a, lr=0.05, backend=backend, **cfg)
    theirs = torch.optim.SGD(b, lr=0.05, foreach=foreach, **cfg)
    decay = lambda t: 1.0 / (1 + 0.1 * t)  # noqa: E731
    sa = torch.optim.lr_scheduler.LambdaLR(ours, decay)
    sb = torch.optim.lr_scheduler.LambdaLR(theirs, decay)
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        set_random_grads([a, b], gen)
        ours.step()
        theirs.step()
        sa.step()
        sb.step()
        # The reference runs torch's fp32 op sequence: bit for bit. Fused kernels: fp32 rounding.
        compare_states(ours, theirs, a, b, **tol_for(backend))
    assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"]


@pytest.mark.parametrize("cfg", CONFIGS, ids=ids)
def test_legw_lr_matches_torch_with_written_out_schedule(cfg, backend):
    formula = legw_formula(0.1, 32, 256, 0.25, 12, 3, decay="poly", power=2.0, end_lr=0.001)
    sched = LEGW(0.1, 32, 256, 0.25, 12, 3, decay="poly", power=2.0, end_lr=0.001)
    assert sched.warmup_steps == 24 and sched.total_steps == 36
    a = make_params()
    b = clone_params(a)
    ours = legw_fused.SGD(a, lr=sched, backend=backend, **cfg)
    theirs = torch.optim.SGD(b, lr=1.0, **cfg)
    sb = torch.optim.lr_scheduler.LambdaLR(theirs, formula)
    gen = torch.Generator().manual_seed(2)
    for t in range(sched.total_steps + 4):
        set_random_grads([a, b], gen)
        assert ours.current_lrs()[0].item() == pytest.approx(formula(t), rel=1e-12)
        ours.step()
        theirs.step()
        sb.step()
        compare_states(ours, theirs, a, b, **TOL["fused"])
    assert int(ours.state[a[0]]["step"]) == sched.total_steps + 4


def test_two_groups_with_different_options_and_schedules(backend):
    fa = legw_formula(0.1, 32, 128, 0.5, 10, 4)
    fb = legw_formula(0.02, 32, 128, 0.0, 10, 4, decay="cosine", end_lr=0.001)
    sa = LEGW(0.1, 32, 128, 0.5, 10, 4)
    sb = LEGW(0.02, 32, 128, 0.0, 10, 4, decay="cosine", end_lr=0.001)
    a = make_params()
    b = clone_params(a)
    ours = legw_fused.SGD([{"params": a[:3], "lr": sa, "nesterov": True, "weight_decay": 1e-3},
                           {"params": a[3:], "lr": sb, "dampening": 0.2}], lr=0.5, momentum=0.9, backend=backend)
    theirs = torch.optim.SGD([{"params": b[:3], "nesterov": True, "weight_decay": 1e-3},
                              {"params": b[3:], "dampening": 0.2}], lr=1.0, momentum=0.9)
    lam = torch.optim.lr_scheduler.LambdaLR(theirs, [fa, fb])
    gen = torch.Generator().manual_seed(3)
    for _ in range(45):
        set_random_grads([a, b], gen)
        ours.step()
        theirs.step()
        lam.step()
        compare_states(ours, theirs, a, b, **TOL["fused"])


def test_params_without_grad_are_skipped_and_count_keeps_global_time(backend):
    a = make_params()
    b = clone_params(a)
    sched = LEGW(0.1, 32, 128, 0.5, 10, 4)
    ours = legw_fused.SGD(a, lr=sched, momentum=0.9, backend=backend)
    theirs = torch.optim.SGD(b, lr=1.0, momentum=0.9)
    lam = torch.optim.lr_scheduler.LambdaLR(theirs, legw_formula(0.1, 32, 128, 0.5, 10, 4))
    gen = torch.Generator().manual_seed(4)
    frozen_before = a[2].detach().clone()
    for t in range(12):
        # Parameter 2 gets no gradient for the first 6 steps; then it joins at the global step count, as with a
        # torch LR scheduler (it does not restart the warmup).
        set_random_grads([a, b], gen, skip=(2,) if t < 6 else ())
        if t < 6:
            assert a[2] not in ours.state
        ours.step()
        theirs.step()
        lam.step()
        compare_states(ours, theirs, a, b, **TOL["fused"])
        if t < 6:
            assert torch.equal(a[2].detach(), frozen_before)


def test_mixed_dtypes_in_one_group_are_bucketed():
    # With backend="auto" the fp32 bucket goes to the fused CPU kernel (if built) and the fp64 one to the reference.
    # The dtypes alternate in the group: each bucket must keep its tensors' order and none may be lost.
    a = make_params(seed=5) + make_params(shapes=[(6, 3), (11,)], seed=6, dtype=torch.float64)
    b = clone_params(a)
    assert len(a) > 4

    def interleaved(x):  # fp64, fp32, fp32, fp64, fp32...
        return [x[-2]] + x[:2] + [x[-1]] + x[2:-2]

    ours = legw_fused.SGD(interleaved(a), lr=0.03, momentum=0.9, weight_decay=1e-3)
    theirs = torch.optim.SGD(interleaved(b), lr=0.03, momentum=0.9, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(7)
    for _ in range(10):
        set_random_grads([a, b], gen)
        ours.step()
        theirs.step()
        compare_states(ours, theirs, a[:-2], b[:-2], **TOL["fused"])
        compare_states(ours, theirs, a[-2:], b[-2:], **TOL["exact"])  # fp64: the reference, in fp64, bit for bit
    assert a[-1].dtype == torch.float64 and ours.state[a[-1]]["momentum_buffer"].dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_use_fp32_math_rounded_once(dtype, backend):
    """The reference computes bf16/fp16 steps in fp32 and rounds once per stored value (written out here)."""
    lr, m, damp, wd = 0.05, 0.9, 0.1, 1e-2
    params = make_params(dtype=dtype)
    p32 = [p.detach().float() for p in params]
    buf32 = [None] * len(params)
    opt = legw_fused.SGD(params, lr=lr, momentum=m, dampening=damp, weight_decay=wd, backend=backend)
    gen = torch.Generator().manual_seed(8)
    for _ in range(10):
        set_random_grads([params], gen)
        for i, p in enumerate(params):
            d = p.grad.float() + wd * p.detach().float()
            buf = d.clone() if buf32[i] is None else buf32[i].float() * m + (1 - damp) * d
            p32[i] = (p.detach().float() - lr * buf).to(dtype)
            buf32[i] = buf.to(dtype)
        opt.step()
        for i, p in enumerate(params):
            assert p.dtype == dtype and opt.state[p]["momentum_buffer"].dtype == dtype
            kind = "bf16_rounding" if dtype == torch.bfloat16 else "fp16_rounding"
            assert_close(p.detach(), p32[i], kind)
            assert_close(opt.state[p]["momentum_buffer"], buf32[i], kind)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_cuda_params_match_torch_and_never_sync():
    sched = LEGW(0.1, 32, 256, 0.25, 12, 3)
    formula = legw_formula(0.1, 32, 256, 0.25, 12, 3)
    a = make_params(device="cuda")
    b = clone_params(a)
    ours = legw_fused.SGD(a, lr=sched, momentum=0.9, nesterov=True, weight_decay=1e-3)
    theirs = torch.optim.SGD(b, lr=1.0, momentum=0.9, nesterov=True, weight_decay=1e-3)
    lam = torch.optim.lr_scheduler.LambdaLR(theirs, formula)
    gen = torch.Generator().manual_seed(9)
    for _ in range(40):
        set_random_grads([a, b], gen)
        torch.cuda.set_sync_debug_mode("error")
        try:
            ours.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        theirs.step()
        lam.step()
        compare_states(ours, theirs, a, b, **TOL["fused"])
    assert ours.state[a[0]]["step"].is_cuda
