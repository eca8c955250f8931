"""The LSTM reference: one layer in one direction in plain torch ops, differentiated by autograd. At once the
"torch" LSTM backend, the oracle every fused LSTM backend is tested against, and a benchmark baseline.

Shapes (letters used throughout the LSTM code): T time steps, B batch, I input size, H hidden size, G = 4H gate
rows in PyTorch's order i, f, g, o. ``weight_ih [G, I]``, ``weight_hh [G, H]``, ``bias_ih``, ``bias_hh [G]``.

One layer in one direction is the unit every backend implements (``layer``); ``cell`` is one step of it (what
``LSTMCell`` runs, x [B, I], h/c [B, H])::

    X = x @ weight_ih^T + bias_ih + bias_hh          all T steps in one GEMM   [T, B, G]
    for each step t (reversed for the backward direction):
        a = X[t] + h @ weight_hh^T                    the recurrent GEMM        [B, G]
        i, f, g, o = sigmoid(a_i), sigmoid(a_f), tanh(a_g), sigmoid(a_o)
        c = f * c + i * g;  h = o * tanh(c)

Low-precision inputs (bf16/fp16) keep the GEMMs in their dtype (fp32 accumulation) and do the gate and cell-state
arithmetic in fp32; the cell state is carried between steps in fp32 and returned in the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cell", "layer"]


def layer(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
          b_hh: Tensor | None, reverse: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer in one direction, in plain torch ops (autograd differentiates it).

    x [T, B, I], h0/c0 [B, H] -> out [T, B, H], h_n [B, H], c_n [B, H]. The readable definition every fused
    backend is tested against.
    """
    bias = None
    if b_ih is not None:
        bias = b_ih + b_hh if b_hh is not None else b_ih
    elif b_hh is not None:
        bias = b_hh
    xw = F.linear(x, w_ih, bias)  # [T, B, G]: the input projection of every step at once
    acc = torch.promote_types(x.dtype, torch.float32)  # fp32 gate/cell math for bf16/fp16; float64 stays float64
    h, c = h0, c0.to(acc)
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    out: list[Tensor | None] = [None] * x.shape[0]
    for t in steps:
        a = (xw[t] + F.linear(h, w_hh)).to(acc)
        i, f, g, o = a.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = (torch.sigmoid(o) * torch.tanh(c)).to(x.dtype)
        out[t] = h
    return torch.stack(out), h, c.to(x.dtype)


def cell(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
         b_hh: Tensor | None) -> tuple[Tensor, Tensor]:
    """One LSTM step: ``layer`` over one time step, x [B, I], h/c [B, H] -> (h', c')."""
    _, h1, c1 = layer(x[None], h, c, w_ih, w_hh, b_ih, b_hh)
    return h1, c1
