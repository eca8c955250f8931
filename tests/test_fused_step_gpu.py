"""GPU tests of the fused step: the cuda and triton backends against the reference on CUDA tensors, CUDA-graph
capture and replay, a tensor of more than 2^31 elements. Skipped without a CUDA device."""

import pytest
import torch
from test_fused_step import CONFIGS, LRS, make, run_pair

from _helpers import assert_close, assert_close_to_reference
from legw_fused import LEGW, SGD, backends

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
GPU_BACKENDS = ["cuda", "triton"]
SIZES = [(0,), (1,), (7,), (65537,), (278011,), (3, 5, 7), (1 << 20,)]


def require_gpu_backend(name):
    reason = backends.STEP_BACKENDS[name].unavailable_reason("cuda")
    if reason is not None:
        pytest.skip(f"backend {name!r} unavailable: {reason}")


def run_pair_cuda(kind, cfg, dtype, lr, backend, steps=10, sizes=SIZES):
    return run_pair(kind, cfg, dtype, lr, backend, steps=steps, sizes=sizes, device="cuda")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind,cfg", CONFIGS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CONFIGS)])
@pytest.mark.parametrize("lr_id", list(LRS))
def test_matches_reference_on_gpu(backend, dtype, kind, cfg, lr_id):
    require_gpu_backend(backend)
    run_pair_cuda(kind, cfg, dtype, LRS[lr_id], backend)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_many_tensors_on_gpu(backend):
    require_gpu_backend(backend)
    sizes = [(i % 13 + 1, 3) for i in range(600)] + [(0,), (300000,)]
    run_pair_cuda("lars", dict(momentum=0.9, weight_decay=1e-4, trust_clip=True), torch.float32, 0.1, backend,
                  steps=3, sizes=sizes)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_step_never_syncs(backend):
    require_gpu_backend(backend)
    g = torch.Generator(device="cuda").manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, device="cuda")) for s in SIZES]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, device="cuda")
    opt = make("lars", params, LRS["legw-lr"], backend, dict(momentum=0.9, weight_decay=1e-4, trust_clip=True))
    opt.step()  # first step: buffers and cached tables are made
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("kind", ["sgd", "lars"])
def test_cuda_graph_capture_and_replay_advance_the_schedule(backend, kind):
    require_gpu_backend(backend)
    sched = LEGW(0.5, 32, 256, 0.125, 4, 3)
    cfg = dict(momentum=0.9, weight_decay=1e-4) if kind == "sgd" else dict(momentum=0.9, weight_decay=1e-4,
                                                                           trust_clip=True)
    g = torch.Generator(device="cuda").manual_seed(2)
    a = [torch.nn.Parameter(torch.randn(s, generator=g, device="cuda")) for s in SIZES[1:]]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    static_grads = [torch.randn(p.shape, generator=g, device="cuda") for p in a]
    graphed, eager = make(kind, a, sched, backend, cfg), make(kind, b, sched, "torch", cfg)
    for p, q, grad in zip(a, b, static_grads):
        p.grad, q.grad = grad, grad.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        # Exactly one warm-up step: state, buffers, launch tables and every compiled kernel variant exist after it
        # (the next step takes the continuing-momentum and |p|^2-cache paths, which must need no new variant).
        graphed.step()
    torch.cuda.current_stream().wait_stream(stream)
    eager.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step()
    for _ in range(sched.total_steps):  # across warmup and decay: the LR must change on every replay
        graph.replay()
        eager.step()
    torch.cuda.synchronize()
    assert int(graphed.state[a[0]]["step"]) == 1 + sched.total_steps
    for p, q in zip(a, b):
        assert_close_to_reference(p.detach(), q.detach(), torch.float32)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_tensor_over_2_31_elements(backend):
    require_gpu_backend(backend)
    n = (1 << 31) + 7
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * 4 * n + (1 << 30):
        pytest.skip(f"needs {3 * 4 * n / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    p = torch.nn.Parameter(torch.ones(n, device="cuda"))
    p.grad = torch.ones(n, device="cuda")
    p.grad[-3:] = torch.tensor([2.0, 3.0, 4.0], device="cuda")
    SGD([p], lr=0.5, momentum=0.0, backend=backend).step()
    # The last elements, beyond int32 indexing, received their own update.
    torch.testing.assert_close(p[-4:].detach(), torch.tensor([0.5, 0.0, -0.5, -1.0], device="cuda"))
    torch.testing.assert_close(p[:2].detach(), torch.tensor([0.5, 0.5], device="cuda"))


# ---------------------------------------------------------------------------------------------- LARS norm cache
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_norm_cache_on_gpu(backend):
    """Cached vs uncached vs the reference; the cache holds the chunk sums of the stored params after each step; an
    in-place edit between steps is seen."""
    from test_lars_norms import CFG, SCHED, chunk_sums

    from legw_fused import LARS

    require_gpu_backend(backend)
    chunk = backends.STEP_BACKENDS[backend].param_sq_chunk
    g = torch.Generator(device="cuda").manual_seed(3)
    first = [torch.randn(s, generator=g, device="cuda") for s in SIZES]
    sets = [[torch.nn.Parameter(t.clone()) for t in first] for _ in range(3)]
    cached = LARS(sets[0], lr=SCHED, backend=backend, **CFG)
    uncached = LARS(sets[1], lr=SCHED, backend=backend, cache_norms=False, **CFG)
    ref = LARS(sets[2], lr=SCHED, backend="torch", cache_norms=False, **CFG)
    for t in range(10):
        if t == 5:
            with torch.no_grad():
                for params in sets:
                    params[3].mul_(2.0)
        for i, p in enumerate(sets[0]):
            grad = torch.randn(p.shape, generator=g, device="cuda") * 0.5
            for params in sets:
                params[i].grad = grad.clone()
        for opt in (cached, uncached, ref):
            opt.step()
        for a, b, c in zip(*sets):
            assert_close_to_reference(a.detach(), c.detach(), torch.float32)
            assert_close_to_reference(b.detach(), c.detach(), torch.float32)
        (entry,) = cached._param_sq_cache.values()
        assert_close(entry["param_sq"].double().cpu(), chunk_sums(sets[0], chunk).cpu(), "chunk_sums")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_sum_squares_on_gpu(backend):
    require_gpu_backend(backend)
    b = backends.STEP_BACKENDS[backend]
    g = torch.Generator(device="cuda").manual_seed(4)
    params = [torch.randn(s, generator=g, device="cuda") for s in SIZES]
    grads = [torch.randn(s, generator=g, device="cuda") for s in SIZES]
    got = b.sum_squares(params, grads, [], None, torch.tensor(4.0, device="cuda"))
    want = torch.stack([torch.stack([p.double().square().sum() for p in params]),
                        torch.stack([(x.double() / 4).square().sum() for x in grads])])
    assert_close(got.double(), want, "sum_squares")


def test_cuda_lars_step_launches_at_most_three_kernels():
    from torch.profiler import ProfilerActivity, profile

    from legw_fused import LARS

    require_gpu_backend("cuda")
    g = torch.Generator(device="cuda").manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, device="cuda")) for s in SIZES]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, device="cuda")
    opt = LARS(params, lr=LEGW(0.5, 32, 256, 0.125, 4, 3), momentum=0.9, weight_decay=1e-4, backend="cuda")
    opt.step()
    opt.step()  # the cache is valid from here on
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    # ours: sum_squares (reads g only), trust ratios, update; torch's: the step-count increment
    assert len([k for k in kernels if "legw_fused" in k]) == 3, kernels


# torch.optim.SGD's options (test_sgd.CONFIGS) and maximize, against torch's own fused CUDA kernel.
FUSED_SGD_CONFIGS = [dict(momentum=0.0), dict(momentum=0.9, weight_decay=1e-2), dict(momentum=0.9, nesterov=True,
                     weight_decay=5e-3), dict(momentum=0.8, dampening=0.3), dict(momentum=0.9, maximize=True)]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("lr_kind", ["float", "legw"])
@pytest.mark.parametrize("cfg", FUSED_SGD_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_matches_torch_fused_sgd(backend, lr_kind, cfg):
    """cuda and triton against torch.optim.SGD(fused=True) on CUDA, fp32, 100 steps (LEGW lr: torch's LambdaLR from
    1.0, so its LR is the schedule's double, as ours before its fp32 rounding).

    Not asserted bitwise: torch's fused kernel and ours compute the same fp32 formula, but each compiler (nvcc for
    torch's and the cuda backend's, LLVM for Triton) decides which a*b + c it contracts into one fma, and torch's
    kernel reads the LR as a float from a double argument where ours derives it in the kernel; so one step may put
    one ulp between them. Asserted: after step t the params and buffers are within t ulps of their magnitude (the
    difference a step adds is one rounding, never growing beyond that), and the count of bitwise-equal steps is
    printed for bench/NOTES.md."""
    require_gpu_backend(backend)
    g = torch.Generator(device="cuda").manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(s, generator=g, device="cuda")) for s in SIZES]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    sched = LEGW(0.1, 32, 256, 0.25, 25, 4, decay="poly", power=2.0, end_lr=0.001)
    ours = SGD(a, lr=sched if lr_kind == "legw" else 0.05, backend=backend, **cfg)
    theirs = torch.optim.SGD(b, lr=1.0 if lr_kind == "legw" else 0.05, fused=True, **cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(theirs, sched.lr) if lr_kind == "legw" else None
    eps = torch.finfo(torch.float32).eps
    bitwise_steps = 0
    for t in range(1, 101):
        for p, q in zip(a, b):
            p.grad = torch.randn(p.shape, generator=g, device="cuda") * 0.5
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
        if scheduler is not None:
            scheduler.step()
        same = True
        for i, (p, q) in enumerate(zip(a, b)):
            pairs = [(p.detach(), q.detach(), "param")]
            if cfg["momentum"] != 0.0:
                pairs.append((ours.state[p]["momentum_buffer"], theirs.state[q]["momentum_buffer"], "buffer"))
            for x, y, what in pairs:
                same = same and torch.equal(x, y)
                scale = max(1.0, y.abs().max().item()) if y.numel() else 1.0
                torch.testing.assert_close(x, y, rtol=0, atol=t * eps * scale,
                                           msg=lambda m, i=i, what=what: f"step {t}, {what} {i}: {m}")
        bitwise_steps += same
    print(f"{backend} {lr_kind} {cfg}: bitwise equal to torch fused SGD after {bitwise_steps} of 100 steps")
