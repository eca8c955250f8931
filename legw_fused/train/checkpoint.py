"""Crash safety of a sweep: atomic file writes and the per-epoch checkpoint of one training.

Every file is written to a temporary name beside its target and moved over it with ``os.replace`` (atomic on
POSIX and Windows), so a process killed at any moment leaves either the old file or the new one, never half of
one. A checkpoint is a plain dict of tensors, numbers, strings and lists: ``torch.load(weights_only=True)`` reads it
(the optimizer's LEGW schedule is stored as ``{"legw": {...}}`` by its own state_dict).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["CHECKPOINT_DIR", "atomic_write_text", "checkpoint_path", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_DIR = "checkpoints"  # under OUT/TASK/; removed once every training's result is recorded


def _replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())  # the data is on disk before the name points at it (survives a power cut too)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    _replace(tmp, path)


def checkpoint_path(out_dir: Path, scheme: str, batch: int, seed: int) -> Path:
    return out_dir / CHECKPOINT_DIR / f"{scheme}-B{batch}-seed{seed}.pt"


def save_checkpoint(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    _replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
