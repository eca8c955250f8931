"""``legw-fused train mnist|charlm``: LEGW batch-size sweeps on real data, with legw_fused's optimizers and LSTM.

One baseline per task and optimizer, tuned once at B0 = 128 (tasks.py), scaled to every other batch size by the
chosen schemes (loop.py) with no re-tuning; results.json, a table and PNG plots go to the output folder (report.py).
"""

from __future__ import annotations

import dataclasses
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from .. import __version__, backends
from .loop import SCHEMES, add_time_to_target, run_one
from .report import format_table, plot_all, write_json
from .tasks import BASE_BATCH, TASKS

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


def run(task_name: str, *, preset: str = "quick", batch_sizes=None, schemes=None, epochs=None, train_items=None,
        eval_items=None, optimizer: str = "sgd", base_lr=None, base_warmup_epochs=None, micro_batch="auto",
        device: str = "cpu", seed: int = 0, out="results", quiet: bool = False, argv=None,
        distributed: str | None = None) -> dict:
    """Run the sweep and write results.json, results.md (the table) and the plots under ``out``/``task_name``.

    ``distributed`` ("ddp" or "fsdp", under ``torchrun``): every rank trains its share of each global batch;
    rank 0 prints and writes the results."""
    if distributed:
        device, rank, world = _init_distributed(device)
        bad = [b for b in (batch_sizes or TASKS[task_name].PRESETS[preset].batch_sizes) if b % world]
        if bad:
            raise ValueError(f"--batch-sizes: under --distributed every batch size is the global batch and must be "
                             f"divisible by the world size {world}; {bad} are not")
        quiet = quiet or rank != 0
    else:
        rank, world = 0, 1
    task_cls = TASKS[task_name]
    p = task_cls.PRESETS[preset]
    batch_sizes = sorted(set(batch_sizes or p.batch_sizes))
    schemes = list(dict.fromkeys(schemes or p.schemes))
    epochs = epochs or p.epochs
    train_items = train_items if train_items is not None else p.train_items
    eval_items = eval_items if eval_items is not None else p.eval_items
    dev = torch.device(device)
    if micro_batch == "auto":
        micro_batch = CPU_MICRO_BATCH if dev.type == "cpu" else None
    baseline = task_cls.BASELINES[optimizer]
    if base_lr is not None or base_warmup_epochs is not None:
        baseline = dataclasses.replace(baseline, lr=baseline.lr if base_lr is None else base_lr,
                                       warmup_epochs=baseline.warmup_epochs if base_warmup_epochs is None
                                       else base_warmup_epochs)

    out_dir = Path(out) / task_name
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out: cannot create the output folder {out_dir}: {exc}") from None
    task = task_cls(dev, train_items=train_items, eval_items=eval_items)
    if max(batch_sizes) > len(task):
        raise ValueError(f"--batch-sizes: {max(batch_sizes)} is larger than the {len(task)} training items, so an "
                         f"epoch would have no full batch; use smaller batches or more training data")
    opt_backend = backends.select(backends.STEP_BACKENDS, "auto", dev).name
    say = print if rank == 0 else (lambda *a, **k: None)  # one header, not one per rank
    say(f"legw-fused train {task_name}: the {preset} preset"
          + (" (a short subset/few-epoch run that shows the effect; --full for the paper-scale sweep)"
             if preset == "quick" else " (the paper-scale sweep)"))
    say(f"  data: {task.describe()}"
        + (f"; {distributed.upper()} over {world} ranks, each computing 1/{world} of every batch" if distributed
           else ""))
    say(f"  baseline B0={BASE_BATCH}: peak LR {baseline.lr:g}, {baseline.warmup_epochs:g} warmup epochs, "
          f"poly decay (power 2); {epochs} epochs at every batch size; optimizer legw_fused.{optimizer.upper()} "
          f"(momentum {baseline.momentum}, backend {opt_backend}); device {dev}; seed {seed}"
          + (f"; gradients accumulated over micro-batches of {micro_batch}" if micro_batch else ""))

    runs = []
    wall = time.perf_counter()
    for scheme in schemes:
        for batch in batch_sizes:
            if batch == BASE_BATCH and runs and any(r["batch"] == BASE_BATCH for r in runs):
                # At k = 1 every scheme is the baseline itself; train it once and list it under each scheme.
                base = next(r for r in runs if r["batch"] == BASE_BATCH)
                runs.append({**base, "scheme": scheme, "same_as": base["scheme"]})
                continue
            r = run_one(task, baseline, scheme, batch, epochs, optimizer, seed, dev, quiet, micro_batch,
                        distributed)
            runs.append(r)
            if not quiet:
                print(f"  done {scheme:<13} B={batch:<5} test {task.metric} "
                      f"{'diverged' if r['diverged'] else format(r['test'], '.4f')} in {r['train_seconds']:.1f} s",
                      file=sys.stderr)
    wall = time.perf_counter() - wall

    results = {
        "task": task_name, "metric": task.metric, "higher_is_better": task.higher_is_better, "preset": preset,
        "optimizer": optimizer, "data": task.describe(), "train_items": len(task), "epochs": epochs,
        "batch_sizes": batch_sizes,
        "schemes": schemes, "seed": seed, "base_batch": BASE_BATCH, "micro_batch": micro_batch,
        "baseline": {"lr": baseline.lr, "warmup_epochs": baseline.warmup_epochs, "momentum": baseline.momentum,
                     "weight_decay": baseline.weight_decay, "decay": "poly", "power": 2.0,
                     **({"trust_coefficient": baseline.trust_coefficient} if optimizer == "lars" else {})},
        "backends": {"optimizer": opt_backend, "lstm": runs[0]["lstm_backend"]},
        "distributed": {"mode": distributed, "world_size": world} if distributed else None,
        "command": "legw-fused " + " ".join(argv) if argv is not None else None,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_threads": torch.get_num_threads(), "device": str(dev),
                    "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None},
        "versions": {"legw_fused": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "commit": _commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "total_seconds": wall, "runs": runs,
    }
    results["target"] = add_time_to_target(runs, task.higher_is_better)
    if rank != 0:
        return results  # every rank computed the same results; rank 0 reports them
    table = format_table(results)
    print(table)
    write_json(results, out_dir / "results.json")
    (out_dir / "results.md").write_text(f"```\n{table}\n```\n", encoding="utf-8")
    plots = plot_all(results, out_dir)
    print(f"total {wall:.0f} s (training and evaluation); wrote {out_dir / 'results.json'}, results.md, "
          + ", ".join(p.name for p in plots))
    return results
