"""Functional LSTM: ``lstm_cell`` and ``lstm``, with torch's semantics, on a selectable backend.

Shapes: T time steps, B batch, I input size, H hidden size, G = 4H gate rows in PyTorch's order i, f, g, o
(the maths: legw_fused/ops/lstm_reference.py). One layer in one direction is the unit every backend implements.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .backends import LSTM_BACKENDS, LSTM_CELL_BACKENDS, check_backend_name, select

__all__ = ["lstm_cell", "lstm"]


def _check_same(name: str, t: Tensor | None, ref: Tensor) -> None:
    if t is not None and (t.device != ref.device or t.dtype != ref.dtype):
        raise ValueError(f"{name} must be on {ref.device} with dtype {ref.dtype} like the input, got "
                         f"{t.device} / {t.dtype}")


def _autocast_cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    # autocast's rule for its lower-precision ops: floating tensors but float64.
    return t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t


def _run(unit: str, backend: str, x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor,
         b_ih: Tensor | None, b_hh: Tensor | None, *extra):
    """The chosen backend's ``unit`` ("layer" or "cell") on these tensors, after autocast and the same-device/dtype
    checks."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # As torch.nn.LSTM under autocast (cuDNN's LSTM is on its lower-precision list): input, states and weights
        # in the autocast dtype, then the layer with autocast off — inside, it would turn some GEMMs' outputs to
        # that dtype and not others, and the kernels would meet mixed dtypes.
        dtype = torch.get_autocast_dtype(device_type)
        args = [_autocast_cast(t, dtype) for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh)]
        with torch.autocast(device_type, enabled=False):
            return _run(unit, backend, *args, *extra)
    for name, t in (("h0", h0), ("c0", c0), ("weight_ih", w_ih), ("weight_hh", w_hh), ("bias_ih", b_ih),
                    ("bias_hh", b_hh)):
        _check_same(name, t, x)
    # Whether a backward can follow: auto may choose differently for evaluation and inference.
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh))
    chosen = select(LSTM_CELL_BACKENDS if unit == "cell" else LSTM_BACKENDS, backend, x.device, x.dtype,
                    grad=grad)
    return getattr(chosen, unit)(x, h0, c0, w_ih, w_hh, b_ih, b_hh, *extra)


def _layer(backend: str, x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
           b_hh: Tensor | None, reverse: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _run("layer", backend, x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse)


def lstm_cell(input: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
              b_hh: Tensor | None = None, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """One LSTM step, as ``torch.nn.LSTMCell``: input [B, I] (or [I]), h/c [B, H] (or [H]) -> (h', c')."""
    check_backend_name(backend, LSTM_BACKENDS)
    if input.dim() not in (1, 2):
        raise ValueError(f"lstm_cell: input must be 1-D or 2-D, got {input.dim()}-D")
    if h.dim() != input.dim() or c.dim() != input.dim():
        raise ValueError(f"lstm_cell: h and c must have the input's number of dimensions ({input.dim()}), "
                         f"got {h.dim()} and {c.dim()}")
    batched = input.dim() == 2
    x, h0, c0 = (input, h, c) if batched else (input[None], h[None], c[None])
    H = w_hh.shape[1]
    if x.shape[1] != w_ih.shape[1]:
        raise RuntimeError(f"input has inconsistent input_size: got {x.shape[1]} expected {w_ih.shape[1]}")
    for name, t in (("h", h0), ("c", c0)):
        if tuple(t.shape) != (x.shape[0], H):
            raise RuntimeError(f"{name} must have shape {(x.shape[0], H)} (batch, hidden_size), "
                               f"got {tuple(t.shape)}")
    h1, c1 = _run("cell", backend, x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    return (h1, c1) if batched else (h1[0], c1[0])


def lstm(input: Tensor, hx: tuple[Tensor, Tensor], params: list[Tensor], has_biases: bool = True,
         num_layers: int = 1, dropout: float = 0.0, train: bool = False, bidirectional: bool = False,
         batch_first: bool = False, *, backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """A multi-layer LSTM with ``torch._VF.lstm``'s arguments: returns (output, h_n, c_n).

    input [T, B, I] ([B, T, I] if batch_first); hx = (h_0, c_0), each [L·D, B, H] with D = 2 if bidirectional;
    params in ``nn.LSTM._flat_weights`` order: for each layer, for each direction, w_ih, w_hh[, b_ih, b_hh].
    output [T, B, D·H]. Dropout (probability ``dropout`` when ``train``) acts on every layer's output but the last.
    """
    check_backend_name(backend, LSTM_BACKENDS)
    if input.dim() != 3:
        raise ValueError(f"lstm: input must be 3-D (batched), got {input.dim()}-D")
    if input.shape[1 if batch_first else 0] == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
    D = 2 if bidirectional else 1
    per = 4 if has_biases else 2
    if len(params) != num_layers * D * per:
        raise ValueError(f"lstm: expected {num_layers * D * per} weight tensors for {num_layers} layer(s), "
                         f"{D} direction(s), has_biases={has_biases} (projections, proj_size > 0, are not "
                         f"supported); got {len(params)}")
    h0, c0 = hx
    x = input.transpose(0, 1) if batch_first else input
    state_shape = (num_layers * D, x.shape[1], params[1].shape[1])  # [L·D, B, H]; params[1] is weight_hh_l0
    for name, t in (("hx[0] (h_0)", h0), ("hx[1] (c_0)", c0)):
        if tuple(t.shape) != state_shape:
            raise RuntimeError(f"lstm: {name} must have shape {state_shape} (num_layers * num_directions, batch, "
                               f"hidden_size), got {tuple(t.shape)}")
    h_n, c_n = [], []
    for layer in range(num_layers):
        outs = []
        for d in range(D):
            k = layer * D + d
            w = params[k * per:(k + 1) * per]
            b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
            out, h, c = _layer(backend, x, h0[k], c0[k], w[0], w[1], b_ih, b_hh, d == 1)
            outs.append(out)
            h_n.append(h)
            c_n.append(c)
        x = outs[0] if D == 1 else torch.cat(outs, dim=2)
        if dropout > 0 and train and layer < num_layers - 1:
            x = F.dropout(x, dropout, training=True)
    output = x.transpose(0, 1) if batch_first else x
    return output, torch.stack(h_n), torch.stack(c_n)
