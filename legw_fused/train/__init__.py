"""``legw-fused train mnist|charlm``: LEGW batch-size sweeps on real data, with legw_fused's optimizers and LSTM.

One baseline per task and optimizer, tuned once at B0 = 128 (tasks.py), scaled to every other batch size by the
chosen schemes (loop.py) with no re-tuning; results.json, a table and PNG plots go to the output folder (report.py).
A sweep is a list of trainings (scheme, batch size, seed); results.json records each one as it finishes and
checkpoint.py keeps the running one, so a killed sweep resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from .. import __version__, backends
from .checkpoint import CHECKPOINT_DIR, atomic_write_text, checkpoint_path, remove_checkpoint
from .loop import SCHEMES, add_time_to_target, run_one
from .report import format_table, plot_all, summarize, to_json
from .tasks import BASE_BATCH, TASKS, Baseline

__all__ = ["run", "SCHEMES", "TASKS", "CPU_MICRO_BATCH"]

# On a CPU, batches are computed in chunks of this many items (gradients accumulated, the same update): measured on
# the 2-core machine with the MNIST-LSTM, a chunk of 128-256 keeps the per-step gate tensors in cache.
CPU_MICRO_BATCH = 256


def _commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _init_distributed(device: str) -> tuple[str, int, int]:
    """Join the process group torchrun describes (gloo on CPU, NCCL on GPUs); one GPU per local rank."""
    import os

    import torch.distributed as dist

    if "RANK" not in os.environ and not dist.is_initialized():
        raise ValueError("--distributed: start the command with torchrun, e.g. `torchrun --standalone "
                         "--nproc_per_node=2 -m legw_fused train mnist --distributed ddp`")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return device, dist.get_rank(), dist.get_world_size()


@dataclass(frozen=True)
class Sweep:
    """What a sweep trains: the command's options resolved against the preset."""
    task: str
    preset: str
    batch_sizes: list
    schemes: list
    epochs: int
    train_items: int | None  # None: the whole training split
    eval_items: int | None
    optimizer: str
    baseline: Baseline
    micro_batch: int | None
    device: torch.device
    seeds: list
    distributed: str | None

    def options(self) -> dict:
        """The values that decide the results, keyed by the option that sets each (a resume must repeat them)."""
        return {"--quick/--full": self.preset, "--batch-sizes": self.batch_sizes, "--schemes": self.schemes,
                "--epochs": self.epochs, "--train-items": self.train_items, "--eval-items": self.eval_items,
                "--optimizer": self.optimizer, "--base-lr": self.baseline.lr,
                "--base-warmup-epochs": self.baseline.warmup_epochs, "--micro-batch": self.micro_batch,
                "--device": str(self.device), "--seeds": self.seeds, "--distributed": self.distributed}

    def trainings(self) -> list[tuple[str, int, int]]:
        """(scheme, batch, seed) in training order: a whole sweep per seed, so an early stop leaves whole sweeps."""
        return [(scheme, batch, seed) for seed in self.seeds for scheme in self.schemes for batch in self.batch_sizes]


def run(task_name: str, *, preset: str = "quick", batch_sizes=None, schemes=None, epochs=None, train_items=None,
        eval_items=None, optimizer: str = "sgd", base_lr=None, base_warmup_epochs=None, micro_batch="auto",
        device: str = "cpu", seeds=(0,), out="results", resume: bool = False, quiet: bool = False, argv=None,
        distributed: str | None = None) -> dict:
    """Run the sweep and write results.json, results.md (the table) and the plots under ``out``/``task_name``.

    Every (scheme, batch size, seed) is one training. results.json and results.md are rewritten after each one and
    every training is checkpointed at each epoch end, so ``resume=True`` continues a killed sweep where it stopped
    (with the same options; a different one is a ValueError naming it). Without ``resume``, an unfinished sweep in
    the folder is a ValueError (nothing is lost); a finished one is replaced.
    ``distributed`` ("ddp" or "fsdp", under ``torchrun``): every rank trains its share of each global batch;
    rank 0 prints and writes the results."""
    rank, world = 0, 1
    if distributed:
        device, rank, world = _init_distributed(device)
    sweep = _resolve(task_name, preset, batch_sizes, schemes, epochs, train_items, eval_items, optimizer, base_lr,
                     base_warmup_epochs, micro_batch, device, seeds, distributed, world)
    quiet = quiet or rank != 0
    out_dir = _make_out_dir(out, task_name)
    previous = _on_rank0(lambda: _previous_sweep(out_dir, sweep, resume), distributed)
    task = TASKS[task_name](sweep.device, train_items=sweep.train_items, eval_items=sweep.eval_items)
    if max(sweep.batch_sizes) > len(task):
        raise ValueError(f"--batch-sizes: {max(sweep.batch_sizes)} is larger than the {len(task)} training items, "
                         f"so an epoch would have no full batch; use smaller batches or more training data")
    say = print if rank == 0 else (lambda *a, **k: None)  # one header, not one per rank
    _print_header(say, sweep, task, world, previous)
    record = _Recorder(sweep, task, out_dir, previous, argv, world, enabled=rank == 0)
    runs = _train_all(sweep, task, out_dir, record, quiet)
    results = record(runs, complete=True)
    if rank == 0:
        print(format_table(results))
        plots = plot_all(results, out_dir)
        print(f"total {results['total_seconds']:.0f} s (training and evaluation); wrote "
              f"{out_dir / 'results.json'}, results.md, " + ", ".join(p.name for p in plots))
    return results  # every rank computed the same results; rank 0 reports them


def _resolve(task_name, preset, batch_sizes, schemes, epochs, train_items, eval_items, optimizer, base_lr,
             base_warmup_epochs, micro_batch, device, seeds, distributed, world) -> Sweep:
    """The options with the preset's values filled in, checked."""
    p = TASKS[task_name].PRESETS[preset]
    batch_sizes = sorted(set(batch_sizes or p.batch_sizes))
    bad = [b for b in batch_sizes if b % world]
    if bad:
        raise ValueError(f"--batch-sizes: under --distributed every batch size is the global batch and must be "
                         f"divisible by the world size {world}; {bad} are not")
    dev = torch.device(device)
    if micro_batch == "auto":
        micro_batch = CPU_MICRO_BATCH if dev.type == "cpu" else None
    baseline = TASKS[task_name].BASELINES[optimizer]
    baseline = dataclasses.replace(baseline, lr=baseline.lr if base_lr is None else base_lr,
                                   warmup_epochs=baseline.warmup_epochs if base_warmup_epochs is None
                                   else base_warmup_epochs)
    return Sweep(task_name, preset, batch_sizes, list(dict.fromkeys(schemes or p.schemes)), epochs or p.epochs,
                 train_items if train_items is not None else p.train_items,
                 eval_items if eval_items is not None else p.eval_items, optimizer, baseline, micro_batch, dev,
                 sorted(set(seeds)), distributed)


def _make_out_dir(out, task_name: str) -> Path:
    out_dir = Path(out) / task_name
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out: cannot create the output folder {out_dir}: {exc}") from None
    return out_dir


def _on_rank0(fn, distributed: str | None):
    """``fn()`` computed on rank 0 only, its result or its ValueError on every rank (the output folder is rank 0's;
    ranks on other nodes may not see it)."""
    if not distributed:
        return fn()
    import torch.distributed as dist

    box = [None]
    if dist.get_rank() == 0:
        try:
            box = [("ok", fn())]
        except ValueError as exc:
            box = [("error", str(exc))]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise ValueError(value)
    return value


def _previous_sweep(out_dir: Path, sweep: Sweep, resume: bool) -> dict | None:
    """The record of the sweep to continue (None: start afresh, with no checkpoint left from an earlier one)."""
    path = out_dir / "results.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
    except ValueError as exc:
        raise ValueError(f"--out: {path} is not a results file ({exc}); remove it, or choose another --out") from None
    # results.json without "complete" predates resumable sweeps and was written only once the sweep had finished.
    if saved is not None and not saved.get("complete", True) and not resume:
        total = len(saved["schemes"]) * len(saved["batch_sizes"]) * len(saved["seeds"])
        raise ValueError(f"--out: {out_dir} holds an unfinished sweep ({len(saved['runs'])} of {total} trainings "
                         f"done); continue it by repeating its command with --resume, or remove the folder, or "
                         f"choose another --out")
    if saved is None or not resume:
        shutil.rmtree(out_dir / CHECKPOINT_DIR, ignore_errors=True)
        return None  # a finished sweep is replaced by the new one, as a rerun of the command always did
    if "options" not in saved:
        raise ValueError(f"--resume: {path} was written before sweeps could be resumed (it has no record of its "
                         f"options); remove it, or choose another --out")
    for option, now in sweep.options().items():
        if saved["options"].get(option) != now:
            raise ValueError(f"--resume: {option} differs from the sweep in {out_dir} ({saved['options'].get(option)} "
                             f"there, {now} now); resume with the options it was started with, or choose another "
                             f"--out for a new sweep")
    return saved


def _print_header(say, sweep: Sweep, task, world: int, previous: dict | None) -> None:
    b = sweep.baseline
    say(f"legw-fused train {sweep.task}: the {sweep.preset} preset"
        + (" (a short subset/few-epoch run that shows the effect; --full for the paper-scale sweep)"
           if sweep.preset == "quick" else " (the paper-scale sweep)"))
    say(f"  data: {task.describe()}"
        + (f"; {sweep.distributed.upper()} over {world} ranks, each computing 1/{world} of every batch"
           if sweep.distributed else ""))
    opt_backend = backends.select(backends.STEP_BACKENDS, "auto", sweep.device).name
    say(f"  baseline B0={BASE_BATCH}: peak LR {b.lr:g}, {b.warmup_epochs:g} warmup epochs, poly decay (power 2); "
        f"{sweep.epochs} epochs at every batch size; optimizer legw_fused.{sweep.optimizer.upper()} (momentum "
        f"{b.momentum}, backend {opt_backend}); device {sweep.device}; "
        f"seed{'s' if len(sweep.seeds) > 1 else ''} {', '.join(map(str, sweep.seeds))}"
        + (f"; gradients accumulated over micro-batches of {sweep.micro_batch}" if sweep.micro_batch else ""))
    if previous is not None:
        say(f"  resuming: {len(previous['runs'])} of {len(sweep.trainings())} trainings done")


def _train_all(sweep: Sweep, task, out_dir: Path, record, quiet: bool) -> list[dict]:
    """Train what the sweep has not finished yet, recording the results after each training."""
    runs = list(record.previous_runs)
    done = {(r["scheme"], r["batch"], r["seed"]) for r in runs}
    for scheme, batch, seed in sweep.trainings():
        if (scheme, batch, seed) in done:
            continue
        checkpoint = checkpoint_path(out_dir, scheme, batch, seed)
        base = next((r for r in runs if r["batch"] == batch == BASE_BATCH and r["seed"] == seed), None)
        if base is not None:
            # At k = 1 every scheme is the baseline itself; train it once and list it under each scheme.
            runs.append({**base, "scheme": scheme, "same_as": base.get("same_as", base["scheme"])})
        else:
            r = run_one(task, sweep.baseline, scheme, batch, sweep.epochs, sweep.optimizer, seed, sweep.device,
                        quiet, sweep.micro_batch, sweep.distributed, checkpoint)
            r["commit"] = record.commit  # the code that finished this training (a resumed sweep spans several)
            runs.append(r)
            if not quiet:
                print(f"  done {scheme:<13} B={batch:<5} seed {seed:<3} test {task.metric} "
                      + (f"diverged at epoch {r['diverged']['epoch']}" if r["diverged"] else f"{r['test']:.4f}")
                      + f" in {r['train_seconds']:.1f} s", file=sys.stderr)
        record(runs, complete=False)
        if record.enabled:
            remove_checkpoint(checkpoint)  # its result is recorded
    return runs


class _Recorder:
    """Builds results.json's dict from the runs so far and (on rank 0) writes it and results.md atomically."""

    def __init__(self, sweep: Sweep, task, out_dir: Path, previous: dict | None, argv, world: int, enabled: bool):
        self.task, self.out_dir, self.enabled = task, out_dir, enabled
        # Runs recorded before trainings carried their own commit: the commit of the file that recorded them.
        self.previous_runs = [{"commit": previous.get("commit"), **r} for r in previous["runs"]] if previous else []
        self.commit = _commit()
        self.previous_seconds = previous["total_seconds"] if previous else 0.0
        self.start = time.perf_counter()
        b, dev = sweep.baseline, sweep.device
        self.fixed = {
            "task": sweep.task, "metric": task.metric, "higher_is_better": task.higher_is_better,
            "preset": sweep.preset, "optimizer": sweep.optimizer, "data": task.describe(), "train_items": len(task),
            "epochs": sweep.epochs, "batch_sizes": sweep.batch_sizes, "schemes": sweep.schemes,
            "seeds": sweep.seeds, "base_batch": BASE_BATCH, "micro_batch": sweep.micro_batch,
            "baseline": {"lr": b.lr, "warmup_epochs": b.warmup_epochs, "momentum": b.momentum,
                         "weight_decay": b.weight_decay, "decay": "poly", "power": 2.0,
                         **({"trust_coefficient": b.trust_coefficient} if sweep.optimizer == "lars" else {})},
            "backends": {"optimizer": backends.select(backends.STEP_BACKENDS, "auto", dev).name, "lstm": None},
            "distributed": {"mode": sweep.distributed, "world_size": world} if sweep.distributed else None,
            "command": "legw-fused " + " ".join(argv) if argv is not None else None,
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpu_threads": torch.get_num_threads(), "device": str(dev),
                        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None},
            "versions": {"legw_fused": __version__, "torch": torch.__version__,
                         "python": platform.python_version()},
            # The code that last wrote this file; each run has the commit that trained it.
            "commit": self.commit, "resumes": previous.get("resumes", 0) + 1 if previous else 0,
            "options": sweep.options(),
        }
        self(self.previous_runs, complete=False)  # the folder holds a sweep from now on: a rerun must say --resume

    def __call__(self, runs: list[dict], complete: bool) -> dict:
        results = {**self.fixed, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "total_seconds": self.previous_seconds + time.perf_counter() - self.start,
                   "complete": complete, "runs": runs}
        if runs:
            results["backends"] = {**results["backends"], "lstm": runs[0]["lstm_backend"]}
        results["target"] = add_time_to_target(runs, self.task.higher_is_better)
        results["cells"] = summarize(runs)
        if self.enabled:
            atomic_write_text(self.out_dir / "results.json", to_json(results))
            atomic_write_text(self.out_dir / "results.md", f"```\n{format_table(results)}\n```\n")
            if complete:
                shutil.rmtree(self.out_dir / CHECKPOINT_DIR, ignore_errors=True)
        return results
