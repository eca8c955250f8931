"""The LSTM layer op family: fake (meta) implementations and autograd of the extension's ``lstm_layer_fwd`` /
``lstm_layer_bwd`` (C++ CPU and CUDA, csrc/lstm.cpp), the Triton layer's autograd Function (kernels/lstm.py), and
the layer functions of the fused backends, each with lstm_reference.layer's signature, and their cell functions
(one step, what LSTMCell runs) with lstm_reference.cell's.

Shapes: T steps, B batch, I input, H hidden, G = 4H (see lstm_reference.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import ops as _ops
from . import _C


def _no_double_backward(backend: str) -> None:
    """The fused kernels' gradients are not differentiable themselves. A backward run with create_graph=True (grad
    mode on inside it) would build a graph that misses their part and give wrong second derivatives without a word
    (once_differentiable does not help when the incoming grads need no grad, the usual case): refuse instead."""
    if torch.is_grad_enabled():
        raise NotImplementedError(f"legw_fused LSTM (backend {backend!r}): second derivatives (backward with "
                                  f"create_graph=True) are not implemented; use backend='torch' or torch.nn.LSTM")


if _C is not None:
    @torch.library.register_fake("legw_fused::lstm_layer_fwd")
    def _fwd_fake(x, w_ih, w_hh, b_ih, b_hh, h0, c0, reverse):
        T, B, _ = x.shape
        H = w_hh.shape[1]
        return (x.new_empty(T, B, H), x.new_empty(B, H), x.new_empty(B, H), x.new_empty(T, B, 4 * H),
                # cell states: fp32, or fp64 for float64 runs
                x.new_empty(T, B, H, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32))

    @torch.library.register_fake("legw_fused::lstm_layer_bwd")
    def _bwd_fake(dout, dh_n, dc_n, x, w_ih, w_hh, h0, c0, out, gates, cs, reverse, compute_dx):
        # Contiguous, as the kernel returns them (empty_like would copy the strides of a transposed x under
        # batch_first, and inductor checks strides).
        return (x.new_empty(x.shape) if compute_dx else x.new_empty(0), w_ih.new_empty(w_ih.shape),
                w_hh.new_empty(w_hh.shape), x.new_empty(w_hh.shape[0]), h0.new_empty(h0.shape),
                c0.new_empty(c0.shape))

    @torch.library.register_fake("legw_fused::lstm_layer_infer")
    def _infer_fake(x, w_ih, w_hh, b_ih, b_hh, h0, c0, reverse):
        T, B, _ = x.shape
        H = w_hh.shape[1]
        return x.new_empty(T, B, H), x.new_empty(B, H), x.new_empty(B, H)

    def _setup_context(ctx, inputs, output):
        x, w_ih, w_hh, b_ih, b_hh, h0, c0, reverse = inputs
        out, _, _, gates, cs = output
        ctx.save_for_backward(x, w_ih, w_hh, h0, c0, out, gates, cs)
        ctx.reverse = reverse
        ctx.bias = (b_ih is not None, b_hh is not None)
        ctx.mark_non_differentiable(gates, cs)
        # Gradients that do not exist stay None instead of zero tensors: the saved gates alone are [T, B, 4H].
        ctx.set_materialize_grads(False)

    def _backward(ctx, dout, dh_n, dc_n, _dgates, _dcs):
        _no_double_backward("cpp/cuda")
        x, w_ih, w_hh, h0, c0, out, gates, cs = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        dx, dw_ih, dw_hh, db, dh0, dc0 = torch.ops.legw_fused.lstm_layer_bwd(
            dout, dh_n, dc_n, x, w_ih, w_hh, h0, c0, out, gates, cs, ctx.reverse, need_dx)
        return (dx if need_dx else None, dw_ih, dw_hh, db if ctx.bias[0] else None, db if ctx.bias[1] else None,
                dh0, dc0, None)

    torch.library.register_autograd("legw_fused::lstm_layer_fwd", _backward, setup_context=_setup_context)


def _cpu_half_in_fp32(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in _ops.LSTM_CPU_HALF_IN_FP32


def _widen(*ts: Tensor | None) -> list[Tensor | None]:
    # Through autograd: the gradients come back rounded once to each tensor's own dtype. The saved gates are then
    # fp32, twice the bytes of the per-step path's.
    return [t.float() if t is not None else None for t in ts]


def extension_layer(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
                   b_hh: Tensor | None, reverse: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One layer, one direction, on the extension's C++ CPU or CUDA op (lstm_reference.layer's signature). On the CPU,
    where no gradient will be taken, the inference op: it keeps nothing for a backward; bf16/fp16 in fp32 where
    ops.LSTM_CPU_HALF_IN_FP32 says so."""
    if _cpu_half_in_fp32(x):
        out, h_n, c_n = extension_layer(*_widen(x, h0, c0, w_ih, w_hh, b_ih, b_hh), reverse)
        return out.to(x.dtype), h_n.to(x.dtype), c_n.to(x.dtype)
    if x.device.type == "cpu" and not (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh))):
        return torch.ops.legw_fused.lstm_layer_infer(x, w_ih, w_hh, b_ih, b_hh, h0, c0, reverse)
    out, h_n, c_n, _, _ = torch.ops.legw_fused.lstm_layer_fwd(x, w_ih, w_hh, b_ih, b_hh, h0, c0, reverse)
    return out, h_n, c_n


class _ExtensionCell(torch.autograd.Function):
    """One step of the C++/CUDA layer (T = 1) as a plain autograd Function: an LSTMCell runs once per time step from
    Python, where torch.library's autograd wrapper (argument normalisation, a Python redispatch) cost as much as the
    step's kernels at small sizes (measured: ~60 us per step, nn.LSTMCell 1.1x faster at B 4, H 8)."""

    @staticmethod
    def forward(ctx, x, h, c, w_ih, w_hh, b_ih, b_hh):
        x1 = x[None]  # [1, B, I]
        out, h1, c1, gates, cs = torch.ops.legw_fused.lstm_layer_fwd(x1, w_ih, w_hh, b_ih, b_hh, h, c, False)
        ctx.save_for_backward(x1, w_ih, w_hh, h, c, out, gates, cs)
        ctx.bias = (b_ih is not None, b_hh is not None)
        return h1, c1

    @staticmethod
    def backward(ctx, dh1, dc1):
        _no_double_backward("cpp/cuda")
        x1, w_ih, w_hh, h, c, out, gates, cs = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        dx, dw_ih, dw_hh, db, dh, dc = torch.ops.legw_fused.lstm_layer_bwd(
            None, dh1, dc1, x1, w_ih, w_hh, h, c, out, gates, cs, False, need_dx)
        return (dx[0] if need_dx else None, dh, dc, dw_ih, dw_hh, db if ctx.bias[0] else None,
                db if ctx.bias[1] else None)


def extension_cell(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
                   b_hh: Tensor | None) -> tuple[Tensor, Tensor]:
    """One LSTM step on the extension's C++ CPU or CUDA op: x [B, I], h/c [B, H] -> (h', c') (lstm_reference.cell's
    signature). bf16/fp16 on the CPU in fp32 where ops.LSTM_CPU_HALF_IN_FP32 says so (a step's GEMMs in fp32 cost
    less than in a half dtype without its instructions, even after widening the weights each step)."""
    if _cpu_half_in_fp32(x):
        h1, c1 = _ExtensionCell.apply(*_widen(x, h, c, w_ih, w_hh, b_ih, b_hh))
        return h1.to(x.dtype), c1.to(x.dtype)
    return _ExtensionCell.apply(x, h, c, w_ih, w_hh, b_ih, b_hh)


def _input_projection(x: Tensor, w_ih: Tensor, b_ih: Tensor | None, b_hh: Tensor | None) -> Tensor:
    """x·W_ihᵀ + b_ih + b_hh for all T steps in one GEMM: [T, B, G], contiguous."""
    T, B, I = x.shape
    x2 = x.reshape(T * B, I)
    biases = [b for b in (b_ih, b_hh) if b is not None]
    if biases:
        gates = torch.addmm(biases[0] + biases[1] if len(biases) == 2 else biases[0], x2, w_ih.t())
    else:
        gates = x2 @ w_ih.t()
    return gates.view(T, B, -1)


def _weight_grads(da: Tensor, x: Tensor, w_ih: Tensor, h0: Tensor, out: Tensor, reverse: bool, need_dx: bool):
    """The large GEMMs after the time loop: dx, dW_ih, dW_hh, db from dA [T, B, G]."""
    T, B, G = da.shape
    # h_prev[t]: the hidden state step t read.
    h_prev = torch.cat([out[1:], h0[None]]) if reverse else torch.cat([h0[None], out[:-1]])
    da2 = da.view(T * B, G)
    dw_ih = da2.t() @ x.reshape(T * B, -1)
    dw_hh = da2.t() @ h_prev.reshape(T * B, -1)
    db = da2.sum(0, dtype=torch.float32 if da.dtype != torch.float64 else torch.float64).to(da.dtype)
    dx = (da2 @ w_ih).view(T, B, -1) if need_dx else None
    return dx, dw_ih, dw_hh, db


class _TritonLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse):
        from legw_fused.kernels import lstm as K  # imported on first use: triton's import is slow

        x = x.contiguous()
        w_hh = w_hh.contiguous()
        gates = _input_projection(x, w_ih, b_ih, b_hh)
        c0_acc = c0.float().contiguous()
        out, cs = K.layer_forward(gates, w_hh, h0.contiguous(), c0_acc, reverse)
        last = 0 if reverse else x.shape[0] - 1
        ctx.save_for_backward(x, w_ih, w_hh, h0, c0_acc, out, gates, cs)
        ctx.reverse = reverse
        ctx.bias = (b_ih is not None, b_hh is not None)
        return out, out[last].clone(), cs[last].to(x.dtype, copy=True)

    @staticmethod
    def backward(ctx, dout, dh_n, dc_n):
        from legw_fused.kernels import lstm as K

        _no_double_backward("triton")

        x, w_ih, w_hh, h0, c0_acc, out, gates, cs = ctx.saved_tensors
        da, dh0, dc0 = K.layer_backward(gates, cs, c0_acc, dout.contiguous(), dh_n, dc_n, w_hh, ctx.reverse)
        dx, dw_ih, dw_hh, db = _weight_grads(da, x, w_ih, h0, out, ctx.reverse, ctx.needs_input_grad[0])
        return (dx, dh0.to(h0.dtype), dc0.to(h0.dtype), dw_ih, dw_hh, db if ctx.bias[0] else None,
                db if ctx.bias[1] else None, None)


def triton_layer(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
                 b_hh: Tensor | None, reverse: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One layer, one direction, on the Triton kernels (lstm_reference.layer's signature)."""
    return _TritonLayer.apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse)


def native_layer(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
                 b_hh: Tensor | None, reverse: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One layer, one direction, on torch's own LSTM kernel (torch._VF.lstm: oneDNN/MKL on CPU, cuDNN on GPUs), with
    its autograd (lstm_reference.layer's signature). The reverse direction runs the flipped sequence."""
    if (b_ih is None) != (b_hh is None):  # torch's kernel takes both biases or none
        b_ih = torch.zeros_like(b_hh) if b_ih is None else b_ih
        b_hh = torch.zeros_like(b_ih) if b_hh is None else b_hh
    weights = [w_ih, w_hh] + ([b_ih, b_hh] if b_ih is not None else [])
    seq = x.flip(0) if reverse else x
    # train=True only where a backward may follow: cuDNN then keeps its reserve space (dropout is 0 here anyway).
    out, h_n, c_n = torch._VF.lstm(seq, (h0[None], c0[None]), weights, b_ih is not None, 1, 0.0,
                                   torch.is_grad_enabled(), False, False)
    return (out.flip(0) if reverse else out), h_n[0], c_n[0]


def native_cell(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
                b_hh: Tensor | None) -> tuple[Tensor, Tensor]:
    """One LSTM step on torch's own cell kernel (torch._VF.lstm_cell, what torch.nn.LSTMCell runs), with its autograd
    (lstm_reference.cell's signature)."""
    return torch._VF.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)


def triton_cell(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
                b_hh: Tensor | None) -> tuple[Tensor, Tensor]:
    """One LSTM step: the Triton layer over one time step (lstm_reference.cell's signature)."""
    _, h1, c1 = triton_layer(x[None], h, c, w_ih, w_hh, b_ih, b_hh, False)
    return h1, c1
