"""Named parameter sets for optimizer benchmarks (shapes only; tensors are made by the benchmark)."""

from __future__ import annotations

import math


def resnet50() -> list[tuple[int, ...]]:
    """torchvision's ResNet-50: 161 tensors, 25,557,032 parameters (convs without bias, BN weight+bias, fc)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            out = planes * 4
            shapes += [(planes, in_ch, 1, 1), (planes,), (planes,), (planes, planes, 3, 3), (planes,), (planes,),
                       (out, planes, 1, 1), (out,), (out,)]
            if b == 0:
                shapes += [(out, in_ch, 1, 1), (out,), (out,)]
            in_ch = out
    return shapes + [(1000, 2048), (1000,)]


def lstm_lm(vocab: int = 10000, hidden: int = 1500, layers: int = 2) -> list[tuple[int, ...]]:
    """Zaremba et al.'s large PTB LSTM language model: embedding, 2 LSTM layers of 1500 units, decoder (~66M)."""
    shapes: list[tuple[int, ...]] = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(4 * hidden, hidden), (4 * hidden, hidden), (4 * hidden,), (4 * hidden,)]
    return shapes + [(vocab, hidden), (vocab,)]


def cpu_mixed() -> list[tuple[int, ...]]:
    """~10M parameters in tensors of mixed, partly awkward sizes, for the 2-core CPU runs."""
    return ([(1024, 1024)] * 4 + [(512, 512)] * 8 + [(3000, 1000), (777, 513)] + [(4096,)] * 64 + [(1,)] * 32
            + [(7,), (65537,)])


def host_overhead() -> list[tuple[int, ...]]:
    """ResNet-50's 161 tensors with one element each: a step's time is then its host-side cost (Python, argument
    passing, launches), which bounds the step of a small model or a fast GPU."""
    return [(1,)] * len(resnet50())


def flat(n: int = 1 << 30) -> list[tuple[int, ...]]:
    return [(n,)]


SETS = {"resnet50": resnet50, "lstm-lm": lstm_lm, "cpu-mixed-10M": cpu_mixed, "flat-1B": flat,
        "host-161": host_overhead}


def numel(shapes) -> int:
    return sum(math.prod(s) for s in shapes)
