"""legw_fused.SGD against torch's own test data for torch.optim.SGD: the OptimizerInfo of the installed torch
(torch.testing._internal.common_optimizers.optim_db), all of its sample inputs and all of its error inputs.

Every sample runs 100 steps with a float, a tensor and a LEGW lr (torch: lr=1.0 and LambdaLR(lr_lambda=LEGW.lr))
on each CPU backend, compared with torch.optim.SGD after every step:
- bit for bit: the reference backend on fp32 and fp64, and (the target) the cpp backend on fp32;
- within ULPS_PER_STEP ulps of the tensor's largest magnitude, each step starting from torch's state:
  - the Triton interpreter (fp32), 1 ulp: it evaluates the kernel with numpy, which rounds every product and sum
    (torch's CPU kernels round p + alpha*d once, with a fused multiply-add); 8 steps, as it takes ~0.1 s a step;
  - complex64 on every backend, 2 ulps: we update the real view with torch's real kernels (one rounding per
    multiply-add), torch's complex kernels round each product and each sum; buf = m*buf + (g + wd*p) collects two
    such differences in one step (seen: 1.73 ulps). torch's own complex-vs-real test compares within a tolerance.
"""

import pytest
import torch
from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_db

import legw_fused
from _helpers import require_backend
from legw_fused import LEGW

SGD_INFO = next(info for info in optim_db if info.optim_cls is torch.optim.SGD)
SAMPLES = SGD_INFO.optim_inputs_func(device="cpu")
ERRORS = SGD_INFO.optim_error_inputs_func(device="cpu", dtype=torch.float32)
STEPS = 100
TRITON_STEPS = 8
SHAPES = [(10, 5), (5,), (1,), (0,), (3, 4, 3)]
LR_KINDS = ["float", "tensor", "legw"]
# (backend, dtype): fp64 runs on the reference only (the fused kernels take fp32/bf16/fp16).
CASES = [("torch", torch.float32), ("torch", torch.float64), ("torch", torch.complex64), ("cpp", torch.float32),
         ("cpp", torch.complex64), ("triton", torch.float32), ("triton", torch.complex64)]
# The LEGW lr of a sample: peak 2x the sample's lr, 20 warmup steps, poly decay to 0 at step 100.
WARMUP_EPOCHS, STEPS_PER_EPOCH, EPOCHS = 0.25, 20, 5


def test_the_db_is_torch_sgds():
    """The data really is torch's: nine sample inputs and the construction errors of torch's own test."""
    assert SGD_INFO.supports_complex and SGD_INFO.supports_sparse
    assert {s.desc for s in SAMPLES} >= {"default", "tensor lr", "maximize", "nesterov", "dampening"}
    assert len(ERRORS) >= 7


def _ulps_per_step(backend, dtype):
    """0: bit for bit over all steps; else the bound of each step (see the module docstring)."""
    return 2 if dtype.is_complex else 1 if backend == "triton" else 0


def _case_marks(backend, dtype, lr_kind):
    # Every case holds as stated: the cpp kernel rounds as torch does (one fma per update in torch's order, the
    # LEGW LR as float32(LEGW.lr(t)); csrc/fused_step.h).
    return []


def _params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in SHAPES]


def _lrs(kwargs, lr_kind):
    """(our lr, torch's lr, torch's lr_lambda or None) for a sample."""
    base = float(kwargs.get("lr", 1e-3))
    if lr_kind == "float":
        return base, base, None
    if lr_kind == "tensor":
        return torch.tensor(base), torch.tensor(base), None
    schedule = LEGW(base, 32, 128, WARMUP_EPOCHS, STEPS_PER_EPOCH, EPOCHS)
    return schedule, 1.0, schedule.lr


def _within_ulps(actual, expected, ulps, what):
    """|actual - expected| <= ulps * eps * max|expected|: an update that rounds differently moves a value by an ulp
    of the larger operand, which near a cancellation (p - lr*d ~ 0) is many ulps of the small result."""
    if expected.numel() == 0:
        return
    bound = ulps * torch.finfo(expected.dtype).eps * expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= bound, f"{what}: differs from torch's by {err:.3g} > {ulps} ulp(s) of its largest magnitude " \
                         f"({bound:.3g})"


def _compare(ours, theirs, a, b, ulps, t):
    for i, (pa, pb) in enumerate(zip(a, b)):
        pairs = [("param", pa.detach(), pb.detach())]
        buf_a, buf_b = ours.state.get(pa, {}).get("momentum_buffer"), theirs.state.get(pb, {}).get("momentum_buffer")
        assert (buf_a is None) == (buf_b is None)
        if buf_a is not None:
            assert buf_a.dtype == buf_b.dtype  # complex params keep a complex buffer, as torch's
            pairs.append(("momentum_buffer", buf_a, buf_b))
        for name, x, y in pairs:
            what = f"step {t}, param {i} {tuple(y.shape)}, {name}"
            if ulps == 0:
                assert torch.equal(x, y), f"{what}: max difference {(x - y).abs().max().item():.3g}"
            else:
                _within_ulps(torch.view_as_real(x) if x.is_complex() else x,
                             torch.view_as_real(y) if y.is_complex() else y, ulps, what)


@torch.no_grad()
def _resync(ours, theirs, a, b):
    """Our params and buffers := torch's, so that the next step is compared from the same state."""
    for pa, pb in zip(a, b):
        pa.copy_(pb)
        if pb in theirs.state and "momentum_buffer" in theirs.state[pb]:
            ours.state[pa]["momentum_buffer"].copy_(theirs.state[pb]["momentum_buffer"])


def _run_sample(sample, lr_kind, backend, dtype):
    kwargs = dict(sample.kwargs)
    ours_lr, torch_lr, lr_lambda = _lrs(kwargs, lr_kind)
    a, b = _params(dtype), _params(dtype)
    ours = legw_fused.SGD(a, **{**kwargs, "lr": ours_lr}, backend=backend)
    theirs = torch.optim.SGD(b, **{**kwargs, "lr": torch_lr})
    schedule = None if lr_lambda is None else torch.optim.lr_scheduler.LambdaLR(theirs, lr_lambda)
    ulps = _ulps_per_step(backend, dtype)
    gen = torch.Generator().manual_seed(1)
    for t in range(TRITON_STEPS if backend == "triton" else STEPS):
        for pa, pb in zip(a, b):
            g = torch.randn(pa.shape, generator=gen, dtype=dtype)
            pa.grad, pb.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
        if schedule is not None:
            schedule.step()
        _compare(ours, theirs, a, b, ulps, t)
        if ulps:
            _resync(ours, theirs, a, b)


@pytest.mark.parametrize("lr_kind", LR_KINDS)
@pytest.mark.parametrize("backend,dtype", [pytest.param(bk, dt, id=f"{bk}-{str(dt)[6:]}") for bk, dt in CASES
                                           if bk != "cpp" or _ulps_per_step(bk, dt)])
@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.desc.replace(" ", "_"))
def test_sample_inputs_match_torch_sgd(sample, backend, dtype, lr_kind):
    _run_sample(sample, lr_kind, require_backend(backend), dtype)


@pytest.mark.parametrize("lr_kind", [pytest.param(k, marks=_case_marks("cpp", torch.float32, k)) for k in LR_KINDS])
@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.desc.replace(" ", "_"))
def test_sample_inputs_match_torch_sgd_bitwise_on_cpp(sample, lr_kind):
    _run_sample(sample, lr_kind, require_backend("cpp"), torch.float32)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("error", ERRORS, ids=lambda e: e.optimizer_error_input.desc.replace(" ", "_"))
def test_error_inputs_raise_as_torch_sgd(error, backend):
    """Torch's error inputs, with torch's exception (or warning) type, matching torch's own regex; checked on
    torch.optim.SGD too, so that the expectation is torch's behaviour and not only its test data."""
    sample = error.optimizer_error_input
    assert error.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR  # SGD's are all construction errors
    require_backend(backend)
    for make in (lambda: torch.optim.SGD(sample.params, **sample.kwargs),
                 lambda: legw_fused.SGD(sample.params, **sample.kwargs, backend=backend)):
        if issubclass(error.error_type, Warning):
            with pytest.warns(error.error_type, match=error.error_regex):
                make()
        else:
            with pytest.raises(error.error_type, match=error.error_regex):
                make()
