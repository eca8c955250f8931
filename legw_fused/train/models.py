"""The two models of ``legw-fused train``, both built on ``legw_fused.LSTM``.

Legend: B batch, T time steps, I input features, H hidden size, E embedding size, V vocabulary size, C classes.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import LSTM

__all__ = ["MnistLSTM", "CharLM"]


class MnistLSTM(nn.Module):
    """The paper's MNIST-LSTM: an image read row by row (x [B, T=28, I=28]) by one LSTM layer, then a linear
    classifier on the last hidden state -> logits [B, C]."""

    def __init__(self, hidden_size: int = 128, input_size: int = 28, classes: int = 10):
        super().__init__()
        self.lstm = LSTM(input_size, hidden_size, batch_first=True)
        self.classifier = nn.Linear(hidden_size, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h_n, _) = self.lstm(x)  # h_n [1, B, H]
        return self.classifier(h_n[-1])


class CharLM(nn.Module):
    """Character-level language model: ids [B, T] -> embedding [B, T, E] -> LSTM -> decoder logits [B, T, V]."""

    def __init__(self, vocab_size: int, embed_size: int = 64, hidden_size: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_size)
        self.lstm = LSTM(embed_size, hidden_size, batch_first=True)
        self.decoder = nn.Linear(hidden_size, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(ids))
        return self.decoder(out)
