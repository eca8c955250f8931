"""The batch-size sweep: for each scheme and batch size, one training run from the same initial weights.

Schemes map onto LEGW's two knobs (peak LR scaling with k = B / B0, warmup length in epochs):
- ``legw``:          LR x sqrt(k), warmup epochs x k (the paper's rule: the same number of warmup iterations);
- ``linear-goyal``:  LR x k, constant warmup epochs (Goyal et al.);
- ``sqrt-constant``: LR x sqrt(k), constant warmup epochs;
- ``none``:          the baseline's LR and warmup epochs unchanged.
Every run trains the same number of epochs, so a larger batch takes k times fewer steps.

Where distributed training slots in: ``make_sampler`` returns a plain ``torch.utils.data.Sampler`` over the
training items (a ``DistributedSampler`` fits, ``set_epoch`` is called on it); ``prepare_model`` is the one place
a model is wrapped (DDP / ``fully_shard``); the LEGW schedule takes the global batch size.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DistributedSampler, RandomSampler, Sampler
from tqdm.auto import tqdm

from ..backends import LSTM_BACKENDS, select
from ..distributed import global_batch_size
from ..lstm import LSTM
from ..optim import LARS, SGD, param_groups
from ..schedule import LEGW
from .tasks import BASE_BATCH, Baseline

__all__ = ["SCHEMES", "make_schedule", "run_one", "make_sampler", "prepare_model", "TARGET_SLACK"]

# scheme -> (LEGW scaling, LEGW warmup_scaling)
SCHEMES = {"legw": ("sqrt", "linear"), "linear-goyal": ("linear", "constant"),
           "sqrt-constant": ("sqrt", "constant"), "none": ("none", "constant")}

# A run "reaches the baseline" when its val metric is within 1% (relative) of the baseline's best val metric:
# the exact best value is one epoch's noise, not a target a repeat of the baseline itself would always hit.
TARGET_SLACK = 0.01


def make_schedule(baseline: Baseline, scheme: str, batch: int, steps_per_epoch: int, epochs: int) -> LEGW:
    scaling, warmup_scaling = SCHEMES[scheme]
    return LEGW(baseline.lr, BASE_BATCH, batch, baseline.warmup_epochs, steps_per_epoch, epochs, decay="poly",
                power=2.0, scaling=scaling, warmup_scaling=warmup_scaling)


def make_sampler(n_items: int, seed: int) -> Sampler:
    """Reshuffled every epoch from one seeded generator, so every run sees the same sequence of permutations.
    Under torch.distributed each rank draws its own share of the same permutation (DistributedSampler)."""
    if dist.is_available() and dist.is_initialized():
        return DistributedSampler(range(n_items), shuffle=True, seed=seed, drop_last=True)
    return RandomSampler(range(n_items), generator=torch.Generator().manual_seed(seed))


def prepare_model(model: torch.nn.Module, device: torch.device, distributed: str | None = None) -> torch.nn.Module:
    """The one place a model is wrapped: DDP (gradients averaged over ranks before the step) or FSDP2
    (``fully_shard`` on each LSTM, then the root: parameters become DTensors sharded along dim 0)."""
    model = model.to(device)
    if distributed == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if distributed == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for m in model.modules():
            if isinstance(m, LSTM):
                fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def make_optimizer(name: str, model: torch.nn.Module, baseline: Baseline, schedule: LEGW):
    # Biases get no weight decay and (for LARS) no trust ratio, as in the LEGW/LARS reference setups.
    groups = param_groups(model, baseline.weight_decay)
    if name == "sgd":
        return SGD(groups, lr=schedule, momentum=baseline.momentum)
    return LARS(groups, lr=schedule, momentum=baseline.momentum, trust_coefficient=baseline.trust_coefficient)


def run_one(task, baseline: Baseline, scheme: str, batch: int, epochs: int, optimizer: str, seed: int,
            device: torch.device, quiet: bool = False, micro_batch: int | None = None,
            distributed: str | None = None) -> dict:
    """Train one model; returns the schedule, the per-epoch history and the final test metric.

    ``batch`` is the global batch of one optimizer step: under torch.distributed (``distributed`` "ddp" or
    "fsdp") each of the W ranks computes batch / W items of it, and the LEGW schedule is built for the global batch.
    ``micro_batch``: forward/backward the batch in chunks of at most this many items and accumulate the gradients
    before the one optimizer step (the same update; less memory, and on a CPU the LSTM's per-step tensors of a
    small chunk stay in cache: large batches run several times faster per sample)."""
    world = dist.get_world_size() if distributed else 1
    per_rank = batch // world
    sampler = make_sampler(len(task), seed)
    batches = BatchSampler(sampler, per_rank, drop_last=True)
    steps_per_epoch = len(batches)
    schedule = make_schedule(baseline, scheme, global_batch_size(per_rank) if distributed else batch,
                             steps_per_epoch, epochs)
    torch.manual_seed(seed)  # the same initial weights in every run (and on every rank)
    model = prepare_model(task.build_model(), device, distributed)
    opt = make_optimizer(optimizer, model, baseline, schedule)

    history, train_seconds, diverged, step = [], 0.0, False, 0
    bar = tqdm(total=schedule.total_steps, desc=f"{scheme} B={batch}", disable=quiet, leave=False, unit="step")
    for epoch in range(epochs):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        model.train()
        loss_sum = torch.zeros((), device=device)
        start = time.perf_counter()
        for idx in batches:
            opt.zero_grad(set_to_none=True)
            idx = torch.as_tensor(idx)
            for chunk in idx.split(micro_batch or batch):
                # Each chunk's mean loss weighted by its share of the batch: the gradients add up to the
                # full batch's mean-loss gradient, so the update is the one at batch size `batch`.
                x, y = task.batch(chunk)
                loss = task.loss(model, x, y) * (len(chunk) / per_rank)
                loss.backward()
                loss_sum += loss.detach()
            opt.step()
            step += 1
            bar.update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds += time.perf_counter() - start
        if distributed:
            dist.all_reduce(loss_sum)  # the mean over ranks of their shares' losses: the global batch's loss
            loss_sum /= world
        train_loss = loss_sum.item() / steps_per_epoch
        model.eval()
        val = task.evaluate(model, "val")
        history.append({"epoch": epoch + 1, "step": step, "train_seconds": train_seconds,
                        "train_loss": _finite(train_loss), "val": _finite(val)})
        bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{val:.4f}")
        if not math.isfinite(train_loss):
            diverged = True  # NaN/inf weights only stay so; the remaining epochs would only cost time
            break
    bar.close()
    test = task.evaluate(model, "test")
    finite = [h["val"] for h in history if h["val"] is not None]
    best = (max if task.higher_is_better else min)(finite) if finite else None
    return {"scheme": scheme, "batch": batch, "k": schedule.k, "peak_lr": schedule.peak_lr,
            "warmup_epochs": schedule.warmup_epochs, "warmup_steps": schedule.warmup_steps,
            "total_steps": schedule.total_steps, "steps_per_epoch": steps_per_epoch, "epochs": epochs,
            "schedule": schedule.to_dict(), "lr_curve": lr_curve(schedule), "history": history, "diverged": diverged,
            "test": _finite(test), "best_val": best, "train_seconds": train_seconds,
            "samples_per_s": step * batch / train_seconds if train_seconds > 0 else None,
            "lstm_backend": lstm_backend(model)}


def add_time_to_target(runs: list[dict], higher_is_better: bool) -> dict | None:
    """Annotate each run with the training time at which its val metric first came within TARGET_SLACK of the
    baseline's best val metric, and the speedup over the baseline's own time; returns the target (or None)."""
    base = next((r for r in runs if r["batch"] == BASE_BATCH and r["best_val"] is not None), None)
    if base is None:
        return None
    target = base["best_val"] * (1 - TARGET_SLACK if higher_is_better else 1 + TARGET_SLACK)
    reached = (lambda v: v >= target) if higher_is_better else (lambda v: v <= target)
    for r in runs:
        r["time_to_target"] = next((h["train_seconds"] for h in r["history"]
                                    if h["val"] is not None and reached(h["val"])), None)
    base_time = base["time_to_target"]
    for r in runs:
        r["speedup"] = base_time / r["time_to_target"] if r["time_to_target"] and base_time else None
    return {"value": target, "baseline_best_val": base["best_val"], "slack": TARGET_SLACK}


def lr_curve(schedule: LEGW, points: int = 400) -> dict:
    """The schedule sampled at about ``points`` steps plus the warmup's end (for the LR plot)."""
    T, W = schedule.total_steps, schedule.warmup_steps
    steps = sorted({t for t in (0, W - 1, W) if 0 <= t < T} |
                   {round(i * (T - 1) / (points - 1)) for i in range(points)})
    return {"steps": steps, "lr": [schedule(t) for t in steps]}


def lstm_backend(model: torch.nn.Module) -> str:
    """Which implementation the model's LSTM layers run (reported with the results)."""
    names = {select(LSTM_BACKENDS, m.backend, m.weight_ih_l0.device, m.weight_ih_l0.dtype).name
             for m in model.modules() if isinstance(m, LSTM)}
    return ", ".join(sorted(names))


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None  # JSON has no NaN; a diverged run's metric is reported as missing
