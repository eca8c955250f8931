"""Triton fused SGD/LARS step over lists of tensors: the "triton" backend.

Legend: N tensors in one call, C chunks (PARAM_SQ_CHUNK consecutive elements of one tensor; one program each).

One call = one update launch (SGD), or three for LARS: per-chunk sums of squares -> per-tensor trust ratios (chunk
partials summed in chunk order: bitwise repeatable) -> update. With the |p|^2 cache (param_sq) the update
also stores each chunk's sum of squares of the values it writes, and the next call's first launch reads only g;
with given norms (norms_sq, e.g. all-reduced over ranks) the update computes the ratios itself: one launch. The LR
is evaluated inside the kernels from the device step count and the packed LEGW schedule (or read from a device
tensor), so a step never reads back to the host. The same math as csrc/fused_step.h and
legw_fused/ops/fused_step_reference.py.

Tensor lists travel as int64 tables of data pointers, built once per distinct set of tensors and cached: the
steady state (same parameters, same gradient buffers) launches with no host-to-device copy, which also keeps the
launches capturable in a CUDA graph after one warm-up step. On CPU tensors the kernels run under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import contextlib
import itertools
import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Elements per program (enough work per program, few programs for a 25M-parameter model) and per loop iteration.
# The interpreter pays per operation, not per element: larger blocks, still several chunks and iterations per tensor.
# The chunk is also the layout of the |p|^2 cache (param_sq); legw_fused.ops.fused_step.TRITON_PARAM_SQ_CHUNK states
# the same rule.
PARAM_SQ_CHUNK, BLOCK = (16384, 4096) if INTERPRETED else (65536, 1024)
TRUST_RATIO_BLOCK = 128  # chunk partials per iteration of the ratio kernel

_TL_TYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
LR_FLOAT, LR_TENSOR, LR_SCHEDULE = 0, 1, 2
# Positions in the packed LEGW schedule (legw_fused.schedule.PACKED_SLOTS, then the milestone steps; a test checks).
SLOT_DECAY, SLOT_PEAK_LR, SLOT_END_LR, SLOT_WARMUP_STEPS, SLOT_TOTAL_STEPS, SLOT_STEPS_PER_EPOCH, SLOT_POWER, \
    SLOT_GAMMA, SLOT_NUM_MILESTONES, SLOT_MILESTONES = (tl.constexpr(i) for i in range(10))
# Bytes of one 128-bit global access: the update kernels' vector width when every tensor of a call is aligned to it.
VECTOR_BYTES = tl.constexpr(16)
# Flags that change between the first and the second step (first_step; param_sq_cached, and with_p = not cached) are
# run-time integers that Triton must not specialise on (it would on a value of 1: do_not_specialize), so that a CUDA
# graph captured after one warm-up step replays the compiled variants the warm-up ran.


@triton.jit
def _bf16_rne(x):
    # fp32 -> bf16 rounding to nearest even, NaN kept. GPUs do this natively; Triton's interpreter (3.8) truncates
    # instead, so the kernels spell it out and the code tested on CPU is the code that runs on the GPU.
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _cast(x, DTYPE: tl.constexpr):
    if DTYPE == tl.bfloat16:
        y = _bf16_rne(x)
    else:
        y = x.to(DTYPE)
    return y


@triton.jit
def _pow(x, y):
    # x ** y for x >= 0 in fp64 (0 ** y = 0 for y > 0, as the schedule needs at its end).
    return tl.where(x > 0, tl.exp2(y * tl.log2(tl.maximum(x, 1e-300))), tl.where(y == 0, 1.0, 0.0))


@triton.jit
def _legw_lr(step, sched_ptr, sched_len):
    """LEGW.lr(step) from the packed schedule (layout: legw_fused.schedule.PACKED_SLOTS), in fp64."""
    t = step.to(tl.float64)
    decay = tl.load(sched_ptr + SLOT_DECAY)
    peak = tl.load(sched_ptr + SLOT_PEAK_LR)
    end = tl.load(sched_ptr + SLOT_END_LR)
    W = tl.load(sched_ptr + SLOT_WARMUP_STEPS)
    T = tl.load(sched_ptr + SLOT_TOTAL_STEPS)
    steps_per_epoch = tl.load(sched_ptr + SLOT_STEPS_PER_EPOCH)
    power = tl.load(sched_ptr + SLOT_POWER)
    gamma = tl.load(sched_ptr + SLOT_GAMMA)
    s = tl.where(T > W, tl.minimum((t - W) / tl.maximum(T - W, 1.0), 1.0), 1.0)
    since = tl.maximum(t - W, 0.0)
    # Milestones are read up to the tensor's end, whatever the header claims.
    n_milestones = tl.minimum(tl.load(sched_ptr + SLOT_NUM_MILESTONES).to(tl.int32), sched_len - SLOT_MILESTONES)
    passed = t * 0.0
    for i in range(0, n_milestones):
        passed += tl.where(t >= tl.load(sched_ptr + SLOT_MILESTONES + i), 1.0, 0.0)
    after = tl.where(decay == 0, end + (peak - end) * _pow(1.0 - s, power),
                     tl.where(decay == 1, end + (peak - end) * (1.0 + tl.cos(3.141592653589793 * s)) / 2.0,
                              tl.where(decay == 2, peak * _pow(gamma, since / steps_per_epoch),
                                       tl.where(decay == 3, peak * _pow(gamma, passed), peak))))
    return tl.where(t < W, peak * (t + 1.0) / tl.maximum(W, 1.0), after)


@triton.jit
def _lr(step_ptr, sched_ptr, sched_len, lr_ptr, lr_value, LR_MODE: tl.constexpr):
    if LR_MODE == 2:
        lr = _legw_lr(tl.load(step_ptr), sched_ptr, sched_len).to(tl.float32)
    elif LR_MODE == 1:
        lr = tl.load(lr_ptr).to(tl.float32)
    else:
        lr = lr_value
    return lr


@triton.jit
def _inv_scale(scale_ptr, HAS_SCALE: tl.constexpr):
    if HAS_SCALE:
        inv = (1.0 / tl.load(scale_ptr).to(tl.float64)).to(tl.float32)  # GradScaler.unscale_'s reciprocal
    else:
        inv = 1.0
    return inv


@triton.jit
def _chunk(c, chunk_tensor, chunk_start, numels, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Program c's chunk: its tensor t, first element, end, and the end of its full blocks (the loop without masks;
    the masked tail block follows)."""
    t = tl.load(chunk_tensor + c)
    start = tl.multiple_of(tl.load(chunk_start + c), CHUNK)  # chunks start at multiples of CHUNK
    end = tl.minimum(start + CHUNK, tl.load(numels + t))
    return t, start, end, start + (end - start) // BLOCK * BLOCK


@triton.jit
def _base(ptrs, t, TYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Tensor t's data pointer from a pointer table; ALIGNED: the launcher saw every pointer 16-byte aligned, which
    lets the compiler use 128-bit accesses."""
    base = tl.load(ptrs + t).to(tl.pointer_type(TYPE))
    if ALIGNED:
        base = tl.multiple_of(base, VECTOR_BYTES)  # on the pointer: the compiler drops it on the integer
    return base


@triton.jit
def _splat(x, offs):
    """Scalar x as a block like offs: masks made from run-time scalars are blocks (the interpreters of triton 3.8
    and 3.9 mishandle scalar masks; compiled, a splat keeps the 128-bit accesses)."""
    return tl.zeros_like(offs) + x


@triton.jit(do_not_specialize=["with_p"])
def _sum_squares_kernel(p_ptrs, g_ptrs, m_ptrs, numels, chunk_tensor, chunk_start, partials, scale_ptr, with_p,
                        P_TYPE: tl.constexpr, MASTER: tl.constexpr, HAS_SCALE: tl.constexpr, ALIGNED: tl.constexpr,
                        BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """partials[c] = (sum p^2, sum g^2) over chunk c (g unscaled; p the fp32 master where there is one; p is not
    read unless ``with_p``: its sums come from the cache; a run-time value: see do_not_specialize)."""
    c = tl.program_id(0)
    t, start, end, full_end = _chunk(c, chunk_tensor, chunk_start, numels, CHUNK, BLOCK)
    inv = _inv_scale(scale_ptr, HAS_SCALE)
    g_base = _base(g_ptrs, t, P_TYPE, ALIGNED)
    if MASTER:
        p_base = _base(m_ptrs, t, tl.float32, ALIGNED)
    else:
        p_base = _base(p_ptrs, t, P_TYPE, ALIGNED)
    acc_p = tl.zeros([BLOCK], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(start, full_end, BLOCK):  # full blocks, unmasked
        offs = i + tl.arange(0, BLOCK)
        if ALIGNED:
            offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
        p = tl.load(p_base + offs, mask=_splat(with_p, offs) != 0, other=0.0).to(tl.float32)
        g = tl.load(g_base + offs).to(tl.float32) * inv
        acc_p += p * p
        acc_g += g * g
    if full_end < end:  # the masked tail
        offs = full_end + tl.arange(0, BLOCK)
        mask = offs < end
        p = tl.load(p_base + offs, mask=mask & (_splat(with_p, offs) != 0), other=0.0).to(tl.float32)
        g = tl.load(g_base + offs, mask=mask, other=0.0).to(tl.float32) * inv
        acc_p += p * p
        acc_g += g * g
    tl.store(partials + 2 * c, tl.sum(acc_p, axis=0))
    tl.store(partials + 2 * c + 1, tl.sum(acc_g, axis=0))


@triton.jit
def _ratio(p_sq, g_sq, lr, trust_coefficient, weight_decay, eps, max_ratio, CLIP: tl.constexpr):
    """LARS trust ratio from the sums of squares (csrc/fused_step.h's trust_ratio), with correctly rounded square
    roots and divisions as C++ and CUDA have them (Triton's sqrt and fp32 '/' are approximate on the GPU)."""
    p_norm = tl.sqrt_rn(p_sq)
    g_norm = tl.sqrt_rn(g_sq)
    # wd*|p| + |g| as one fma, as csrc/fused_step.h writes it explicitly (the compilers' contraction differs).
    ratio = tl.minimum(tl.div_rn(trust_coefficient * p_norm, tl.fma(weight_decay, p_norm, g_norm) + eps), max_ratio)
    if CLIP:
        ratio = tl.where(lr > 0, tl.minimum(tl.div_rn(ratio, tl.where(lr > 0, lr, 1.0)), 1.0), 1.0)
    # Typed: the interpreter promotes where(scalar fp32, 1.0) to fp64 (compiled Triton keeps fp32), and an fp64 ratio
    # would make the update fp64, which the bf16 rounding cannot take.
    return tl.where((p_norm > 0) & (g_norm > 0), ratio, 1.0).to(tl.float32)


@triton.jit(do_not_specialize=["cached"])
def _trust_ratio_kernel(partials, p_cached, first_chunk, out, n_tensors, step_ptr, sched_ptr, sched_len, lr_ptr,
                        lr_value, trust_coefficient, weight_decay, eps, max_ratio, cached, LR_MODE: tl.constexpr,
                        CLIP: tl.constexpr, BLOCK_C: tl.constexpr, SUMS: tl.constexpr):
    """Tensor t's chunk partials added in chunk order (no atomics: repeatable) -> out[t] = its trust ratio, or with
    SUMS out[t], out[N + t] = its sums of squares. ``cached``: the p partials come from the |p|^2 cache."""
    t = tl.program_id(0)
    c0 = tl.load(first_chunk + t)
    c1 = tl.load(first_chunk + t + 1)
    acc_p = tl.zeros([BLOCK_C], dtype=tl.float64)
    acc_g = tl.zeros([BLOCK_C], dtype=tl.float64)
    for c in range(c0, c1, BLOCK_C):
        idx = c + tl.arange(0, BLOCK_C)
        mask = idx < c1
        from_cache = tl.load(p_cached + idx, mask=mask & (_splat(cached, idx) != 0), other=0.0)
        from_pass = tl.load(partials + 2 * idx, mask=mask & (_splat(cached, idx) == 0), other=0.0)
        acc_p += (from_cache + from_pass).to(tl.float64)  # one of the two is 0
        acc_g += tl.load(partials + 2 * idx + 1, mask=mask, other=0.0).to(tl.float64)
    p_sq = tl.sum(acc_p, axis=0).to(tl.float32)
    g_sq = tl.sum(acc_g, axis=0).to(tl.float32)
    if SUMS:
        tl.store(out + t, p_sq)
        tl.store(out + n_tensors + t, g_sq)
    else:
        lr = _lr(step_ptr, sched_ptr, sched_len, lr_ptr, lr_value, LR_MODE)
        tl.store(out + t, _ratio(p_sq, g_sq, lr, trust_coefficient, weight_decay, eps, max_ratio, CLIP))


@triton.jit
def _update_block(p_base, g_base, b_base, m_base, offs, mask, found, first, lr, inv, r, momentum, dampening,
                  weight_decay, P_TYPE: tl.constexpr, B_TYPE: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                  NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, MASTER: tl.constexpr):
    """One block of the update (``mask`` None: a full block; ``found`` != 0: GradScaler found inf/NaN, nothing is
    written): returns the values kept in fp32, as stored (the master where there is one)."""
    other = 0.0
    write = _splat(found, offs) == 0
    read_buf = _splat(first, offs) == 0  # step 1: buf = d, the buffer may be uninitialised
    if mask is None:
        other = None  # loads without a mask
    else:
        write = write & mask
        read_buf = read_buf & mask
    g = tl.load(g_base + offs, mask=mask, other=other).to(tl.float32) * inv
    if MAXIMIZE:
        g = -g
    if MASTER:
        p = tl.load(m_base + offs, mask=mask, other=other)
    else:
        p = tl.load(p_base + offs, mask=mask, other=other).to(tl.float32)
    p_old = p
    d = (g + weight_decay * p) * r
    if HAS_MOMENTUM:
        prev = tl.load(b_base + offs, mask=read_buf, other=0.0).to(tl.float32)
        buf = tl.where(first != 0, d, prev * momentum + (1.0 - dampening) * d)
        tl.store(b_base + offs, _cast(buf, B_TYPE), mask=write)
        if NESTEROV:
            d = d + momentum * buf
        else:
            d = buf
    p = p - lr * d
    p_stored = _cast(p, P_TYPE)
    if MASTER:
        tl.store(m_base + offs, p, mask=write)
        kept = tl.where(write, p, p_old)
    else:
        kept = tl.where(write, p_stored.to(tl.float32), p_old)
    tl.store(p_base + offs, p_stored, mask=write)
    return kept


@triton.jit(do_not_specialize=["first"])
def _fused_step_kernel(p_ptrs, g_ptrs, b_ptrs, m_ptrs, numels, chunk_tensor, chunk_start, ratios, norms, n_tensors,
                       param_sq, step_ptr, sched_ptr, sched_len, lr_ptr, lr_value, momentum, dampening, weight_decay,
                       trust_coefficient, eps, max_ratio, scale_ptr, found_ptr, first, LR_MODE: tl.constexpr,
                       P_TYPE: tl.constexpr, B_TYPE: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                       NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, MASTER: tl.constexpr, LARS: tl.constexpr,
                       NORMS: tl.constexpr, CLIP: tl.constexpr, P_SQ: tl.constexpr, HAS_SCALE: tl.constexpr,
                       HAS_INF: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """One chunk of the update: d = r*(g + wd*p) (g negated with MAXIMIZE); momentum (``first``: the buffer starts
    at d; a run-time value: see do_not_specialize); p -= lr*d (see csrc/fused_step.h). r from `ratios`, or with NORMS
    from the given sums of squares. P_SQ: param_sq[c] = sum of squares of the values stored (of the unchanged values
    when found_inf skips the step, so that the |p|^2 cache stays right)."""
    c = tl.program_id(0)
    t, start, end, full_end = _chunk(c, chunk_tensor, chunk_start, numels, CHUNK, BLOCK)
    found = 0.0
    if HAS_INF:
        found = tl.load(found_ptr)
    lr = _lr(step_ptr, sched_ptr, sched_len, lr_ptr, lr_value, LR_MODE)
    inv = _inv_scale(scale_ptr, HAS_SCALE)
    r = 1.0
    if LARS:
        if NORMS:
            r = _ratio(tl.load(norms + t), tl.load(norms + n_tensors + t), lr, trust_coefficient, weight_decay, eps,
                       max_ratio, CLIP)
        else:
            r = tl.load(ratios + t)
    p_base = _base(p_ptrs, t, P_TYPE, ALIGNED)
    g_base = _base(g_ptrs, t, P_TYPE, ALIGNED)
    b_base = _base(b_ptrs, t, B_TYPE, ALIGNED)
    m_base = _base(m_ptrs, t, tl.float32, ALIGNED)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(start, full_end, BLOCK):  # full blocks, unmasked
        offs = i + tl.arange(0, BLOCK)
        if ALIGNED:
            offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
        kept = _update_block(p_base, g_base, b_base, m_base, offs, None, found, first, lr, inv, r, momentum,
                             dampening, weight_decay, P_TYPE, B_TYPE, HAS_MOMENTUM, NESTEROV, MAXIMIZE, MASTER)
        if P_SQ:
            acc += kept * kept
    if full_end < end:  # the masked tail
        offs = full_end + tl.arange(0, BLOCK)
        mask = offs < end
        kept = _update_block(p_base, g_base, b_base, m_base, offs, mask, found, first, lr, inv, r, momentum,
                             dampening, weight_decay, P_TYPE, B_TYPE, HAS_MOMENTUM, NESTEROV, MAXIMIZE, MASTER)
        if P_SQ:
            acc += tl.where(mask, kept * kept, 0.0)
    if P_SQ:
        tl.store(param_sq + c, tl.sum(acc, axis=0))


class _Tables:
    """Pointer tables and the chunk map of one list of tensors, on their device."""

    def __init__(self, lists, device, chunk):
        params = lists[0]
        numels = [p.numel() for p in params]
        counts = [-(-n // chunk) for n in numels]
        self.n_chunks = sum(counts)
        ptrs = [[t.data_ptr() if t is not None else 0 for t in lst] for lst in lists]
        # Every tensor 16-byte aligned: the kernels may use 128-bit accesses (chunk starts are multiples of 16 B too).
        self.aligned = all(ptr % VECTOR_BYTES.value == 0 for lst in ptrs for ptr in lst)
        # A float32 stand-in for an absent optional float32 tensor: the same pointer type whether or not the tensor
        # is given, so that its absence does not pick another compiled variant.
        self.no_f32 = torch.zeros(1, dtype=torch.float32, device=device)
        host = {"ptrs": torch.tensor(ptrs, dtype=torch.int64).reshape(len(lists), -1),
                "numels": torch.tensor(numels, dtype=torch.int64),
                "chunk_tensor": torch.tensor([i for i, k in enumerate(counts) for _ in range(k)], dtype=torch.int32),
                "chunk_start": torch.tensor([j * chunk for k in counts for j in range(k)], dtype=torch.int64),
                "first_chunk": torch.tensor(list(itertools.accumulate(counts, initial=0)), dtype=torch.int32)}
        pin = device.type == "cuda"
        for name, value in host.items():
            setattr(self, name, value.pin_memory().to(device, non_blocking=True) if pin else value)


# Tables by the addresses and sizes of the tensors they describe, least recently used first. Tables used while a
# CUDA graph is captured are kept for good: the graph's launches read them on every replay.
_TABLE_CACHE: dict[tuple, _Tables] = {}
_KEPT_FOR_GRAPHS: set[tuple] = set()
_TABLE_CACHE_SIZE = 256


def _tables(lists, device, chunk) -> _Tables:
    key = (device, chunk) + tuple((t.data_ptr(), t.numel()) if t is not None else (0, 0) for lst in lists
                                  for t in lst)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    tables = _TABLE_CACHE.pop(key, None)
    if tables is None:
        if capturing:
            raise RuntimeError("fused_step_ (triton): these tensors were not seen before the CUDA graph capture; "
                               "run one optimizer step (warm-up) with the same parameters and gradient tensors "
                               "before capturing")
        evictable = [k for k in _TABLE_CACHE if k not in _KEPT_FOR_GRAPHS]
        if len(_TABLE_CACHE) >= _TABLE_CACHE_SIZE and evictable:
            del _TABLE_CACHE[evictable[0]]
        tables = _Tables(lists, device, chunk)
    _TABLE_CACHE[key] = tables  # most recently used last
    if capturing:
        _KEPT_FOR_GRAPHS.add(key)
    return tables


def _check_norm_args(n, n_chunks, device, norms_sq, param_sq, cached, op="fused_step_"):
    if norms_sq is not None and (norms_sq.dtype != torch.float32 or tuple(norms_sq.shape) != (2, n)
                                 or norms_sq.device != device or not norms_sq.is_contiguous()):
        raise ValueError(f"{op} (triton): norms_sq must be a contiguous float32 tensor of shape [2, {n}] on "
                         f"{device}, got {norms_sq.dtype} {tuple(norms_sq.shape)} on {norms_sq.device}")
    if cached and param_sq is None:
        raise ValueError(f"{op} (triton): param_sq_cached needs param_sq")
    if param_sq is not None and (param_sq.dtype != torch.float32 or param_sq.dim() != 1
                                 or param_sq.numel() != n_chunks or param_sq.device != device
                                 or not param_sq.is_contiguous()):
        raise ValueError(f"{op} (triton): param_sq must be a contiguous 1-D float32 tensor of {n_chunks} "
                         f"elements (one per chunk) on {device}, got {param_sq.dtype} {tuple(param_sq.shape)} on "
                         f"{param_sq.device}")


def _check_lists(params, grads, master_params, op):
    n = len(params)
    dtype, device = params[0].dtype, params[0].device
    if dtype not in _TL_TYPES:
        raise ValueError(f"{op} (triton): params must be float32, bfloat16 or float16, got {dtype}")
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.dtype != dtype or g.dtype != dtype or p.device != device or g.device != device \
                or g.numel() != p.numel() or not (p.is_contiguous() and g.is_contiguous()):
            raise ValueError(f"{op} (triton): param/grad {i} must be contiguous {dtype} on {device} "
                             f"with {p.numel()} elements")
    if len(grads) != n or len(master_params) not in (0, n):
        raise ValueError(f"{op} (triton): list lengths differ: {n} params, {len(grads)} grads, "
                         f"{len(master_params)} masters")
    return dtype, device


def fused_step_(params, grads, momentum_buffers, master_params, step, schedule, lr_tensor, lr, momentum, dampening,
                weight_decay, nesterov, maximize, first_step, lars, trust_coefficient, eps, trust_clip,
                max_trust_ratio, grad_scale, found_inf, norms_sq=None, param_sq=None, param_sq_cached=False,
                advance_step=False, *, chunk: int = PARAM_SQ_CHUNK, block: int = BLOCK) -> None:
    """The triton implementation of legw_fused::fused_step_ (same arguments and semantics, csrc/legw_fused.cpp;
    its |p|^2 cache has one entry per ``chunk`` elements)."""
    n = len(params)
    if n == 0:
        _advance(step, found_inf, advance_step)
        return
    if len(grads) != n or len(momentum_buffers) not in (0, n) or len(master_params) not in (0, n):
        raise ValueError(f"fused_step_ (triton): list lengths differ: {n} params, {len(grads)} grads, "
                         f"{len(momentum_buffers)} buffers, {len(master_params)} masters")
    if (momentum != 0) != bool(momentum_buffers):
        raise ValueError("fused_step_ (triton): momentum_buffers must hold one per param iff momentum != 0")
    dtype, device = _check_lists(params, grads, master_params, "fused_step_")
    master = bool(master_params)
    if master and dtype == torch.float32:
        raise ValueError("fused_step_ (triton): master weights are for bf16/fp16 params")
    buf_dtype = torch.float32 if master else dtype
    for name, lst, want in (("momentum buffer", momentum_buffers, buf_dtype), ("master param", master_params,
                                                                              torch.float32)):
        for i, (x, p) in enumerate(zip(lst, params)):
            if x.dtype != want or x.device != device or x.numel() != p.numel() or not x.is_contiguous():
                raise ValueError(f"fused_step_ (triton): {name} {i} must be a contiguous {want} tensor of "
                                 f"{p.numel()} elements on {device}")
    for name, x in (("schedule", schedule), ("lr_tensor", lr_tensor), ("grad_scale", grad_scale),
                    ("found_inf", found_inf)):
        if x is not None and x.device != device:
            raise ValueError(f"fused_step_ (triton): {name} is on {x.device}, the params on {device}")
    _check_norm_args(n, sum(-(-p.numel() // chunk) for p in params), device, norms_sq, param_sq,
                     param_sq_cached)
    bufs = list(momentum_buffers) or [None] * n
    masters = list(master_params) or [None] * n
    # Triton launches on the current device: make it the params' one.
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _launch(params, grads, bufs, masters, device, step, schedule, lr_tensor, lr, momentum, dampening,
                weight_decay, nesterov, maximize, first_step, lars, trust_coefficient, eps, trust_clip,
                max_trust_ratio, grad_scale, found_inf, master, dtype, chunk, block, norms_sq, param_sq,
                param_sq_cached)
    _advance(step, found_inf, advance_step)


def _advance(step, found_inf, advance_step) -> None:
    """fused_step_'s advance_step, after the launches that read the count, on their stream (no host sync)."""
    if advance_step:
        step.add_(1 if found_inf is None else (found_inf == 0).to(torch.int64))


def sum_squares(params, grads, master_params, param_sq, grad_scale, *, chunk: int = PARAM_SQ_CHUNK,
                block: int = BLOCK) -> torch.Tensor:
    """The triton implementation of legw_fused::sum_squares (csrc/legw_fused.cpp): float32 [2, N]."""
    n = len(params)
    if n == 0:
        return torch.zeros(2, 0, dtype=torch.float32)
    dtype, device = _check_lists(params, grads, master_params, "sum_squares")
    master_params = list(master_params or [])
    _check_norm_args(n, sum(-(-p.numel() // chunk) for p in params), device, None, param_sq, False,
                     op="sum_squares")
    out = torch.zeros(2, n, dtype=torch.float32, device=device)
    masters = master_params or [None] * n
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        tables = _tables([params, grads, [None] * n, masters], device, chunk)
        if tables.n_chunks == 0:
            return out
        cached = param_sq is not None
        partials = torch.empty(2 * tables.n_chunks, dtype=torch.float32, device=device)
        scale = grad_scale if grad_scale is not None else tables.no_f32
        _sum_squares_kernel[(tables.n_chunks,)](tables.ptrs[0], tables.ptrs[1], tables.ptrs[3], tables.numels,
                                                tables.chunk_tensor, tables.chunk_start, partials, scale,
                                                int(not cached), P_TYPE=_TL_TYPES[dtype], MASTER=bool(master_params),
                                                HAS_SCALE=grad_scale is not None, ALIGNED=tables.aligned,
                                                BLOCK=block, CHUNK=chunk)
        dummy = tables.numels
        _trust_ratio_kernel[(n,)](partials, param_sq if cached else tables.no_f32, tables.first_chunk, out, n,
                                  dummy, dummy, 0, dummy, 0.0, 0.0, 0.0, 0.0, float("inf"), int(cached),
                                  LR_MODE=LR_FLOAT, CLIP=False, BLOCK_C=TRUST_RATIO_BLOCK, SUMS=True)
    return out


def _launch(params, grads, bufs, masters, device, step, schedule, lr_tensor, lr, momentum, dampening, weight_decay,
            nesterov, maximize, first_step, lars, trust_coefficient, eps, trust_clip, max_trust_ratio, grad_scale,
            found_inf, master, dtype, chunk, block, norms_sq, param_sq, param_sq_cached) -> None:
    n = len(params)
    tables = _tables([params, grads, bufs, masters], device, chunk)
    if tables.n_chunks == 0:
        return
    lr_mode = LR_SCHEDULE if schedule is not None else LR_TENSOR if lr_tensor is not None else LR_FLOAT
    # Stand-ins for absent optional tensors (never read); those present in some steps and not in others are float32
    # like the tensor.
    dummy = tables.numels
    sched = schedule if schedule is not None else dummy
    lr_args = (step, sched, sched.numel(), lr_tensor if lr_tensor is not None else dummy, float(lr))
    scale = grad_scale if grad_scale is not None else tables.no_f32
    ratios = tables.no_f32
    has_param_sq = param_sq is not None
    param_sq = param_sq if has_param_sq else tables.no_f32
    ptrs = tables.ptrs
    p_type = _TL_TYPES[dtype]
    b_type = tl.float32 if master else p_type
    cached = bool(param_sq_cached)
    if lars and norms_sq is None:
        ratios = torch.ones(n, dtype=torch.float32, device=device)
        partials = torch.empty(2 * tables.n_chunks, dtype=torch.float32, device=device)
        _sum_squares_kernel[(tables.n_chunks,)](ptrs[0], ptrs[1], ptrs[3], tables.numels, tables.chunk_tensor,
                                                tables.chunk_start, partials, scale, int(not cached), P_TYPE=p_type,
                                                MASTER=master, HAS_SCALE=grad_scale is not None,
                                                ALIGNED=tables.aligned, BLOCK=block, CHUNK=chunk)
        _trust_ratio_kernel[(n,)](partials, param_sq, tables.first_chunk, ratios, n, *lr_args,
                                  float(trust_coefficient), float(weight_decay), float(eps), float(max_trust_ratio),
                                  int(cached), LR_MODE=lr_mode, CLIP=bool(trust_clip), BLOCK_C=TRUST_RATIO_BLOCK,
                                  SUMS=False)
    _fused_step_kernel[(tables.n_chunks,)](
        ptrs[0], ptrs[1], ptrs[2], ptrs[3], tables.numels, tables.chunk_tensor, tables.chunk_start, ratios,
        norms_sq if norms_sq is not None else tables.no_f32, n, param_sq, *lr_args, float(momentum),
        float(dampening), float(weight_decay), float(trust_coefficient), float(eps), float(max_trust_ratio), scale,
        found_inf if found_inf is not None else tables.no_f32, int(first_step), LR_MODE=lr_mode, P_TYPE=p_type,
        B_TYPE=b_type, HAS_MOMENTUM=momentum != 0, NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize),
        MASTER=master, LARS=bool(lars), NORMS=norms_sq is not None, CLIP=bool(trust_clip),
        P_SQ=has_param_sq, HAS_SCALE=grad_scale is not None, HAS_INF=found_inf is not None,
        ALIGNED=tables.aligned, BLOCK=block, CHUNK=chunk)
