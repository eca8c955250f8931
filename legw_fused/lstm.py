"""``LSTMCell`` and ``LSTM``: drop-in replacements for ``torch.nn.LSTMCell`` / ``torch.nn.LSTM``.

They subclass torch's modules, so parameters (names, shapes, initialisation), ``state_dict``, ``isinstance`` checks
and the argument checks of ``forward`` are torch's own; only the computation goes through ``legw_fused.functional``
on the chosen backend (``backend="auto"``: cpp on CPU, cuda then triton on GPUs, the torch reference otherwise).
Not supported (``NotImplementedError``): ``proj_size > 0`` and PackedSequence input.

While ``torch.onnx.export`` traces them (both exporters), they compute with torch's own forward, which the exporters
translate to ONNX's LSTM; our ops have no ONNX translation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import functional as LF
from .backends import LSTM_BACKENDS, check_backend_name

__all__ = ["LSTMCell", "LSTM"]


class LSTMCell(nn.LSTMCell):
    """``torch.nn.LSTMCell`` with a fused step. Extra keyword: ``backend`` ("auto", "torch", "cpp", "cuda",
    "triton")."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 backend: str = "auto"):
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)
        self.backend = check_backend_name(backend, LSTM_BACKENDS)

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        if torch.onnx.is_in_onnx_export():
            return super().forward(input, hx)
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is None:
            zeros = input.new_zeros(input.shape[:-1] + (self.hidden_size,))
            hx = (zeros, zeros)
        return LF.lstm_cell(input, hx[0], hx[1], self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
                            backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"


class LSTM(nn.LSTM):
    """``torch.nn.LSTM`` computed by legw_fused: the input projection of all steps in one GEMM, then per step the
    recurrent GEMM and one fused pointwise kernel (forward and backward). Extra keyword: ``backend``."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None, *, backend: str = "auto"):
        if proj_size:
            raise NotImplementedError("legw_fused.LSTM: proj_size > 0 is not supported; use torch.nn.LSTM")
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device=device, dtype=dtype)
        self.backend = check_backend_name(backend, LSTM_BACKENDS)

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None):
        if torch.onnx.is_in_onnx_export():
            return super().forward(input, hx)
        if isinstance(input, PackedSequence):
            raise NotImplementedError("legw_fused.LSTM: PackedSequence input is not supported; pad the batch "
                                      "(torch.nn.utils.rnn.pad_packed_sequence) or use torch.nn.LSTM")
        if input.dim() not in (2, 3):
            raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
        batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not batched:
            input = input.unsqueeze(batch_dim)
        D = 2 if self.bidirectional else 1
        if hx is None:
            zeros = input.new_zeros(self.num_layers * D, input.shape[batch_dim], self.hidden_size)
            hx = (zeros, zeros)
        else:
            want = 3 if batched else 2
            if hx[0].dim() != want or hx[1].dim() != want:
                raise RuntimeError(f"For {'batched 3-D' if batched else 'unbatched 2-D'} input, hx and cx should "
                                   f"also be {want}-D but got ({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
            if not batched:
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        self.check_forward_args(input, hx, None)  # torch's own shape checks and messages
        weights = [getattr(self, n) for n in self._flat_weights_names]
        output, h_n, c_n = LF.lstm(input, hx, weights, self.bias, self.num_layers, self.dropout, self.training,
                                   self.bidirectional, self.batch_first, backend=self.backend)
        if not batched:
            output, h_n, c_n = output.squeeze(batch_dim), h_n.squeeze(1), c_n.squeeze(1)
        return output, (h_n, c_n)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"
