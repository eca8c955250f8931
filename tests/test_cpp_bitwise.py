"""The cpp backend is torch.optim.SGD bit for bit on CPU in fp32: params and momentum buffers, every step.

torch's CPU kernels compute ``x.add(y, alpha=a)`` with one rounding (fma) on AVX2/AVX512 and with two on its DEFAULT
ISA; the cpp kernel picks the same at run time. Each case runs in this process (the CPU's own ISA) and, once, in a
subprocess with ATEN_CPU_CAPABILITY=default, so both of its builds are checked against the torch kernels they mirror.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_sgd import CONFIGS, ids  # torch.optim.SGD's options: plain, momentum, dampening, nesterov, weight decay

import legw_fused
from _helpers import require_backend
from legw_fused import LEGW, backends

STEPS = 100
# Awkward sizes: empty, single, below one AVX2 vector, one past a chunk (65536), several chunks and a long odd tail.
SIZES = [(0,), (1,), (7,), (65537,), (278011,), (33, 17)]
# Warmup over the first 50 steps, poly decay to step 100: the LR changes every step.
SCHEDULE = dict(base_lr=0.1, base_batch_size=32, batch_size=256, base_warmup_epochs=0.25, steps_per_epoch=25,
                epochs=4, decay="poly", power=2.0, end_lr=0.001)
IN_SUBPROCESS = "LEGW_FUSED_TEST_ISA_SUBPROCESS"


@pytest.fixture(autouse=True)
def cpp():
    require_backend("cpp")


def make_copies(n, sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    first = [torch.randn(s, generator=g) for s in sizes]
    return [[torch.nn.Parameter(t.clone()) for t in first] for _ in range(n)]


def set_grads(param_sets, gen):
    for i, p in enumerate(param_sets[0]):
        g = torch.randn(p.shape, generator=gen) * 0.5
        for params in param_sets:
            params[i].grad = g.clone()


def assert_bitwise(ours, theirs, a, b, step):
    for i, (pa, pb) in enumerate(zip(a, b)):
        assert torch.equal(pa.detach(), pb.detach()), f"step {step}: param {i} {tuple(pa.shape)} differs"
        ba = ours.state.get(pa, {}).get("momentum_buffer")
        bb = theirs.state.get(pb, {}).get("momentum_buffer")
        assert (ba is None) == (bb is None)
        assert ba is None or torch.equal(ba, bb), f"step {step}: momentum buffer {i} differs"


def torch_sgd(params, cfg, lr_kind, foreach):
    """torch.optim.SGD (single-tensor or foreach) and its LR scheduler, for our LR of kind `lr_kind`."""
    if lr_kind == "legw":
        # LambdaLR from 1.0: torch's LR is exactly the schedule's double value, as the kernel's before fp32 rounding.
        opt = torch.optim.SGD(params, lr=1.0, foreach=foreach, **cfg)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, LEGW(**SCHEDULE).lr)
    return torch.optim.SGD(params, lr=0.05 if lr_kind == "float" else torch.tensor(0.05), foreach=foreach,
                           **cfg), None


def run_sgd(cfg, lr_kind, steps=STEPS):
    """Ours against torch's single-tensor and foreach SGD, side by side on the same gradients."""
    a, b, c = make_copies(3)
    lr = {"float": 0.05, "tensor": torch.tensor(0.05), "legw": LEGW(**SCHEDULE)}[lr_kind]
    ours = legw_fused.SGD(a, lr=lr, backend="cpp", **cfg)
    theirs = [torch_sgd(b, cfg, lr_kind, False), torch_sgd(c, cfg, lr_kind, True)]
    gen = torch.Generator().manual_seed(1)
    for t in range(steps):
        set_grads([a, b, c], gen)
        ours.step()
        for (opt, scheduler), params in zip(theirs, (b, c)):
            opt.step()
            if scheduler is not None:
                scheduler.step()
            assert_bitwise(ours, opt, a, params, t)


@pytest.mark.parametrize("lr_kind", ["float", "tensor", "legw"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=ids)
def test_sgd_equals_torch_bitwise(cfg, lr_kind):
    run_sgd(cfg, lr_kind)


# (key, value) written into both optimizers' param groups before each step: step() checks a group again only when
# it holds other value objects than at the last step, so each edit must reach the kernels from the step that follows.
GROUP_EDITS = [(), (("weight_decay", 1e-2),), (("momentum", 0.5), ("dampening", 0.1)), (),
               (("dampening", 0.0), ("nesterov", True)), (("lr", 0.02),), (("maximize", True),),
               (("nesterov", False), ("momentum", 0.0)), (("momentum", 0.9),), (("weight_decay", 0.0),)]


def test_group_edits_between_steps_equal_torch_bitwise():
    a, b = make_copies(2)
    ours = legw_fused.SGD(a, lr=0.05, momentum=0.9, backend="cpp")
    theirs = torch.optim.SGD(b, lr=0.05, momentum=0.9, foreach=False)
    gen = torch.Generator().manual_seed(3)
    for t, edits in enumerate(GROUP_EDITS * 2):
        for key, value in edits:
            ours.param_groups[0][key] = value
            theirs.param_groups[0][key] = value
        set_grads([a, b], gen)
        ours.step()
        theirs.step()
        assert_bitwise(ours, theirs, a, b, t)


def run_maximize(cfg, steps=STEPS, scale=None):
    # At the op level: the optimizer's own maximize argument is not this test's subject. With `scale`, gradients are
    # scaled as a GradScaler's loss makes them; ours unscales them as it reads them (grad_scale), torch's are
    # unscaled first as GradScaler.unscale_ does.
    a, b, c = make_copies(3)
    theirs = [torch.optim.SGD(params, lr=0.05, foreach=foreach, maximize=True, **cfg)
              for params, foreach in ((b, False), (c, True))]
    hp = dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False) | cfg
    bufs = [None] * len(a)
    step = torch.zeros((), dtype=torch.int64)
    gen = torch.Generator().manual_seed(1)
    for t in range(steps):
        set_grads([a, b, c], gen)
        if scale is not None:
            inv_scale = scale.double().reciprocal().float()  # as GradScaler.unscale_ computes it
            for p in a + b + c:
                p.grad.mul_(scale)
            torch._amp_foreach_non_finite_check_and_unscale_([p.grad for p in b + c], torch.zeros(1), inv_scale)
        with torch.no_grad():
            bufs = backends.STEP_BACKENDS["cpp"].step_([p for p in a], [p.grad for p in a], bufs, lr=0.05, step=step,
                                                        maximize=True, grad_scale=scale, **hp)
        for opt, params in zip(theirs, (b, c)):
            opt.step()
            for i, (pa, pb) in enumerate(zip(a, params)):
                assert torch.equal(pa.detach(), pb.detach()), f"step {t}: param {i} differs"
                if hp["momentum"] != 0.0:
                    assert torch.equal(bufs[i], opt.state[pb]["momentum_buffer"]), f"step {t}: buffer {i} differs"


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[5], CONFIGS[6]], ids=ids)
def test_maximize_op_equals_torch_bitwise(cfg):
    run_maximize(cfg)


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[5], CONFIGS[6]], ids=ids)
def test_maximize_with_grad_scale_equals_unscale_then_torch_bitwise(cfg):
    """maximize under a GradScaler: the kernel folds maximize into the unscale factor's sign (g * -s), which must equal
    torch's unscale (g * s, rounded) followed by SGD's negation. A scale of 3 makes the unscale round."""
    run_maximize(cfg, steps=20, scale=torch.tensor(3.0))


@pytest.mark.skipif(IN_SUBPROCESS in os.environ, reason="already the subprocess")
def test_default_isa_build_equals_torch_default_kernels():
    # torch's DEFAULT kernels round a*y + x twice: the cpp kernel's baseline build must do the same. A few configs
    # cover every fused op (weight decay, dampened momentum, nesterov, maximize, each LR kind).
    script = (
        "import torch, test_cpp_bitwise as t\n"
        "assert torch.backends.cpu.get_cpu_capability() == 'DEFAULT', torch.backends.cpu.get_cpu_capability()\n"
        "for lr_kind in ('float', 'tensor', 'legw'):\n"
        "    t.run_sgd(t.CONFIGS[5], lr_kind, steps=20)\n"
        "t.run_sgd(t.CONFIGS[6], 'legw', steps=20)\n"
        "t.run_maximize(t.CONFIGS[6], steps=20)\n"
    )
    tests = Path(__file__).resolve().parent
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", PYTHONPATH=os.pathsep.join(
        [str(tests), str(tests.parent), os.environ.get("PYTHONPATH", "")]), **{IN_SUBPROCESS: "1"})
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=tests.parent, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
