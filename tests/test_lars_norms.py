"""LARS norm plumbing: the |p_{t+1}|^2 cache (the update sums the squares of what it stores, the next step's norm
pass reads only g) and the per-tensor sum_squares op, against the reference backend and the formula."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import legw_fused
from _helpers import TOL, assert_close, assert_close_to_reference, require_backend
from legw_fused import LARS, LEGW, backends

CACHING = ["cpp", "triton"]
CFG = dict(momentum=0.9, weight_decay=5e-4, trust_clip=True, trust_coefficient=0.02)
SCHED = LEGW(0.5, 32, 256, 0.125, 4, 3)


def sizes_for(backend):
    # Several cache chunks per tensor where the backend's chunk allows it here (Triton interprets: small sizes).
    chunk = backends.STEP_BACKENDS[backend].param_sq_chunk or 65536
    return [(0,), (1,), (7,), (chunk + 3,), (2 * chunk + 5,), (3, 5)] if backend != "triton" else \
        [(0,), (1,), (7,), (chunk + 3,), (3, 5)]


def make_set(sizes, dtype=torch.float32, seed=0, copies=3):
    g = torch.Generator().manual_seed(seed)
    first = [torch.randn(s, generator=g).to(dtype) for s in sizes]
    return [[torch.nn.Parameter(t.clone()) for t in first] for _ in range(copies)]


def set_grads(param_sets, gen):
    for i, p in enumerate(param_sets[0]):
        g = (torch.randn(p.shape, generator=gen) * 0.5).to(p.dtype)
        for params in param_sets:
            params[i].grad = g.clone()


def chunk_sums(params, chunk, masters=None):
    """The cache as it must be: per chunk of each tensor, the float64 sum of squares of the stored values."""
    out = []
    for t in (masters or params):
        flat = t.detach().reshape(-1).double()
        out += [flat[b:b + chunk].square().sum() for b in range(0, flat.numel(), chunk)]
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)


def cache_of(opt):
    (entry,) = opt._param_sq_cache.values()
    return entry


@pytest.mark.parametrize("backend", ["cpp", "triton", "torch"])
def test_cached_equals_uncached_and_reference_over_steps(backend):
    require_backend(backend)
    cached_p, uncached_p, ref_p = make_set(sizes_for(backend))
    cached = LARS(cached_p, lr=SCHED, backend=backend, **CFG)
    uncached = LARS(uncached_p, lr=SCHED, backend=backend, cache_norms=False, **CFG)
    ref = LARS(ref_p, lr=SCHED, backend="torch", cache_norms=False, **CFG)
    gen = torch.Generator().manual_seed(1)
    chunk = backends.STEP_BACKENDS[backend].param_sq_chunk
    for t in range(12):
        set_grads([cached_p, uncached_p, ref_p], gen)
        for opt in (cached, uncached, ref):
            opt.step()
        for a, b, c in zip(cached_p, uncached_p, ref_p):
            assert_close_to_reference(a.detach(), c.detach(), torch.float32, msg=lambda m: f"step {t} cached: {m}")
            assert_close_to_reference(b.detach(), c.detach(), torch.float32, msg=lambda m: f"step {t}: {m}")
        if chunk is None:
            assert not cached._param_sq_cache  # the reference keeps no cache
            continue
        entry = cache_of(cached)
        # After every step the cache holds the chunk sums of the params just written, and is valid for them.
        assert_close(entry["param_sq"].double(), chunk_sums(cached_p, chunk), "chunk_sums")
        assert entry["versions"] == [p._version for p in cached_p]
    assert not uncached._param_sq_cache


@pytest.mark.parametrize("backend", CACHING)
def test_cached_step_reads_only_the_grads_for_norms(backend, monkeypatch):
    """The cache is used: a stale-on-purpose cache entry (doubled) changes the step exactly as doubled |p|^2
    would; so the step read the cache and not the params."""
    require_backend(backend)
    a, b = make_set(sizes_for(backend), copies=2)
    opt_a = LARS(a, lr=0.1, backend=backend, momentum=0.0, weight_decay=0.0, trust_coefficient=0.02)
    gen = torch.Generator().manual_seed(2)
    set_grads([a, b], gen)
    opt_a.step()
    with torch.no_grad():
        for p, q in zip(a, b):
            q.copy_(p)
    cache_of(opt_a)["param_sq"].mul_(4.0)  # |p| seen by the next step: 2x
    set_grads([a, b], gen)
    grads = [p.grad.clone() for p in a]
    before = [p.detach().clone() for p in a]
    opt_a.step()
    for p, p0, g in zip(a, before, grads):
        if p.numel() == 0:
            continue
        # plain LARS, no momentum or wd: p1 = p0 - lr * tc * |2 p0| / |g| * g
        r = 0.02 * 2 * p0.double().norm() / g.double().norm()
        assert_close(p.detach().double(), p0.double() - 0.1 * r * g.double(), "lars_formula")


@pytest.mark.parametrize("edit", ["mul_", "copy_", "add_one_tensor", "set_data"])
@pytest.mark.parametrize("backend", ["cpp", "triton", "torch"])
def test_in_place_parameter_edit_invalidates_the_cache(backend, edit):
    require_backend(backend)
    ours_p, ref_p = make_set(sizes_for(backend), copies=2)
    ours = LARS(ours_p, lr=SCHED, backend=backend, **CFG)
    ref = LARS(ref_p, lr=SCHED, backend="torch", cache_norms=False, **CFG)
    gen = torch.Generator().manual_seed(3)
    replacement = [torch.randn(p.shape, generator=gen) * 3 for p in ours_p]
    for t in range(6):
        if t == 3:
            with torch.no_grad():  # the same edit on both sides, between steps
                for i, (p, q) in enumerate(zip(ours_p, ref_p)):
                    if edit == "mul_":
                        p.mul_(2.0)
                        q.mul_(2.0)
                    elif edit == "copy_":
                        p.copy_(replacement[i])
                        q.copy_(replacement[i])
                    elif edit == "set_data":  # new storage, same version counter (vector_to_parameters does this)
                        p.data = replacement[i].clone()
                        q.data = replacement[i].clone()
                    elif i == 3:  # one tensor only: the bucket's cache must still go
                        p.add_(1.0)
                        q.add_(1.0)
        set_grads([ours_p, ref_p], gen)
        ours.step()
        ref.step()
        for a, c in zip(ours_p, ref_p):
            assert_close_to_reference(a.detach(), c.detach(), torch.float32, msg=lambda m: f"step {t}: {m}")


@pytest.mark.parametrize("backend", CACHING)
def test_cache_stays_right_when_steps_bump_no_version_or_views_share_one(backend):
    """The cache records each param's version after an update as the one before + 1 (the op bumps each once),
    checked on the first param only. Oracle: the uncached reference, through the cases where that count is not
    what the update did: steps dispatched below ADInplaceOrView (no bumps) followed by an edit, which a cache
    recorded one too far would miss, and params that are views of one base (each update bumps their shared counter
    once per view)."""
    require_backend(backend)
    sizes = sizes_for(backend)
    ours_p, ref_p = make_set(sizes, copies=2)
    base = torch.randn(sum(math.prod(s) for s in sizes), generator=torch.Generator().manual_seed(5))
    views, ref_views, start = [], [], 0
    for s in sizes:  # views of one base: one version counter; twins made by hand for the reference
        n = math.prod(s)
        views.append(base[start:start + n].view(s).requires_grad_())
        ref_views.append(torch.nn.Parameter(base[start:start + n].view(s).clone()))
        start += n
    assert views[0]._version == views[-1]._version
    ours = [LARS(ours_p, lr=SCHED, backend=backend, **CFG), LARS(views, lr=SCHED, backend=backend, **CFG)]
    refs = [LARS(ref_p, lr=SCHED, backend="torch", cache_norms=False, **CFG),
            LARS(ref_views, lr=SCHED, backend="torch", cache_norms=False, **CFG)]
    gen = torch.Generator().manual_seed(6)
    for t in range(6):
        for opt, ref, a, c in zip(ours, refs, (ours_p, views), (ref_p, ref_views)):
            set_grads([a, c], gen)
            if t in (2, 3):
                with torch._C._AutoDispatchBelowADInplaceOrView():
                    opt.step()
            else:
                opt.step()
            ref.step()
            if t in (1, 3):  # an edit right after a step (at t = 3: after one that bumped nothing)
                with torch.no_grad():
                    for p, q in zip(a, c):
                        p.mul_(1.5)
                        q.mul_(1.5)
            for x, y in zip(a, c):
                assert_close_to_reference(x.detach(), y.detach(), torch.float32, msg=lambda m: f"step {t}: {m}")


@pytest.mark.parametrize("backend", CACHING)
def test_stale_cache_would_be_wrong(backend):
    """Guard for the test above: the edits change the LARS step, so an unnoticed edit could not pass it."""
    require_backend(backend)
    a, b = make_set(sizes_for(backend), copies=2)
    opt_a = LARS(a, lr=0.1, backend=backend, **CFG)
    opt_b = LARS(b, lr=0.1, backend=backend, **CFG)
    gen = torch.Generator().manual_seed(4)
    set_grads([a, b], gen)
    opt_a.step()
    opt_b.step()
    with torch.no_grad():
        for p, q in zip(a, b):
            p.mul_(2.0)
            q.mul_(2.0)
    opt_b._param_sq_cache[next(iter(opt_b._param_sq_cache))]["versions"] = [p._version for p in b]  # pretend: not seen
    set_grads([a, b], gen)
    opt_a.step()
    opt_b.step()
    assert any(not torch.allclose(p, q, **TOL["clearly_different"]) for p, q in zip(a, b) if p.numel() > 1)


@pytest.mark.parametrize("backend", CACHING)
def test_cached_run_is_bitwise_repeatable(backend):
    require_backend(backend)
    results = []
    for _ in range(2):
        (params,) = make_set(sizes_for(backend), copies=1)
        opt = LARS(params, lr=SCHED, backend=backend, **CFG)
        gen = torch.Generator().manual_seed(5)
        for _ in range(6):
            set_grads([params], gen)
            opt.step()
        results.append([p.detach().clone() for p in params] + [cache_of(opt)["param_sq"].clone()])
    for x, y in zip(*results):
        assert torch.equal(x, y)


@pytest.mark.parametrize("skip_first", [True, False], ids=["skip-first-step", "skip-later-step"])
@pytest.mark.parametrize("backend", CACHING)
def test_grad_scaler_skip_keeps_the_cache_right(backend, skip_first):
    """A skipped step leaves params untouched, so the cache must describe them afterwards, also when the skipped
    step was the first one (the cache was being made): the steps that follow equal the reference's."""
    require_backend(backend)
    ours_p, ref_p = make_set(sizes_for(backend), copies=2)
    ours = LARS(ours_p, lr=SCHED, backend=backend, **CFG)
    ref = LARS(ref_p, lr=SCHED, backend="torch", cache_norms=False, **CFG)
    gen = torch.Generator().manual_seed(6)
    skip_at = 0 if skip_first else 2
    for t in range(5):
        set_grads([ours_p, ref_p], gen)
        if t == skip_at:
            before = [p.detach().clone() for p in ours_p]
            ours.grad_scale, ours.found_inf = torch.tensor(1.0), torch.tensor(1.0)  # as GradScaler.step sets them
            ours.step()
            del ours.grad_scale, ours.found_inf
            for p, p0 in zip(ours_p, before):
                assert torch.equal(p.detach(), p0)
            entry = cache_of(ours)
            assert entry["versions"] == [p._version for p in ours_p]
            chunk = backends.STEP_BACKENDS[backend].param_sq_chunk
            assert_close(entry["param_sq"].double(), chunk_sums(ours_p, chunk), "chunk_sums")
            continue
        ours.step()
        ref.step()
        for a, c in zip(ours_p, ref_p):
            assert_close_to_reference(a.detach(), c.detach(), torch.float32, msg=lambda m: f"step {t}: {m}")


@pytest.mark.parametrize("backend", CACHING)
def test_master_weights_cache_the_norm_of_the_master(backend):
    require_backend(backend)
    (low,) = make_set(sizes_for(backend), dtype=torch.bfloat16, copies=1)
    full = [torch.nn.Parameter(p.detach().float()) for p in low]
    ours = LARS(low, lr=SCHED, backend=backend, master_weights=True, **CFG)
    ref = LARS(full, lr=SCHED, backend="torch", cache_norms=False, **CFG)
    gen = torch.Generator().manual_seed(7)
    for t in range(6):
        for p, q in zip(low, full):
            g = (torch.randn(p.shape, generator=gen) * 0.5).bfloat16()
            p.grad, q.grad = g, g.float()
        ours.step()
        ref.step()
    masters = [ours.state[p]["master_param"] for p in low]
    chunk = backends.STEP_BACKENDS[backend].param_sq_chunk
    assert_close(cache_of(ours)["param_sq"].double(), chunk_sums(low, chunk, masters), "chunk_sums")
    for m, q in zip(masters, full):
        assert_close_to_reference(m, q.detach(), torch.float32)
    with torch.no_grad():  # an edit of the master (not of the bf16 param) also invalidates
        masters[3].mul_(2.0)
        full[3].mul_(2.0)
    for p, q in zip(low, full):
        g = (torch.randn(p.shape, generator=gen) * 0.5).bfloat16()
        p.grad, q.grad = g, g.float()
    ours.step()
    ref.step()
    for m, q in zip(masters, full):
        assert_close_to_reference(m, q.detach(), torch.float32)


@pytest.mark.parametrize("backend", CACHING)
def test_load_state_dict_drops_the_cache(backend):
    require_backend(backend)
    (params,) = make_set(sizes_for(backend), copies=1)
    opt = LARS(params, lr=0.1, backend=backend, **CFG)
    set_grads([params], torch.Generator().manual_seed(8))
    opt.step()
    assert opt._param_sq_cache
    opt.load_state_dict(opt.state_dict())
    assert not opt._param_sq_cache


@pytest.mark.parametrize("backend", ["cpp", "triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sum_squares_matches_the_formula(backend, dtype):
    require_backend(backend)
    b = backends.STEP_BACKENDS[backend]
    (params,) = make_set(sizes_for(backend), dtype=dtype, copies=1)
    gen = torch.Generator().manual_seed(9)
    set_grads([params], gen)
    grads = [p.grad for p in params]
    scale = torch.tensor(8.0)
    got = b.sum_squares(params, grads, [], None, scale)
    expected = torch.stack([torch.stack([p.detach().double().square().sum() for p in params]),
                            torch.stack([(g.double() / 8.0).square().sum() for g in grads])])
    assert_close(got.double(), expected, "sum_squares")
    masters = [p.detach().float() * 3 for p in params]
    got = b.sum_squares(params, grads, masters if dtype != torch.float32 else [], None, None)
    want_p = [m.double().square().sum() for m in masters] if dtype != torch.float32 else \
        [p.detach().double().square().sum() for p in params]
    assert_close(got[0].double(), torch.stack(want_p), "sum_squares")
    if b.param_sq_chunk is not None:  # p sums from the cache: the chunk sums are added per tensor, params unread
        partials = chunk_sums(params, b.param_sq_chunk).float() * 4
        got = b.sum_squares(params, grads, [], partials, None)
        assert_close(got[0].double(), expected[0] * 4, "sum_squares")


@pytest.mark.parametrize("backend", CACHING)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_given_norms_replace_the_norm_pass(backend, dtype):
    # Sharded LARS hands the kernels all-reduced sums of squares. Scaled ones (not this rank's own norms) must give
    # the reference's update with the same sums: trust ratios from them, nothing from a norm pass of the kernel.
    require_backend(backend)
    sizes = sizes_for(backend)
    fused, ref = make_set(sizes, dtype=dtype, copies=2)
    set_grads([fused, ref], torch.Generator().manual_seed(4))
    own = backends.STEP_BACKENDS["torch"].sum_squares(ref, [p.grad for p in ref], [], None, None)
    norms = (own * torch.tensor([[4.0], [0.25]])).float().contiguous()
    hp = dict(lr=SCHED, step=torch.tensor(5), momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=False,
              lars=True, trust_coefficient=0.02, eps=1e-8, trust_clip=False, norms_sq=norms)
    with torch.no_grad():
        bufs = backends.STEP_BACKENDS[backend].step_(fused, [p.grad for p in fused], [None] * len(fused), **hp)
        ref_bufs = backends.STEP_BACKENDS["torch"].step_(ref, [p.grad for p in ref], [None] * len(ref), **hp)
        fresh = [p.detach().clone() for p in make_set(sizes, dtype, copies=1)[0]]
        own_bufs = backends.STEP_BACKENDS["torch"].step_(fresh, [p.grad for p in ref], [None] * len(ref),
                                                         **{**hp, "norms_sq": None})
    for p, q, b, rb in zip(fused, ref, bufs, ref_bufs):
        assert_close_to_reference(p.detach(), q.detach(), dtype)
        assert_close_to_reference(b, rb, dtype)
    # The scaled sums change the update (so the check above could fail if they were ignored).
    assert any(not torch.equal(b, ob) for b, ob in zip(ref_bufs, own_bufs) if b.numel() > 1)


def test_triton_chunk_is_the_one_backends_states():
    require_backend("triton")
    from legw_fused.kernels import fused_step as triton_step

    assert backends.STEP_BACKENDS["triton"].param_sq_chunk == triton_step.PARAM_SQ_CHUNK


@pytest.mark.parametrize("backend", CACHING)
def test_bad_norm_arguments_raise_naming_them(backend):
    require_backend(backend)
    op = torch.ops.legw_fused.fused_step_ if backend == "cpp" else \
        __import__("legw_fused.kernels.fused_step", fromlist=["fused_step_"]).fused_step_
    error = RuntimeError if backend == "cpp" else ValueError
    params = [torch.randn(7), torch.randn(3)]
    grads = [torch.randn(7), torch.randn(3)]
    # fused_step_'s arguments up to found_inf (csrc/legw_fused.cpp); norms_sq, param_sq, param_sq_cached follow.
    args = [params, grads, [], [], torch.tensor(0), None, None, 0.1, 0.0, 0.0, 0.0, False, False, False, True, 0.02,
            1e-8, False, float("inf"), None, None]
    before = [p.clone() for p in params]
    with pytest.raises(error, match=r"norms_sq must be a contiguous float32 tensor of shape \[2, 2\]"):
        op(*args, torch.ones(2, 3), None, False)
    with pytest.raises(error, match="param_sq must be a contiguous 1-D float32 tensor of 2 elements"):
        op(*args, None, torch.zeros(5), False)
    with pytest.raises(error, match="param_sq_cached needs param_sq"):
        op(*args, None, None, True)
    for p, p0 in zip(params, before):
        assert torch.equal(p, p0)
    assert math.isfinite(float(params[0][0]))
    legw_fused.LARS([torch.nn.Parameter(torch.ones(2))], lr=0.1)  # defaults still construct
    with pytest.raises(TypeError, match="cache_norms must be a bool"):
        legw_fused.LARS([torch.nn.Parameter(torch.ones(2))], lr=0.1, cache_norms="yes")


def test_cuda_norm_kernels_were_compiled_when_forced():
    """CI builds with LEGW_FUSED_FORCE_CUDA_BUILD=1: both ops then have linked and registered CUDA kernels."""
    import os

    from legw_fused import ops

    if os.environ.get("LEGW_FUSED_FORCE_CUDA_BUILD") != "1":
        pytest.skip("LEGW_FUSED_FORCE_CUDA_BUILD is not set: this build may legitimately be CPU-only")
    for op in ("fused_step_", "sum_squares"):
        assert ops.has_kernel(op, "CUDA") and ops.has_kernel(op, "CPU"), op
    assert legw_fused.backend_info()["extension"]["ops"]["sum_squares"] == ["CPU", "CUDA"]


@pytest.mark.parametrize("backend", CACHING)
def test_params_joining_late_split_the_call_and_keep_the_cache_right(backend):
    """A param whose gradient starts later starts its momentum while the others continue theirs: the step is two
    kernel calls on slices of the cache, which must come back whole."""
    require_backend(backend)
    ours_p, ref_p = make_set(sizes_for(backend), copies=2)
    ours = LARS(ours_p, lr=SCHED, backend=backend, **CFG)
    ref = LARS(ref_p, lr=SCHED, backend="torch", cache_norms=False, **CFG)
    gen = torch.Generator().manual_seed(10)
    for t in range(5):
        set_grads([ours_p, ref_p], gen)
        if t < 2:
            for params in (ours_p, ref_p):
                params[1].grad = params[4].grad = None
        ours.step()
        ref.step()
        for a, c in zip(ours_p, ref_p):
            assert_close_to_reference(a.detach(), c.detach(), torch.float32, msg=lambda m: f"step {t}: {m}")
        entry = cache_of(ours)
        live = [p for p in ours_p if p.grad is not None]
        chunk = backends.STEP_BACKENDS[backend].param_sq_chunk
        assert_close(entry["param_sq"].double(), chunk_sums(live, chunk), "chunk_sums")


def _round_f32(x: Fraction) -> float:
    """x rounded once to the nearest float32 (ties to even), exactly."""
    c = np.float32(float(x))
    best = min((np.nextafter(c, np.float32(-np.inf)), c, np.nextafter(c, np.float32(np.inf))),
               key=lambda v: (abs(Fraction(float(v)) - x), int(np.frombuffer(v.tobytes(), np.uint32)[0]) & 1))
    return float(best)


def test_cpp_trust_ratio_denominator_is_one_fma():
    """|g| + wd·|p| is one correctly rounded fma in the C++ ratio, as in the CUDA and Triton ones (written out as
    fmaf / tl.fma there, where the compilers would contract it anyway): the backends' ratios agree to the bit.
    Read through the update: p = 0, g = 1, lr = 1, no momentum, given norms, so p' = -r exactly."""
    require_backend("cpp")
    rng = np.random.default_rng(0)
    f32 = np.float32
    cases = []
    while len(cases) < 8:  # norms with exact squares (12 significant bits) where one rounding and two differ
        P, G = (f32(int(rng.integers(1 << 11, 1 << 12)) * 2.0 ** int(rng.integers(-8, 0))) for _ in range(2))
        wd = f32(rng.uniform(1e-4, 1e-2))
        fused = _round_f32(Fraction(float(wd)) * Fraction(float(P)) + Fraction(float(G)))
        if fused != float(f32(wd * P) + G):
            cases.append((P, G, wd, fused))
    tc, eps = f32(0.02), f32(1e-8)
    for P, G, wd, fused_den in cases:
        expected = f32(tc * P) / (f32(fused_den) + eps)  # numpy float32: each op rounded once
        p = torch.zeros(1)
        with torch.no_grad():
            backends.STEP_BACKENDS["cpp"].step_(
                [p], [torch.ones(1)], [None], lr=1.0, step=torch.tensor(0), momentum=0.0, dampening=0.0,
                weight_decay=float(wd), nesterov=False, lars=True, trust_coefficient=float(tc), eps=float(eps),
                trust_clip=False, norms_sq=torch.tensor([[float(P) ** 2], [float(G) ** 2]], dtype=torch.float32))
        assert -p.item() == float(expected), (P, G, wd)
