"""The |p|^2 cache written by an update is, chunk by chunk, bit for bit the sum of squares a fresh norm pass takes of
the same stored values: a LARS run that restarts from a state_dict (fresh norms) continues exactly as one that never
stopped (cached norms)."""

import pytest
import torch

from _helpers import require_backend
from legw_fused import LARS, backends

CHUNK = backends.STEP_BACKENDS["cpp"].param_sq_chunk
# Several chunks per tensor, partial last chunks, lengths that are not multiples of the 16 accumulator lanes, odd
# offsets of the chunk views (for CUDA's aligned and unaligned walks).
SIZES = [(0,), (1,), (7,), (1000,), (CHUNK + 3,), (2 * CHUNK + 21,), (33, 17)]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
# For the resumed run: many multi-chunk tensors, so that a norm rounded differently changes some trust ratio.
RESUME_SIZES = SIZES + [(CHUNK * k // 3 + 17 * k,) for k in range(2, 14)]
LARS_HP = dict(momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=False, lars=True, trust_coefficient=0.02,
               eps=1e-8, trust_clip=False)


def backend_for(device):
    return require_backend("cpp" if device == "cpu" else "cuda")


def random_bucket(dtype, masters, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    full = [torch.randn(s, generator=g) for s in SIZES]
    params = [t.to(device=device, dtype=dtype) for t in full]
    grads = [(torch.randn(s, generator=g) * 0.5).to(device=device, dtype=dtype) for s in SIZES]
    return params, grads, [t.to(device) for t in full] if masters else None


def chunk_views(tensors):
    return [t.reshape(-1)[b:b + CHUNK] for t in tensors for b in range(0, t.numel(), CHUNK)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,masters", [(torch.float32, False), (torch.bfloat16, False), (torch.float16, False),
                                           (torch.bfloat16, True), (torch.float16, True)],
                         ids=["fp32", "bf16", "fp16", "bf16-master", "fp16-master"])
def test_update_cache_equals_fresh_chunk_sums(device, dtype, masters):
    backend = backends.STEP_BACKENDS[backend_for(device)]
    params, grads, ms = random_bucket(dtype, masters, device)
    n_chunks = sum(-(-p.numel() // CHUNK) for p in params)
    param_sq = torch.full((n_chunks,), float("nan"), device=device)
    step = torch.zeros((), dtype=torch.int64, device=device)
    backend.step_(params, grads, [None] * len(params), lr=0.1, step=step, masters=ms, param_sq=param_sq, **LARS_HP)
    stored = ms if masters else params
    views = chunk_views(stored)
    assert len(views) == n_chunks
    for k, (view, g) in enumerate(zip(views, chunk_views(grads))):
        fresh = backend.sum_squares([chunk_views(params)[k]], [g], [view] if masters else [], None, None)[0, 0]
        assert torch.equal(param_sq[k], fresh), f"chunk {k} ({view.numel()} elements): {param_sq[k]} vs {fresh}"
    # and per tensor: the sums over the cache and over fresh chunk sums are the same numbers
    ones = [torch.ones_like(g) for g in grads]
    cached = backend.sum_squares(params, ones, ms or [], param_sq, None)[0]
    fresh = backend.sum_squares(params, ones, ms or [], None, None)[0]
    assert torch.equal(cached, fresh)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,master_weights", [(torch.float32, False), (torch.bfloat16, False),
                                                  (torch.bfloat16, True)], ids=["fp32", "bf16", "bf16-master"])
def test_lars_resumed_from_state_dict_equals_uninterrupted(device, dtype, master_weights):
    backend = backend_for(device)
    g = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in RESUME_SIZES]
    grads = [[(torch.randn(s, generator=g) * 0.5).to(device=device, dtype=dtype) for s in RESUME_SIZES]
             for _ in range(3)]
    hp = dict(lr=0.5, momentum=0.9, weight_decay=5e-4, trust_coefficient=0.02, backend=backend,
              master_weights=master_weights)

    def run(params, opt, steps):
        for t in steps:
            for p, gr in zip(params, grads[t]):
                p.grad = gr.clone()
            opt.step()

    whole = [torch.nn.Parameter(t.clone()) for t in init]
    opt = LARS(whole, **hp)
    run(whole, opt, range(3))
    assert opt._param_sq_cache, "the uninterrupted run must use the |p|^2 cache"

    first = [torch.nn.Parameter(t.clone()) for t in init]
    opt_a = LARS(first, **hp)
    run(first, opt_a, range(1))
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt_b = LARS(resumed, **hp)
    opt_b.load_state_dict(opt_a.state_dict())
    run(resumed, opt_b, range(1, 3))
    for i, (a, b) in enumerate(zip(whole, resumed)):
        assert torch.equal(a.detach(), b.detach()), f"param {i} {tuple(a.shape)} differs after resuming"
