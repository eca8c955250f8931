"""Crash safety of a sweep: atomic file writes and the per-epoch checkpoint of one training.

Every file is written to a temporary name beside its target and moved over it with ``os.replace`` (atomic on
POSIX and Windows), so a process killed at any moment leaves either the old file or the new one, never half of
one. A checkpoint is a plain dict of tensors, numbers, strings and lists: ``torch.load(weights_only=True)`` reads it
(the optimizer's LEGW schedule is stored as ``{"legw": {...}}`` by its own state_dict).
Under torch.distributed the model and optimizer are saved by torch.distributed.checkpoint (DCP), each rank its own
shards, into a folder beside the checkpoint file; the file, written last, names the folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

__all__ = ["CHECKPOINT_DIR", "atomic_write_text", "checkpoint_path", "load_checkpoint", "load_shards",
           "remove_checkpoint", "save_checkpoint", "save_shards"]

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


def _shards_folders(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.stem}-epoch*"))


def save_shards(model, opt, path: Path, epoch: int) -> Path:
    """Every rank's shards of ``model`` and ``opt`` into a new folder beside ``path``; returns the folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = path.with_name(f"{path.stem}-epoch{epoch}")
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=folder)
    return folder


def load_shards(model, opt, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def remove_checkpoint(path: Path, keep: Path | None = None) -> None:
    """Delete a training's checkpoint file and its shard folders (but ``keep``)."""
    for folder in _shards_folders(path):
        if folder != keep:
            shutil.rmtree(folder, ignore_errors=True)
    if keep is None:
        path.unlink(missing_ok=True)
