"""Triton LSTM layer kernels: the "triton" LSTM backend (legw_fused/ops/lstm_reference.py has the maths).

Legend: T steps, B batch, H hidden, G = 4H gate columns (i, f, g, o), BB batch rows per program, BH a power of two
>= H (a whole hidden state per program), BK/BN tiles of the per-step kernel.

Two forward strategies, the same backward structure:
- **persistent** (small H, see use_persistent): one launch runs the whole sequence. Each program owns BB batch rows —
  rows never interact, so no grid-wide synchronisation is needed — loads the four [H, H] gate blocks of W_hh once,
  keeps h and c on chip across steps and per step does four tl.dot's plus the pointwise epilogue. At small batch
  the per-step launch latency is what bounds an LSTM (REFERENCES.md), and this removes it. Its backward twin runs
  the reverse time loop the same way (dh = dA·W_hh from the on-chip weights).
- **per step** (larger H): one launch per step; program (batch tile, hidden tile) computes its slice of all four
  gates with a K-loop over h, then the epilogue. Backward: a pointwise kernel per step and dh = dA·W_hh in torch.
Both share what torch does best: the input projection of all steps and the weight gradients (dW_ih = dAᵀ·x,
dW_hh = dAᵀ·h_prev, db = Σ dA) are single large GEMMs.

Saved for backward: the activated gates [T, B, G] (written over the input projection) and the cell states
[T, B, H] in fp32.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from .fused_step import _cast

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# The persistent kernels keep the four gate blocks of W_hh on chip (4·BH² elements, in registers and shared memory),
# so they fit only at small H. The strategy is chosen before launching, from what the compiled kernels need:
# PERSISTENT_MAX_BH is the largest BH at which a persistent kernel compiles without spilling and within the block's
# shared memory, per (compute capability major, direction, dtype), as tests/test_triton_aot.py compiles them for
# sm_80 and sm_90 (and checks this table); on a GPU whose per-block shared memory is below the budget its major was
# checked against, or of another major, the per-step kernels run. Register allocation differs between triton
# versions: the table holds for 3.6 (the GPU machine's) and 3.8 (CI's). At BH 64 the bf16/fp16 backward spills with
# 3.6, not with 3.8; the fp32 backward at BH 32 spills 8 bytes on sm_90 with 3.8, not with 3.6.
PERSISTENT_MAX_BH = {
    (8, "fwd", "fp32"): 32, (8, "fwd", "bf16"): 64, (8, "fwd", "fp16"): 64,
    (8, "bwd", "fp32"): 64, (8, "bwd", "bf16"): 32, (8, "bwd", "fp16"): 32,
    (9, "fwd", "fp32"): 32, (9, "fwd", "bf16"): 64, (9, "fwd", "fp16"): 64,
    (9, "bwd", "fp32"): 16, (9, "bwd", "bf16"): 32, (9, "bwd", "fp16"): 32,
}
PERSISTENT_SHARED_BUDGET = {8: 166912, 9: 232448}  # bytes per block (opt-in): A100 163 KB, H100/H200 227 KB
# An upper bound on H for the persistent kernels on every device, also in the interpreter (which has no on-chip
# limits; tests set it to 0 to run the per-step kernels).
PERSISTENT_MAX_H = 128
_INTERPRETED = tl.constexpr(INTERPRETED)
PERSISTENT_BB = 16  # batch rows per persistent program
STEP_TILES = dict(BB=16, BN=32, BK=32)  # the per-step forward kernel's tiles
BWD_STEP_BLOCK = 1024  # elements per program of the per-step backward kernel
_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    # Triton's interpreter (3.8) multiplies bf16 tiles as raw integers: there the operands go through fp32 (exact for
    # bf16 products, fp32 accumulation either way, so the result is what the GPU's bf16 MMA gives).
    if _INTERPRETED and a.dtype == tl.bfloat16:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PREC)
    return out


@triton.jit
def _gate_blocks(ptrs, mask, H):
    # The four [H, H] gate blocks of W_hh (rows g·H .. g·H + H - 1), at the offsets ``ptrs`` gives within a block.
    return (tl.load(ptrs, mask=mask, other=0.0), tl.load(ptrs + H * H, mask=mask, other=0.0),
            tl.load(ptrs + 2 * H * H, mask=mask, other=0.0), tl.load(ptrs + 3 * H * H, mask=mask, other=0.0))


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _fwd_epilogue(ai, af, ag, ao, c_prev):
    i = _sigmoid(ai)
    f = _sigmoid(af)
    g = _tanh(ag)
    o = _sigmoid(ao)
    c = f * c_prev + i * g
    return i, f, g, o, c, o * _tanh(c)


@triton.jit
def _bwd_epilogue(i, f, g, o, c_prev, c, dh, dc):
    tc = _tanh(c)
    dct = dc + dh * o * (1.0 - tc * tc)
    return (dct * g * i * (1.0 - i), dct * c_prev * f * (1.0 - f), dct * i * (1.0 - g * g), dh * tc * o * (1.0 - o),
            dct * f)


@triton.jit
def _persistent_tile(B, H, BB: tl.constexpr, BH: tl.constexpr):
    # A persistent program's BB batch rows and all H hidden columns (BH >= H), with their masks; k indexes the
    # recurrent weights' other H axis. Rows in int64: offsets rows * 4H pass 2^31 once B * 4H does.
    rows = tl.program_id(0).to(tl.int64) * BB + tl.arange(0, BB)
    cols = tl.arange(0, BH)
    m2 = (rows < B)[:, None] & (cols < H)[None, :]
    return rows, cols, tl.arange(0, BH), cols < H, m2


@triton.jit
def _lstm_fwd_persistent(gates_ptr, w_ptr, h0_ptr, c0_ptr, out_ptr, cs_ptr, T, B, H, REVERSE: tl.constexpr,
                         DTYPE: tl.constexpr, PREC: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr):
    rows, cols, k, cmask, m2 = _persistent_tile(B, H, BB, BH)
    # W_g^T [k, j] = W_hh[g·H + j, k]: loaded once for the whole sequence.
    wmask = (k[:, None] < H) & cmask[None, :]
    w_i, w_f, w_g, w_o = _gate_blocks(w_ptr + cols[None, :] * H + k[:, None], wmask, H)
    hc = rows[:, None] * H + cols[None, :]
    h = tl.load(h0_ptr + hc, mask=m2, other=0.0)
    c = tl.load(c0_ptr + hc, mask=m2, other=0.0)
    G = 4 * H
    gc = rows[:, None] * G + cols[None, :]
    # Offsets of step t are formed in int64: T·B·4H can pass 2^31 (e.g. T 1024, B 1024, H 1024).
    for s in range(0, T):
        if REVERSE:
            t = T - 1 - s
        else:
            t = s
        a = gates_ptr + t.to(tl.int64) * B * G + gc
        ai = tl.load(a, mask=m2, other=0.0).to(tl.float32) + _dot(h, w_i, PREC)
        af = tl.load(a + H, mask=m2, other=0.0).to(tl.float32) + _dot(h, w_f, PREC)
        ag = tl.load(a + 2 * H, mask=m2, other=0.0).to(tl.float32) + _dot(h, w_g, PREC)
        ao = tl.load(a + 3 * H, mask=m2, other=0.0).to(tl.float32) + _dot(h, w_o, PREC)
        i, f, g, o, c, h32 = _fwd_epilogue(ai, af, ag, ao, c)
        tl.store(a, _cast(i, DTYPE), mask=m2)
        tl.store(a + H, _cast(f, DTYPE), mask=m2)
        tl.store(a + 2 * H, _cast(g, DTYPE), mask=m2)
        tl.store(a + 3 * H, _cast(o, DTYPE), mask=m2)
        tl.store(cs_ptr + t.to(tl.int64) * B * H + hc, c, mask=m2)
        h = _cast(h32, DTYPE)
        tl.store(out_ptr + t.to(tl.int64) * B * H + hc, h, mask=m2)


@triton.jit
def _lstm_bwd_persistent(gates_ptr, cs_ptr, c0_ptr, dout_ptr, dhn_ptr, dcn_ptr, w_ptr, da_ptr, dh0_ptr, dc0_ptr,
                         T, B, H, REVERSE: tl.constexpr, DTYPE: tl.constexpr, PREC: tl.constexpr, BB: tl.constexpr,
                         BH: tl.constexpr):
    rows, cols, k, cmask, m2 = _persistent_tile(B, H, BB, BH)
    # dh_prev[b, k] = Σ_g Σ_j dA_g[b, j] · W_hh[g·H + j, k]: the blocks W_g [j, k] as stored.
    wmask = (cols[:, None] < H) & (k[None, :] < H)
    w_i, w_f, w_g, w_o = _gate_blocks(w_ptr + cols[:, None] * H + k[None, :], wmask, H)
    hc = rows[:, None] * H + cols[None, :]
    dh = tl.load(dhn_ptr + hc, mask=m2, other=0.0).to(tl.float32)
    dc = tl.load(dcn_ptr + hc, mask=m2, other=0.0).to(tl.float32)
    c_first = tl.load(c0_ptr + hc, mask=m2, other=0.0).to(tl.float32)
    G = 4 * H
    gc = rows[:, None] * G + cols[None, :]
    for s in range(0, T):
        # Processing order reversed: t is the step, t_prev the one processed before it (c0 before the first).
        # The last one processed reads c0: it reads a valid step (clamped) that where() then discards, as a mask
        # combining the block with the loop scalar is rejected by triton 3.9's interpreter.
        if REVERSE:
            t = s
            t_prev = tl.minimum(t + 1, T - 1)
        else:
            t = T - 1 - s
            t_prev = tl.maximum(t - 1, 0)
        c_prev = tl.where(s < T - 1, tl.load(cs_ptr + t_prev.to(tl.int64) * B * H + hc, mask=m2, other=0.0),
                          c_first)
        a = gates_ptr + t.to(tl.int64) * B * G + gc
        i = tl.load(a, mask=m2, other=0.0).to(tl.float32)
        f = tl.load(a + H, mask=m2, other=0.0).to(tl.float32)
        g = tl.load(a + 2 * H, mask=m2, other=0.0).to(tl.float32)
        o = tl.load(a + 3 * H, mask=m2, other=0.0).to(tl.float32)
        c = tl.load(cs_ptr + t.to(tl.int64) * B * H + hc, mask=m2, other=0.0)
        dh += tl.load(dout_ptr + t.to(tl.int64) * B * H + hc, mask=m2, other=0.0).to(tl.float32)
        di, df, dg, do, dc = _bwd_epilogue(i, f, g, o, c_prev, c, dh, dc)
        d = da_ptr + t.to(tl.int64) * B * G + gc
        di = _cast(di, DTYPE)
        df = _cast(df, DTYPE)
        dg = _cast(dg, DTYPE)
        do = _cast(do, DTYPE)
        tl.store(d, di, mask=m2)
        tl.store(d + H, df, mask=m2)
        tl.store(d + 2 * H, dg, mask=m2)
        tl.store(d + 3 * H, do, mask=m2)
        dh = (_dot(di, w_i, PREC) + _dot(df, w_f, PREC)
              + _dot(dg, w_g, PREC) + _dot(do, w_o, PREC))
        # The gradient reaching h_prev, rounded as the GEMM in the parameters' dtype would round it.
        dh = _cast(dh, DTYPE).to(tl.float32)
    tl.store(dh0_ptr + hc, dh, mask=m2)
    tl.store(dc0_ptr + hc, dc, mask=m2)


@triton.jit
def _lstm_fwd_step(a_ptr, w_ptr, h_ptr, cprev_ptr, hout_ptr, c_ptr, B, H, DTYPE: tl.constexpr, PREC: tl.constexpr,
                   BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # Offsets in int64: rows * 4H, and in W_hh [G, H] cols * H and g * H * H, can pass 2^31 (the last at H >= 23171).
    rows = tl.program_id(0).to(tl.int64) * BB + tl.arange(0, BB)
    cols = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
    HH = H.to(tl.int64) * H
    rmask = rows < B
    cmask = cols < H
    m2 = rmask[:, None] & cmask[None, :]
    acc_i = tl.zeros((BB, BN), dtype=tl.float32)
    acc_f = tl.zeros((BB, BN), dtype=tl.float32)
    acc_g = tl.zeros((BB, BN), dtype=tl.float32)
    acc_o = tl.zeros((BB, BN), dtype=tl.float32)
    for k0 in range(0, H, BK):
        k = k0 + tl.arange(0, BK)
        kmask = k < H
        h = tl.load(h_ptr + rows[:, None] * H + k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wt = w_ptr + cols[None, :] * H + k[:, None]  # W_g^T [k, j]
        wmask = kmask[:, None] & cmask[None, :]
        acc_i += _dot(h, tl.load(wt, mask=wmask, other=0.0), PREC)
        acc_f += _dot(h, tl.load(wt + HH, mask=wmask, other=0.0), PREC)
        acc_g += _dot(h, tl.load(wt + 2 * HH, mask=wmask, other=0.0), PREC)
        acc_o += _dot(h, tl.load(wt + 3 * HH, mask=wmask, other=0.0), PREC)
    a = a_ptr + rows[:, None] * 4 * H + cols[None, :]
    hc = rows[:, None] * H + cols[None, :]
    ai = acc_i + tl.load(a, mask=m2, other=0.0).to(tl.float32)
    af = acc_f + tl.load(a + H, mask=m2, other=0.0).to(tl.float32)
    ag = acc_g + tl.load(a + 2 * H, mask=m2, other=0.0).to(tl.float32)
    ao = acc_o + tl.load(a + 3 * H, mask=m2, other=0.0).to(tl.float32)
    i, f, g, o, c, h = _fwd_epilogue(ai, af, ag, ao, tl.load(cprev_ptr + hc, mask=m2, other=0.0))
    tl.store(a, _cast(i, DTYPE), mask=m2)
    tl.store(a + H, _cast(f, DTYPE), mask=m2)
    tl.store(a + 2 * H, _cast(g, DTYPE), mask=m2)
    tl.store(a + 3 * H, _cast(o, DTYPE), mask=m2)
    tl.store(c_ptr + hc, c, mask=m2)
    tl.store(hout_ptr + hc, _cast(h, DTYPE), mask=m2)


@triton.jit
def _lstm_bwd_step(act_ptr, cprev_ptr, c_ptr, dout_ptr, dh_ptr, dc_ptr, da_ptr, n, H, DTYPE: tl.constexpr,
                   BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: b * 4H can pass 2^31
    mask = idx < n
    b = idx // H
    j = idx - b * H
    a = act_ptr + b * 4 * H + j
    i = tl.load(a, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(a + H, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(a + 2 * H, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(a + 3 * H, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + idx, mask=mask, other=0.0).to(tl.float32) + \
        tl.load(dout_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    di, df, dg, do, dc = _bwd_epilogue(i, f, g, o, tl.load(cprev_ptr + idx, mask=mask, other=0.0),
                                       tl.load(c_ptr + idx, mask=mask, other=0.0),
                                       dh, tl.load(dc_ptr + idx, mask=mask, other=0.0))
    d = da_ptr + b * 4 * H + j
    tl.store(d, _cast(di, DTYPE), mask=mask)
    tl.store(d + H, _cast(df, DTYPE), mask=mask)
    tl.store(d + 2 * H, _cast(dg, DTYPE), mask=mask)
    tl.store(d + 3 * H, _cast(do, DTYPE), mask=mask)
    tl.store(dc_ptr + idx, dc, mask=mask)


def _precision(dtype: torch.dtype) -> str:
    # fp32 GEMMs in full fp32 like torch's default (tl.dot would otherwise use TF32 on the GPU).
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_h(H: int) -> int:
    return max(16, triton.next_power_of_2(H))  # tl.dot needs every dimension >= 16


def use_persistent(direction: str, H: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the persistent ``direction`` ("fwd" / "bwd") kernel runs for hidden size H: decided before any
    launch, from PERSISTENT_MAX_BH and the device's per-block shared memory."""
    if H > PERSISTENT_MAX_H:
        return False
    if device.type != "cuda":
        return True  # the interpreter
    major = torch.cuda.get_device_capability(device)[0]
    budget = PERSISTENT_SHARED_BUDGET.get(major)
    if budget is None or torch.cuda.get_device_properties(device).shared_memory_per_block_optin < budget:
        return False
    return _block_h(H) <= PERSISTENT_MAX_BH.get((major, direction, _NAMES[dtype]), 0)


def layer_forward(gates, w_hh, h0, c0, reverse: bool):
    """gates [T,B,G] (the input projection, overwritten with the activated gates), w_hh [G,H], h0 [B,H],
    c0 [B,H] fp32 -> out [T,B,H], cs [T,B,H] fp32."""
    T, B, G = gates.shape
    H = G // 4
    out = gates.new_empty(T, B, H)
    cs = torch.empty(T, B, H, device=gates.device, dtype=torch.float32)
    if B == 0:
        return out, cs
    dtype = _TL[gates.dtype]
    prec = _precision(gates.dtype)
    with torch.cuda.device(gates.device) if gates.is_cuda else contextlib.nullcontext():
        BB = PERSISTENT_BB
        if use_persistent("fwd", H, gates.dtype, gates.device):
            _lstm_fwd_persistent[(triton.cdiv(B, BB),)](gates, w_hh, h0, c0, out, cs, T, B, H, REVERSE=reverse,
                                                        DTYPE=dtype, PREC=prec, BB=BB, BH=_block_h(H))
        else:
            BB, BN, BK = STEP_TILES["BB"], STEP_TILES["BN"], STEP_TILES["BK"]
            h, c = h0, c0
            for s in range(T):
                t = T - 1 - s if reverse else s
                _lstm_fwd_step[(triton.cdiv(B, BB), triton.cdiv(H, BN))](gates[t], w_hh, h, c, out[t], cs[t], B, H,
                                                                         DTYPE=dtype, PREC=prec, BB=BB, BN=BN,
                                                                         BK=BK)
                h, c = out[t], cs[t]
    return out, cs


def layer_backward(gates, cs, c0, dout, dh_n, dc_n, w_hh, reverse: bool):
    """Gradients of the preactivations dA [T,B,G] (param dtype), and dh0, dc0 [B,H] (fp32)."""
    T, B, G = gates.shape
    H = G // 4
    da = torch.empty_like(gates)
    dh = dh_n.float().contiguous()
    dc = dc_n.float().contiguous().clone()
    if B == 0:
        return da, dh, dc
    dtype = _TL[gates.dtype]
    prec = _precision(gates.dtype)
    with torch.cuda.device(gates.device) if gates.is_cuda else contextlib.nullcontext():
        BB = PERSISTENT_BB
        dh0, dc0 = torch.empty_like(dh), torch.empty_like(dc)
        if use_persistent("bwd", H, gates.dtype, gates.device):
            _lstm_bwd_persistent[(triton.cdiv(B, BB),)](gates, cs, c0, dout, dh, dc, w_hh, da, dh0, dc0, T, B, H,
                                                        REVERSE=reverse, DTYPE=dtype, PREC=prec, BB=BB,
                                                        BH=_block_h(H))
            return da, dh0, dc0
        dh = dh.to(gates.dtype)
        BLOCK = BWD_STEP_BLOCK
        for s in range(T - 1, -1, -1):
            t = T - 1 - s if reverse else s
            c_prev = c0 if s == 0 else cs[t + 1 if reverse else t - 1]
            _lstm_bwd_step[(triton.cdiv(B * H, BLOCK),)](gates[t], c_prev, cs[t], dout[t], dh, dc, da[t], B * H, H,
                                                         DTYPE=dtype, BLOCK=BLOCK)
            dh = da[t] @ w_hh
    return da, dh.float(), dc
