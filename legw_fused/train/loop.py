"""The batch-size sweep: for each scheme and batch size, one training run from the same initial weights.

Schemes map onto LEGW's two knobs (peak LR scaling with k = B / B0, warmup length in epochs):
- ``legw``:          LR x sqrt(k), warmup epochs x k (the paper's rule: the same number of warmup iterations);
- ``linear-goyal``:  LR x k, constant warmup epochs (Goyal et al.);
- ``sqrt-constant``: LR x sqrt(k), constant warmup epochs;
- ``none``:          the baseline's LR and warmup epochs unchanged.
Every run trains the same number of epochs, so a larger batch takes k times fewer steps, unless it diverges
(``divergence``): then it stops after that epoch. A run is checkpointed at each epoch end and continues from it.

Where distributed training slots in: ``make_sampler`` returns a plain ``torch.utils.data.Sampler`` over the
training items (a ``DistributedSampler`` fits, ``set_epoch`` is called on it); ``prepare_model`` is the one place
a model is wrapped (DDP / ``fully_shard``); the LEGW schedule takes the global batch size.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DistributedSampler, RandomSampler, Sampler
from tqdm.auto import tqdm

from ..backends import LSTM_BACKENDS, select
from ..distributed import global_batch_size
from ..lstm import LSTM
from ..optim import LARS, SGD, param_groups
from ..schedule import LEGW
from .checkpoint import load_checkpoint, load_shards, remove_checkpoint, save_checkpoint, save_shards
from .tasks import BASE_BATCH, Baseline

__all__ = ["DIVERGENCE_FACTOR", "SCHEMES", "TARGET_SLACK", "divergence", "make_sampler", "make_schedule",
           "prepare_model", "run_one"]

# scheme -> (LEGW scaling, LEGW warmup_scaling)
SCHEMES = {"legw": ("sqrt", "linear"), "linear-goyal": ("linear", "constant"),
           "sqrt-constant": ("sqrt", "constant"), "none": ("none", "constant")}

# A run "reaches the baseline" when its val metric is within 1% (relative) of the baseline's best val metric:
# the exact best value is one epoch's noise, not a target a repeat of the baseline itself would always hit.
TARGET_SLACK = 0.01

# A training has diverged when an epoch's mean training loss is not finite, or above DIVERGENCE_FACTOR times its
# starting loss (the first batch's loss at the initial weights, about log(classes) or log(vocabulary)): a whole
# epoch that far above an untrained model is an LR the model does not survive; the rest of it is skipped.
DIVERGENCE_FACTOR = 3.0


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


@dataclass
class Training:
    """One training's moving parts and its progress so far: what a checkpoint saves and restores."""
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    schedule: LEGW
    sampler: Sampler
    batches: BatchSampler
    per_rank: int
    epoch: int = 0  # epochs finished
    step: int = 0
    train_seconds: float = 0.0
    start_loss: float | None = None  # the first batch's loss, at the initial weights
    history: list = field(default_factory=list)
    diverged: dict | None = None  # {"epoch", "reason"} once it has


def build_training(task, baseline: Baseline, scheme: str, batch: int, epochs: int, optimizer: str, seed: int,
                   device: torch.device, distributed: str | None = None) -> Training:
    world = dist.get_world_size() if distributed else 1
    per_rank = batch // world
    sampler = make_sampler(len(task), seed)
    batches = BatchSampler(sampler, per_rank, drop_last=True)
    schedule = make_schedule(baseline, scheme, global_batch_size(per_rank) if distributed else batch,
                             len(batches), epochs)
    torch.manual_seed(seed)  # the same initial weights in every run (and on every rank)
    model = prepare_model(task.build_model(), device, distributed)
    return Training(model, make_optimizer(optimizer, model, baseline, schedule), schedule, sampler, batches, per_rank)


def train_epoch(tr: Training, task, micro_batch: int | None, device: torch.device, distributed: str | None,
                bar) -> float:
    """One epoch of optimizer steps; returns its mean training loss (and sets ``tr.start_loss`` on the first)."""
    if hasattr(tr.sampler, "set_epoch"):
        tr.sampler.set_epoch(tr.epoch)
    tr.model.train()
    # [the epoch's summed batch losses, the first batch's loss]: summed on the device, read once per epoch.
    sums = torch.zeros(2, device=device)
    start = time.perf_counter()
    for idx in tr.batches:
        tr.opt.zero_grad(set_to_none=True)
        idx = torch.as_tensor(idx)
        for chunk in idx.split(micro_batch or tr.per_rank):
            # Each chunk's mean loss weighted by its share of the batch: the gradients add up to the
            # full batch's mean-loss gradient, so the update is the one of the whole batch.
            x, y = task.batch(chunk)
            loss = task.loss(tr.model, x, y) * (len(chunk) / tr.per_rank)
            loss.backward()
            sums[0] += loss.detach()
        if tr.step == 0:
            sums[1] = sums[0]
        tr.opt.step()
        tr.step += 1
        bar.update()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    tr.train_seconds += time.perf_counter() - start
    if distributed:
        dist.all_reduce(sums)  # the mean over ranks of their shares' losses: the global batch's loss
        sums /= dist.get_world_size()
    if tr.start_loss is None:
        tr.start_loss = sums[1].item()
    return sums[0].item() / len(tr.batches)


def divergence(train_loss: float, start_loss: float) -> str | None:
    """Why a training with this epoch's mean training loss has diverged, or None if it has not."""
    if not math.isfinite(train_loss):
        return "non-finite training loss"
    if train_loss > DIVERGENCE_FACTOR * start_loss:
        return f"mean training loss {train_loss:.4g} > {DIVERGENCE_FACTOR:g} x the starting loss {start_loss:.4g}"
    return None


def save_training(tr: Training, checkpoint: Path, distributed: str | None) -> None:
    """Everything the next epoch depends on, as plain values and tensors (loadable with weights_only=True).

    Under torch.distributed the model and optimizer go to torch.distributed.checkpoint (every rank writes its own
    shards into a new folder); then rank 0 writes ``checkpoint``, naming that folder, which makes the epoch's
    checkpoint the current one in one atomic step."""
    state = {"epoch": tr.epoch, "step": tr.step, "train_seconds": tr.train_seconds, "start_loss": tr.start_loss,
             "history": tr.history, "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []}
    if not distributed:
        save_checkpoint({**state, "model": tr.model.state_dict(), "optimizer": tr.opt.state_dict(),
                         "sampler_rng": tr.sampler.generator.get_state()}, checkpoint)
        return
    # A DistributedSampler's order is a function of its seed and set_epoch: nothing to save for it.
    shards = save_shards(tr.model, tr.opt, checkpoint, tr.epoch)
    if dist.get_rank() == 0:
        save_checkpoint({**state, "shards": shards.name}, checkpoint)
        remove_checkpoint(checkpoint, keep=shards)
    dist.barrier()  # no rank goes on before the checkpoint is complete


def restore_training(tr: Training, checkpoint: Path, distributed: str | None) -> None:
    state = load_checkpoint(checkpoint)
    if distributed:
        load_shards(tr.model, tr.opt, checkpoint.parent / state["shards"])
    else:
        tr.model.load_state_dict(state["model"])
        tr.opt.load_state_dict(state["optimizer"])
        tr.sampler.generator.set_state(state["sampler_rng"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    tr.epoch, tr.step, tr.train_seconds = state["epoch"], state["step"], state["train_seconds"]
    tr.start_loss, tr.history = state["start_loss"], state["history"]


def run_one(task, baseline: Baseline, scheme: str, batch: int, epochs: int, optimizer: str, seed: int,
            device: torch.device, quiet: bool = False, micro_batch: int | None = None,
            distributed: str | None = None, checkpoint: Path | None = None) -> dict:
    """Train one model; returns the schedule, the per-epoch history and the final test metric.

    ``batch`` is the global batch of one optimizer step: under torch.distributed (``distributed`` "ddp" or
    "fsdp") each of the W ranks computes batch / W items of it, and the LEGW schedule is built for the global batch.
    ``micro_batch``: forward/backward the batch in chunks of at most this many items and accumulate the gradients
    before the one optimizer step (the same update; less memory, and on a CPU the LSTM's per-step tensors of a
    small chunk stay in cache: large batches run several times faster per sample).
    ``checkpoint``: a file the training is saved to at the end of every epoch but the last, and continued from
    if it exists (under torch.distributed: with its model and optimizer shards in folders beside it, on a file
    system every rank shares)."""
    tr = build_training(task, baseline, scheme, batch, epochs, optimizer, seed, device, distributed)
    if checkpoint is not None and checkpoint.exists():
        restore_training(tr, checkpoint, distributed)
    bar = tqdm(total=tr.schedule.total_steps, initial=tr.step, desc=f"{scheme} B={batch} seed {seed}",
               disable=quiet, leave=False, unit="step")
    while tr.epoch < epochs and tr.diverged is None:
        train_loss = train_epoch(tr, task, micro_batch, device, distributed, bar)
        tr.epoch += 1
        tr.model.eval()
        val = task.evaluate(tr.model, "val")
        tr.history.append({"epoch": tr.epoch, "step": tr.step, "train_seconds": tr.train_seconds,
                           "train_loss": _finite(train_loss), "val": _finite(val)})
        bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{val:.4f}")
        reason = divergence(train_loss, tr.start_loss)
        if reason:
            tr.diverged = {"epoch": tr.epoch, "reason": reason}  # the remaining epochs would only cost time
        elif checkpoint is not None and tr.epoch < epochs:
            save_training(tr, checkpoint, distributed)
    bar.close()
    return result(tr, task, scheme, batch, seed, epochs)


def result(tr: Training, task, scheme: str, batch: int, seed: int, epochs: int) -> dict:
    """The training's record in results.json; a diverged one has no test metric (it is not evaluated)."""
    finite = [h["val"] for h in tr.history if h["val"] is not None]
    best = (max if task.higher_is_better else min)(finite) if finite else None
    test = None if tr.diverged else _finite(task.evaluate(tr.model, "test"))
    s = tr.schedule
    return {"scheme": scheme, "batch": batch, "seed": seed, "k": s.k, "peak_lr": s.peak_lr,
            "warmup_epochs": s.warmup_epochs, "warmup_steps": s.warmup_steps, "total_steps": s.total_steps,
            "steps_per_epoch": len(tr.batches), "epochs": epochs, "schedule": s.to_dict(), "lr_curve": lr_curve(s),
            "history": tr.history, "start_loss": tr.start_loss, "diverged": tr.diverged, "test": test,
            "best_val": best, "train_seconds": tr.train_seconds,
            "samples_per_s": tr.step * batch / tr.train_seconds if tr.train_seconds > 0 else None,
            "lstm_backend": lstm_backend(tr.model)}


def add_time_to_target(runs: list[dict], higher_is_better: bool) -> dict | None:
    """Annotate each run with the training time at which its val metric first came within TARGET_SLACK of the
    baseline's best val metric (its mean over the seeds where it did not diverge), and the speedup over the same
    seed's baseline's time; returns the target (or None)."""
    bases = {r["seed"]: r for r in runs if r["batch"] == BASE_BATCH and r["best_val"] is not None
             and not r["diverged"]}
    if not bases:
        return None
    best = statistics.fmean(r["best_val"] for r in bases.values())
    target = best * (1 - TARGET_SLACK if higher_is_better else 1 + TARGET_SLACK)
    reached = (lambda v: v >= target) if higher_is_better else (lambda v: v <= target)
    for r in runs:
        r["time_to_target"] = next((h["train_seconds"] for h in r["history"]
                                    if h["val"] is not None and reached(h["val"])), None)
    for r in runs:
        base_time = bases[r["seed"]]["time_to_target"] if r["seed"] in bases else None
        r["speedup"] = base_time / r["time_to_target"] if r["time_to_target"] and base_time else None
    return {"value": target, "baseline_best_val": best, "slack": TARGET_SLACK}


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
