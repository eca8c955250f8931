"""LEGW: linear-epoch gradual warmup with square-root LR scaling (You et al., arXiv 1901.08256).

A baseline is tuned at batch B0 with peak LR eta0 and w0 warmup epochs. Training at B = k*B0 uses peak LR
eta0*sqrt(k) and w0*k warmup epochs, i.e. the same number of warmup *iterations*, followed by a decay.

The schedule is evaluated in three places that must agree:
- ``LEGW.__call__`` / ``LEGW.lr``: plain Python floats, the readable definition;
- ``LEGW.lr_tensor``: the same formula in torch ops on a device step-count tensor (reference backend, no host sync);
- ``csrc/legw_schedule.h``: the same formula inlined into C++/CUDA kernels, reading ``LEGW.packed(device)``.
All rounding to integer step counts (W, T, milestones) happens here on the host, so kernels only compare and
do float arithmetic.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Sequence

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["LEGW", "LEGWScheduler", "DECAYS", "SCALINGS", "WARMUP_SCALINGS"]

# The integer code of each decay is part of the packed layout read by csrc/legw_schedule.h.
DECAYS = ("poly", "cosine", "exp", "step", "constant")
SCALINGS = ("sqrt", "linear", "none")
WARMUP_SCALINGS = ("linear", "constant")

# Packed layout (float64): slot -> meaning. Mirrored by the enum in csrc/legw_schedule.h.
PACKED_SLOTS = ("decay", "peak_lr", "end_lr", "warmup_steps", "total_steps", "steps_per_epoch", "power",
                "gamma", "num_milestones")  # followed by the milestone steps


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"LEGW: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"LEGW: {name} must be finite, got {value}")
    return value


def _choice(name: str, value, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"LEGW: unknown {name} {value!r}; expected one of {', '.join(map(repr, allowed))}")
    return value


class LEGW:
    """The LEGW learning-rate schedule for training at ``batch_size`` from a baseline tuned at ``base_batch_size``.

    ``sched(t)`` is the LR of optimizer step ``t`` (``t`` = number of steps already taken, from 0):
    linear warmup ``peak*(t+1)/W`` for ``t < W``, then the chosen decay over the remaining ``T - W`` steps.

    Attributes: ``k`` (batch ratio), ``peak_lr``, ``warmup_epochs``, ``warmup_steps`` (W), ``total_steps`` (T),
    ``milestone_steps``.
    """

    def __init__(self, base_lr, base_batch_size, batch_size, base_warmup_epochs, steps_per_epoch, epochs,
                 decay="poly", power=2.0, end_lr=0.0, gamma=0.1, milestones=(), scaling="sqrt",
                 warmup_scaling="linear"):
        self.base_lr = _real("base_lr", base_lr)
        self.base_batch_size = _real("base_batch_size", base_batch_size)
        self.batch_size = _real("batch_size", batch_size)
        self.base_warmup_epochs = _real("base_warmup_epochs", base_warmup_epochs)
        self.steps_per_epoch = _real("steps_per_epoch", steps_per_epoch)
        self.epochs = _real("epochs", epochs)
        self.decay = _choice("decay", decay, DECAYS)
        self.power = _real("power", power)
        self.end_lr = _real("end_lr", end_lr)
        self.gamma = _real("gamma", gamma)
        self.scaling = _choice("scaling", scaling, SCALINGS)
        self.warmup_scaling = _choice("warmup_scaling", warmup_scaling, WARMUP_SCALINGS)
        if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Sequence):
            raise TypeError(f"LEGW: milestones must be a sequence of epochs, got {type(milestones).__name__}")
        self.milestones = tuple(_real("milestones", m) for m in milestones)

        if self.base_batch_size <= 0:
            raise ValueError(f"LEGW: base_batch_size must be > 0, got {base_batch_size}")
        if self.batch_size <= 0:
            raise ValueError(f"LEGW: batch_size must be > 0, got {batch_size}")
        if self.base_lr <= 0:
            raise ValueError(f"LEGW: base_lr must be > 0, got {base_lr}")
        if self.base_warmup_epochs < 0:
            raise ValueError(f"LEGW: base_warmup_epochs must be >= 0, got {base_warmup_epochs}")
        if self.steps_per_epoch <= 0:
            raise ValueError(f"LEGW: steps_per_epoch must be > 0, got {steps_per_epoch}")
        if self.epochs <= 0:
            raise ValueError(f"LEGW: epochs must be > 0, got {epochs}")
        if self.power <= 0:
            raise ValueError(f"LEGW: power must be > 0, got {power}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"LEGW: gamma must be in (0, 1], got {gamma}")
        if any(m < 0 for m in self.milestones):
            raise ValueError(f"LEGW: milestones must be >= 0 epochs, got {list(milestones)}")
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"LEGW: milestones must be sorted in increasing order, got {list(milestones)}")
        if self.milestones and self.decay != "step":
            raise ValueError(f"LEGW: milestones are only used by decay='step', got decay={self.decay!r}")

        self.k = self.batch_size / self.base_batch_size
        # LEGW multiplies the *tuned* LR by sqrt(k); sqrt(base_lr * k) is a known mistake elsewhere.
        self.peak_lr = self.base_lr * {"sqrt": math.sqrt(self.k), "linear": self.k, "none": 1.0}[self.scaling]
        # Warmup is scaled in epochs: k-times fewer steps per epoch, so W stays the baseline's step count.
        self.warmup_epochs = self.base_warmup_epochs * (self.k if self.warmup_scaling == "linear" else 1.0)
        self.warmup_steps = round(self.warmup_epochs * self.steps_per_epoch)
        self.total_steps = round(self.epochs * self.steps_per_epoch)
        self.milestone_steps = tuple(round(m * self.steps_per_epoch) for m in self.milestones)

        if self.total_steps < 1:
            raise ValueError(f"LEGW: total_steps = round(epochs * steps_per_epoch) must be >= 1, got "
                             f"{self.total_steps} (epochs={epochs}, steps_per_epoch={steps_per_epoch})")
        if self.warmup_steps > self.total_steps:
            raise ValueError(f"LEGW: warmup_steps ({self.warmup_steps}) > total_steps ({self.total_steps}): "
                             f"warmup of {self.warmup_epochs:g} epochs does not fit in epochs={epochs}")
        if self.end_lr < 0:
            raise ValueError(f"LEGW: end_lr must be >= 0, got {end_lr}")
        if self.end_lr > self.peak_lr:
            raise ValueError(f"LEGW: end_lr ({end_lr}) must be <= peak_lr ({self.peak_lr})")
        self._packed_cache: dict[torch.device, torch.Tensor] = {}

    # ------------------------------------------------------------------ host evaluation (the definition)
    def __call__(self, t) -> float:
        return self.lr(t)

    def lr(self, t) -> float:
        """The LR for optimizer step ``t`` (an integer >= 0)."""
        t = operator.index(t)
        if t < 0:
            raise ValueError(f"LEGW: step t must be >= 0, got {t}")
        W, T, peak, end = self.warmup_steps, self.total_steps, self.peak_lr, self.end_lr
        if t < W:
            return peak * (t + 1.0) / W
        s = min((t - W) / (T - W), 1.0) if T > W else 1.0
        if self.decay == "poly":
            return end + (peak - end) * (1.0 - s) ** self.power
        if self.decay == "cosine":
            return end + (peak - end) * (1.0 + math.cos(math.pi * s)) / 2.0
        if self.decay == "exp":
            return peak * self.gamma ** ((t - W) / self.steps_per_epoch)
        if self.decay == "step":
            return peak * self.gamma ** float(sum(t >= m for m in self.milestone_steps))
        return peak

    # ------------------------------------------------------------------ device evaluation (no host sync)
    def lr_tensor(self, step: torch.Tensor) -> torch.Tensor:
        """``self.lr`` applied elementwise to an integer step-count tensor, in float64 on its device."""
        t = step.to(torch.float64)
        W, T, peak, end = self.warmup_steps, self.total_steps, self.peak_lr, self.end_lr
        since = (t - W).clamp(min=0.0)
        if self.decay in ("poly", "cosine"):
            s = (since / (T - W)).clamp(max=1.0) if T > W else torch.ones_like(t)
            if self.decay == "poly":
                after = end + (peak - end) * torch.pow(1.0 - s, self.power)
            else:
                after = end + (peak - end) * (1.0 + torch.cos(math.pi * s)) / 2.0
        elif self.decay == "exp":
            after = peak * torch.pow(torch.full_like(t, self.gamma), since / self.steps_per_epoch)
        elif self.decay == "step":
            passed = torch.zeros_like(t)
            for m in self.milestone_steps:
                passed = passed + (t >= m).to(torch.float64)
            after = peak * torch.pow(torch.full_like(t, self.gamma), passed)
        else:
            after = torch.full_like(t, peak)
        if W == 0:
            return after
        return torch.where(t < W, peak * (t + 1.0) / W, after)

    def pack(self) -> list[float]:
        """The schedule as the flat float64 list that C++/CUDA/Triton kernels read (layout: PACKED_SLOTS)."""
        header = {"decay": DECAYS.index(self.decay), "peak_lr": self.peak_lr, "end_lr": self.end_lr,
                  "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                  "steps_per_epoch": self.steps_per_epoch, "power": self.power, "gamma": self.gamma,
                  "num_milestones": len(self.milestone_steps)}
        return [float(header[slot]) for slot in PACKED_SLOTS] + [float(m) for m in self.milestone_steps]

    def packed(self, device) -> torch.Tensor:
        """``pack()`` as a float64 tensor on ``device``, made once per device (kernels read it, never the host)."""
        device = torch.device(device)
        if device not in self._packed_cache:
            self._packed_cache[device] = torch.tensor(self.pack(), dtype=torch.float64, device=device)
        return self._packed_cache[device]

    # ------------------------------------------------------------------ plumbing
    def to_dict(self) -> dict:
        """Constructor arguments as plain Python values (what optimizer state_dicts store)."""
        return {"base_lr": self.base_lr, "base_batch_size": self.base_batch_size, "batch_size": self.batch_size,
                "base_warmup_epochs": self.base_warmup_epochs, "steps_per_epoch": self.steps_per_epoch,
                "epochs": self.epochs, "decay": self.decay, "power": self.power, "end_lr": self.end_lr,
                "gamma": self.gamma, "milestones": list(self.milestones), "scaling": self.scaling,
                "warmup_scaling": self.warmup_scaling}

    @classmethod
    def from_dict(cls, d: dict) -> "LEGW":
        return cls(**d)

    def __eq__(self, other) -> bool:
        return isinstance(other, LEGW) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in self.to_dict().items()))

    def __float__(self):
        # What reads group["lr"] as a number (torch's ReduceLROnPlateau: float(group["lr"])) meets a schedule.
        raise TypeError(f"{self!r} is a schedule, not a number: a torch LR scheduler cannot drive an optimizer whose "
                        f"lr is a LEGW (it would replace the schedule). Keep the LEGW lr alone, or give the optimizer "
                        f"a float lr and drive it by legw_fused.LEGWScheduler or the torch scheduler.")

    def __getstate__(self):
        return self.to_dict()

    def __setstate__(self, state):
        self.__init__(**state)

    def __deepcopy__(self, memo):
        return LEGW.from_dict(self.to_dict())

    def __repr__(self) -> str:
        return (f"LEGW(peak_lr={self.peak_lr:.6g}, k={self.k:g}, warmup_steps={self.warmup_steps}, "
                f"total_steps={self.total_steps}, decay={self.decay!r}, scaling={self.scaling!r}, "
                f"warmup_scaling={self.warmup_scaling!r})")


class LEGWScheduler(LRScheduler):
    """Drives any ``torch.optim`` optimizer by a LEGW schedule: ``param_group["lr"] = schedule(t)``.

    Step it once per optimizer step, as usual; the first optimizer step uses ``schedule(0)``. ``schedule`` is one
    ``LEGW`` for every param group or a sequence with one per group.
    """

    def __init__(self, optimizer, schedule, last_epoch: int = -1):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"LEGWScheduler: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        groups = optimizer.param_groups
        schedules = list(schedule) if isinstance(schedule, (list, tuple)) else [schedule] * len(groups)
        for s in schedules:
            if not isinstance(s, LEGW):
                raise TypeError(f"LEGWScheduler: schedule must be a LEGW (or one per param group), "
                                f"got {type(s).__name__}")
        if len(schedules) != len(groups):
            raise ValueError(f"LEGWScheduler: got {len(schedules)} schedules for an optimizer with "
                             f"{len(groups)} param groups; pass one LEGW or one per group")
        for i, g in enumerate(groups):
            if isinstance(g.get("lr"), LEGW):
                raise ValueError(f"LEGWScheduler: param group {i} of the optimizer is already driven by its own "
                                 f"LEGW schedule (lr={g['lr']!r}); a second scheduler would fight it. Use a float lr "
                                 f"with LEGWScheduler, or the LEGW lr without it.")
        self.schedules = schedules
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [s(self.last_epoch) for s in self.schedules]

    def state_dict(self):
        sd = super().state_dict()
        sd["schedules"] = [s.to_dict() for s in self.schedules]
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        schedules = [LEGW.from_dict(d) for d in state_dict.pop("schedules", [s.to_dict() for s in self.schedules])]
        if len(schedules) != len(self.optimizer.param_groups):
            raise ValueError(f"LEGWScheduler.load_state_dict: {len(schedules)} schedules saved for an optimizer with "
                             f"{len(self.optimizer.param_groups)} param groups")
        super().load_state_dict(state_dict)
        self.schedules = schedules
