"""Drop-in ``torch.optim`` optimizers: momentum SGD and LARS, driven by a float LR or a LEGW schedule.

``SGD`` performs exactly torch.optim.SGD's update; ``LARS`` adds the layer-wise trust ratio (see
ops/fused_step_reference.py for the formulas). With ``lr=LEGW(...)`` the LR of each step is the schedule at the
optimizer's own step count, which lives on the parameters' device: no host sync and no separate scheduler.

State per parameter: ``momentum_buffer`` (torch.optim.SGD's meaning, never scaled by the LR; present when
momentum != 0) and ``step``, the optimizer's step count, one int64 tensor per device shared by the parameters on it.
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
import operator
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from . import ops
from .backends import STEP_BACKENDS, StepBackend, check_backend_name, select
from .distributed import all_reduce_sum_, any_dtensor, is_dtensor, local_tensor, sharded_norm_group, wrap_like
from .schedule import LEGW

__all__ = ["SGD", "LARS", "param_groups"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
# Complex parameters are updated as torch does, through their real views (complex32 has too few ops in torch).
_COMPLEX = (torch.complex64, torch.complex128)
# Keys torch.optim optimizers store in their param groups; those a class does not define are dropped when loading
# a torch state_dict.
_TORCH_GROUP_KEYS = ("foreach", "differentiable", "fused", "capturable", "maximize")


@dataclass(eq=False)
class _Bucket:
    """The params of one param group on one (device, dtype), and what one step needs to update them."""

    group: dict
    backend: StepBackend
    hp: dict  # the group's hyperparameters as the backend takes them
    params: list[Tensor]
    grads: list[Tensor]
    sharded: bool  # DTensor params (FSDP2): the kernels run on local shards
    norm_groups: list | None  # LARS on sharded params: per param, the process group its norm is summed over
    is_complex: bool = False  # complex params: the backends update their real views (torch.view_as_real)
    torch_sgd: bool = False  # served by torch.optim's functional SGD (sparse grads, differentiable=True)
    grads_contiguous: bool = False  # known to be: the local grads need no contiguity pass for the fused kernels
    # Set by _prepare:
    states: list[dict] = field(default_factory=list)
    momentum_buffers: list[Tensor | None] | None = None  # the states' buffers, where _prepare read them
    local_params: list[Tensor] = field(default_factory=list)
    local_grads: list[Tensor] = field(default_factory=list)
    masters: list[Tensor] | None = None
    kwargs: dict = field(default_factory=dict)
    cache_key: tuple | None = None
    param_sq: Tensor | None = None
    param_sq_cached: bool = False
    norms_sq: Tensor | None = None


def _hooked_step(step):
    """``step`` run without grad (as under torch.no_grad()), with torch.optim.Optimizer.profile_hook_step's contract
    around it: the global and per-optimizer step pre hooks (which may replace the arguments) and post hooks, and the
    ``_optimizer_step_code`` entry point of the profiler's Python tracer, with one difference: the
    ``Optimizer.step#<class>.step`` record_function range is opened only while a profiler runs (as torch's own datapipes
    do), or under torch.compile. Opening it costs 0.1 - 0.2 ms of dispatcher calls on a cold cache, a share of a CPU
    step's whole host time; torch skips the wrapping of a step marked ``hooked``. A subclass that overrides step() is
    wrapped by torch as usual, and its call of ``super().step()`` runs no hook a second time. (A subclass of a torch
    optimizer behaves so too, unless a plain instance of its parent class has been made: torch has then wrapped the
    parent's step as well, and runs the hooks twice.)"""

    no_grad_step = torch.no_grad()(step)

    def eager_step(*args, **kwargs):
        # torch.no_grad() without its context-manager objects: ~6 Python calls, 16-24 us of a cold step (116 tensors).
        enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            return step(*args, **kwargs)
        finally:
            torch._C._set_grad_enabled(enabled)

    @functools.wraps(step)
    def wrapper(*args, **kwargs):
        if type(args[0]).step is not wrapper:  # called by a subclass's own step, which torch wrapped: hooks ran
            return no_grad_step(*args, **kwargs)
        if torch.compiler.is_compiling() or torch.autograd._profiler_enabled():
            with torch.autograd.profiler.record_function(f"Optimizer.step#{type(args[0]).__name__}.step"):
                return _run_hooked(no_grad_step, args, kwargs)
        return _run_hooked(eager_step, args, kwargs)

    wrapper.hooked = True
    return wrapper


def _run_hooked(step, args: tuple, kwargs: dict):
    self = args[0]
    for pre_hook in itertools.chain(_global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values()):
        result = pre_hook(self, args, kwargs)
        if result is not None:
            if not (isinstance(result, tuple) and len(result) == 2):
                raise RuntimeError(f"{step} must return None or a tuple of (new_args, new_kwargs), but got {result}.")
            args, kwargs = result
    out = step(*args, **kwargs)
    self._optimizer_step_code()
    for post_hook in itertools.chain(self._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()):
        post_hook(self, args, kwargs)
    return out


class _MomentumOptimizer(Optimizer):
    """Shared machinery of SGD and LARS: validation, bucketing by device/dtype, step counters, state_dict."""

    _nonnegative = ("momentum", "dampening", "weight_decay")
    _flags = ("nesterov",)
    _optional_flags: tuple[str, ...] = ()  # None or a bool
    # torch.amp.GradScaler.step() then sets self.grad_scale (None if already unscaled) and self.found_inf and calls
    # step() every time: fused backends unscale while reading the grads and skip on the device when found_inf != 0.
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: dict, backend: str, cache_norms: bool = True):
        self.backend = check_backend_name(backend)
        if not isinstance(cache_norms, bool):
            raise TypeError(f"{type(self).__name__}: cache_norms must be a bool, got {cache_norms!r}")
        # As torch.optim: the hyperparameters are checked before the params (a bad lr raises whatever params are).
        self._check_group(defaults, type(self).__name__)
        _check_tensor_lr(defaults["lr"], type(self).__name__)
        self.cache_norms = cache_norms
        # LARS |p|^2 cache per (param group, device, dtype) bucket: {"tensors", "versions", "ptrs", "param_sq"}. Derived
        # data, never in the state_dict.
        self._param_sq_cache: dict[tuple, dict] = {}
        # id(param) -> the param's version counter right after the last step that updated it through its fp32
        # master: a different version at the next step means it was changed outside the optimizer.
        self._master_versions: dict[int, int] = {}
        self._step_counters: dict[torch.device, Tensor] = {}
        # Per param group: the LEGW that drives it (None: a float or tensor lr), to see a LEGW written over at step().
        self._legw_lrs: list[LEGW | None] = []
        # The groups' values (all but params) when last seen by the optimizer (add_param_group, load_state_dict, the
        # checks of step()): a refused torch LR scheduler has written into the groups before it is seen (initial_lr;
        # OneCycleLR and CyclicLR also max_lr, momentum...), and they are given back as they were.
        self._groups_seen: list[dict] = []
        self._init_memos()
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ validation
    def _where(self, where) -> str:
        return where if isinstance(where, str) else f"{type(self).__name__} (param group {where})"

    def _check_group(self, group: dict, where) -> None:
        """Raise if a group's hyperparameters break a rule; reads no tensor value (no host sync). ``where``: the
        param group's index, or the text that names it. Messages begin with torch.optim.SGD's own where it has one."""
        where = self._where(where)
        lr = group["lr"]
        if isinstance(lr, Tensor):
            if lr.numel() != 1 or not lr.is_floating_point():
                raise ValueError(f"{where}: Tensor lr must be 1-element and floating-point, got shape "
                                 f"{tuple(lr.shape)} and dtype {lr.dtype}")
        elif not isinstance(lr, LEGW):
            _check_nonnegative(where, "lr", lr, torch_name="learning rate")
        for name in self._nonnegative:
            _check_nonnegative(where, name, group[name])
        for name in self._flags + ("maximize", "master_weights"):
            if not isinstance(group[name], bool):
                raise TypeError(f"{where}: {name} must be a bool, got {group[name]!r}")
        for name in self._optional_flags:
            if group.get(name) is not None and not isinstance(group[name], bool):
                raise TypeError(f"{where}: {name} must be None or a bool, got {group[name]!r}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"{where}: Nesterov momentum requires a momentum and zero dampening: nesterov=True "
                             f"needs momentum > 0 and dampening = 0, got momentum={group['momentum']} and "
                             f"dampening={group['dampening']}")

    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        params = group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering "
                            "of tensors in sets will change between runs. Please use a list instead.")
        group["params"] = params = list(params)
        index = len(self.param_groups)
        filled = {**self.defaults, **group}
        self._check_group(filled, index)
        for i, p in enumerate(params):
            t = p[1] if isinstance(p, tuple) else p  # (name, tensor) pairs are accepted by torch
            if isinstance(t, Tensor):
                if not (t.is_floating_point() or t.dtype in _COMPLEX):
                    raise TypeError(f"{type(self).__name__} (param group {index}): parameter {i} has dtype "
                                    f"{t.dtype}; only floating-point and complex64/complex128 parameters are "
                                    f"supported")
                # A backend that cannot run on this tensor raises now rather than at the first step.
                self._backend_for(filled, t.device, _real_dtype(t.dtype), t.is_contiguous(), sparse=False)
        # A tensor lr is checked once here (one host read), never in step(), which must not sync.
        _check_tensor_lr(filled["lr"], f"{type(self).__name__} (param group {index})")
        super().add_param_group(group)
        self._legw_lrs.append(filled["lr"] if isinstance(filled["lr"], LEGW) else None)
        self._groups_seen.append(_group_values(self.param_groups[-1]))

    def _backend_for(self, group: dict, device: torch.device, dtype: torch.dtype, contiguous: bool,
                     sparse: bool) -> StepBackend:
        """The backend that runs a bucket of ``group``: ``self.backend``, narrowed by the group's ``fused`` (True:
        a fused backend, False: the reference), and the reference for sparse gradients and differentiable=True,
        which it serves through torch.optim's own functional SGD. Raises with the reason if none can."""
        key = (self.backend, group.get("fused"), group.get("differentiable", False), device, dtype, contiguous,
               sparse)
        if key not in self._backend_choices:
            self._backend_choices[key] = self._choose_backend(group, device, dtype, contiguous, sparse)
        return self._backend_choices[key]

    def _choose_backend(self, group: dict, device: torch.device, dtype: torch.dtype, contiguous: bool,
                        sparse: bool) -> StepBackend:
        where = f"{type(self).__name__} on {device} with {dtype} tensors"
        fused = group.get("fused")
        reference_only = "sparse gradients" if sparse else "differentiable=True" if group.get("differentiable") \
            else "fused=False" if fused is False else None
        if reference_only is not None:
            if self.backend not in ("auto", "torch"):
                raise RuntimeError(f"{where}: {reference_only} runs on the reference backend ('torch'), but "
                                   f"backend={self.backend!r} was asked for")
            return STEP_BACKENDS["torch"]
        if fused:
            auto = [n for n in STEP_BACKENDS.auto_order.get(device.type, ()) if n != "torch"]
            names = auto if self.backend == "auto" else [self.backend]
            reasons = {n: STEP_BACKENDS[n].unavailable_reason(device.type, dtype, contiguous) if n != "torch" else
                       "it is the reference, not a fused backend" for n in names}
            for n, reason in reasons.items():
                if reason is None:
                    return STEP_BACKENDS[n]
            why = "; ".join(f"{n}: {r}" for n, r in reasons.items()) or "no fused backend exists for this device"
            raise RuntimeError(f"{where}: fused=True needs a fused backend and none can run ({why})")
        return select(STEP_BACKENDS, self.backend, device, dtype, contiguous)

    # ------------------------------------------------------------------ schedules
    def __setattr__(self, name, value):
        # torch's LRScheduler.__init__ replaces optimizer.step by a wrapper marked _wrapped_by_lr_sched: the one
        # moment a scheduler touches the optimizer itself, before its first write to group["lr"].
        if name == "step" and getattr(value, "_wrapped_by_lr_sched", False):
            self._refuse_lr_scheduler()
        super().__setattr__(name, value)

    def _refuse_lr_scheduler(self) -> None:
        """A torch LR scheduler would write floats over LEGW lrs: refuse it, leaving the groups as they were (as
        last seen: a group edited by hand since the last step() is given back its value of then as well)."""
        driven = [i for i, g in enumerate(self.param_groups) if isinstance(g["lr"], LEGW)]
        if not driven:
            return
        for group, seen in zip(self.param_groups, self._groups_seen):
            for key in [k for k in group if k != "params"]:
                if key not in seen:
                    del group[key]
                elif group[key] is not seen[key]:
                    group[key] = seen[key]
        raise ValueError(f"{type(self).__name__}: a torch LR scheduler cannot drive param group(s) {driven}, whose "
                        f"lr is a LEGW schedule: it would overwrite the schedule with floats. The LEGW lr already "
                        f"schedules these groups on the device; to use a torch scheduler instead, give the optimizer "
                        f"a float lr (legw_fused.LEGWScheduler drives one by a LEGW)")

    def _check_legw_kept(self, group: dict, index: int) -> None:
        """Warn once per group when a float or tensor has been written over a LEGW lr (group["lr"] = ...).

        A warning, not an error: writing group["lr"] is torch.optim's documented way to set an LR by hand (an LR
        finder, fine-tuning on at a constant LR after the schedule), which an error would forbid; what must not
        happen is losing the schedule without a word. After the warning the group is driven by the new value."""
        legw = self._legw_lrs[index]
        lr = group["lr"]
        if lr is legw:
            return
        if isinstance(lr, LEGW):
            self._legw_lrs[index] = lr
            return
        if legw is not None and not self.state and lr == 0.0 and not isinstance(lr, Tensor):
            # torch.distributed.checkpoint's get_state_dict/set_state_dict make the state of a fresh optimizer with
            # one step at lr = 0.0 and then put the LEGW back: not an override.
            return
        if legw is not None:
            self._legw_lrs[index] = None
            warnings.warn(f"{type(self).__name__} (param group {index}): the group's lr was the schedule {legw!r} "
                          f"and is now {lr!r}, written over group['lr']: from this step on the LEGW schedule no "
                          f"longer drives this group. To schedule it, set group['lr'] back to a LEGW, or use a float "
                          f"lr with legw_fused.LEGWScheduler.", UserWarning, stacklevel=4)

    # ------------------------------------------------------------------ step
    def _init_memos(self) -> None:
        """What step() remembers of its last call, so that a step like the last one skips work whose answer it
        knows: derived, never in the state_dict. A step's fixed host cost is paid mostly in cache misses (the update
        before it evicts the interpreter's working set): on the 2-core EPYC the group checks and the backend choice
        took ~90 us of the host cost of a cold step with 112 tensors (~0.5 ms)."""
        # Per param group index: (group, its keys, its values, hyperparameters) when last checked.
        self._checked_groups: dict[int, tuple] = {}
        # _backend_for's answers by its arguments (the registry's backends and their availability are fixed).
        self._backend_choices: dict[tuple, StepBackend] = {}

    def _checked_hyperparameters(self, group: dict, index: int) -> dict:
        """The group's hyperparameters as the backends take them, after _check_group raised on none of them;
        checked again only when the group holds other keys or other value objects than when last checked (a float
        lr written by a scheduler is a new object: checked again). Outside torch.compile, which traces the checks."""
        if torch.compiler.is_compiling():
            self._check_group(group, index)
            return self._hyperparameters(group)
        keys, values = tuple(group), tuple(group.values())
        seen = self._checked_groups.get(index)
        if seen is not None and seen[0] is group and seen[1] == keys and all(map(operator.is_, seen[2], values)):
            return seen[3]
        self._check_group(group, index)
        hp = self._hyperparameters(group)
        self._checked_groups[index] = (group, keys, values, hp)
        return hp

    def _hyperparameters(self, group: dict) -> dict:
        return dict(momentum=group["momentum"], dampening=group["dampening"], weight_decay=group["weight_decay"],
                    nesterov=group["nesterov"], maximize=group["maximize"])

    def _counter(self, device: torch.device, value: int = 0) -> Tensor:
        """This optimizer's step count on ``device``: the number of step() calls that updated (GradScaler skips
        excluded), equal on every device. Made when first needed; torch.full launches a fill, no host copy."""
        if device not in self._step_counters:
            others = list(self._step_counters.values())
            # Copied from a device that already counts: only when parameters on a new device appear.
            self._step_counters[device] = (others[0].to(device, copy=True) if others else
                                           torch.full((), value, dtype=torch.int64, device=device))
        return self._step_counters[device]

    @_hooked_step  # runs it without grad; the hooks in the caller's grad mode, as torch's wrapper does
    def step(self, closure=None):
        """One optimizer step. ``closure`` re-evaluates the model and returns the loss, as in torch.optim.

        Phases: every check, before any tensor or state changes (_buckets); the GradScaler's verdict where it must
        be read on the host; per bucket its state, masters and |p|^2 cache (_prepare); LARS norms of sharded
        params summed over ranks (_all_reduce_norms); one backend call per bucket (_update); the step counts."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets = self._buckets()
        if not torch.compiler.is_compiling():  # host bookkeeping, kept out of compiled graphs
            self._groups_seen = [_group_values(g) for g in self.param_groups]
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if found_inf is not None and any(self._needs_host_inf_check(b) for b in buckets):
            if found_inf.item() != 0:  # one host read, only where a backend cannot skip on the device
                return loss
            found_inf = None
        if not self._step_counters:  # every step() counts, also a first one in which no parameter has a gradient
            first = next((p for g in self.param_groups for p in g["params"]), None)
            if first is not None:
                self._counter(first.device)
        # The |p|^2 cache reads tensor version counters, which torch.compile does not trace: compiled steps take
        # the uncached path (the cache is then dropped, since they write the params unseen).
        use_cache = self.cache_norms and not torch.compiler.is_compiling()
        if not use_cache:
            self._param_sq_cache.clear()
        for bucket in buckets:
            self._prepare(bucket, grad_scale, found_inf, use_cache)
        self._all_reduce_norms([b for b in buckets if any(g is not None for g in b.norm_groups or ())])
        # The last backend call on each device advances its step count, after every call has read it (a separate
        # add_ costs a CPU step ~0.1 ms on a cold cache); a step skipped for inf/NaN gradients does not advance it.
        last = {b.kwargs["step"].device: b for b in buckets}
        for bucket in buckets:
            self._update(bucket, advance_step=last[bucket.kwargs["step"].device] is bucket)
        for device, counter in self._step_counters.items():
            if device not in last:  # no parameter with a gradient there this time: counted all the same
                counter.add_(1 if found_inf is None else (_on(found_inf, device) == 0).to(torch.int64))
        return loss

    def _buckets(self) -> list[_Bucket]:
        """Every check of a step, before anything changes: the params with grads of each group, bucketed by
        (device, dtype) with the backend that will run them. Runs per parameter on every step: plain tensors in one
        C++ pass (legw_fused._C.group_params), others (DTensor, sparse grads, under torch.compile) in Python."""
        buckets = []
        for index, group in enumerate(self.param_groups):
            hp = self._checked_hyperparameters(group, index)
            self._check_legw_kept(group, index)
            grouped = None if _group_params is None or torch.compiler.is_compiling() else \
                _group_params(group["params"])
            plain = grouped is not None
            if not plain:
                grouped = self._group_params(group, index, hp)
            for device, dtype, params, grads, contiguous, grads_contiguous in grouped:
                sparse = not plain and any(g.is_sparse for g in grads)
                # DTensor (FSDP2) buckets run on local shards; plain ones skip that per-tensor plumbing.
                sharded = not plain and any_dtensor(params)
                # LARS: over which process group each param's local sums of squares add up (None: local is whole);
                # raises for placements it cannot handle, before anything changes.
                norm_groups = [sharded_norm_group(p) for p in params] if hp["lars"] and sharded else None
                backend = self._backend_for(group, device, _real_dtype(dtype), contiguous, sparse)
                torch_sgd = backend.name == "torch" and (group.get("differentiable", False) or sparse)
                buckets.append(_Bucket(group, backend, hp, params, grads, sharded, norm_groups, dtype.is_complex,
                                       torch_sgd, grads_contiguous and not sharded))
        return buckets

    def _group_params(self, group: dict, index: int, hp: dict) -> list[tuple]:
        """_C.group_params in Python, for any tensors: [(device, dtype, params, grads, contiguous,
        grads_contiguous)], the params with a grad bucketed by (device, dtype) in the order of each bucket's first
        param, and whether all of its params, and all of its grads, are contiguous. Raises for sparse grads under
        LARS."""
        params_all = group["params"]
        grads_all = [p.grad for p in params_all]
        if any(g is None for g in grads_all):
            kept = [i for i, g in enumerate(grads_all) if g is not None]
            params_all, grads_all = [params_all[i] for i in kept], [grads_all[i] for i in kept]
        if hp["lars"] and any(g.is_sparse for g in grads_all):
            p = next(p for p, g in zip(params_all, grads_all) if g.is_sparse)
            raise RuntimeError(f"{type(self).__name__} (param group {index}): sparse gradients are not "
                               f"supported by LARS (parameter of shape {tuple(p.shape)}); give the group "
                               f"lars=False to take the plain SGD step")
        # Grouped in C++ (reading p.device in Python costs ~0.3 us per parameter), in the order of their first
        # parameter: ranks must all-reduce sharded buckets' norms in one order.
        grouped = torch._C._group_tensors_by_device_and_dtype([params_all], True) if params_all else {}
        out = []
        for (device, dtype), ((params,), indices) in sorted(grouped.items(), key=lambda kv: kv[1][1][0]):
            grads = grads_all if len(indices) == len(grads_all) else [grads_all[i] for i in indices]
            out.append((device, dtype, params, grads, all(p.is_contiguous() for p in params),
                        all(g.layout == torch.strided and g.is_contiguous() for g in grads)))
        return out

    def _prepare(self, b: _Bucket, grad_scale: Tensor | None, found_inf: Tensor | None, use_cache: bool) -> None:
        """A bucket's share of the step's state: step counter, local shards, fp32 masters, |p|^2 cache."""
        device = b.params[0].device
        counter = self._counter(device)
        lr = b.group["lr"]
        b.kwargs = dict(lr=_on(lr, device) if isinstance(lr, Tensor) else lr, step=counter,
                        grad_scale=_on(grad_scale, device), found_inf=_on(found_inf, device), **b.hp)
        # State dicts (with the step count set) and momentum buffers in one C++ pass for plain tensors.
        got = None if _param_states is None or b.sharded or torch.compiler.is_compiling() else \
            _param_states(self.state, b.params, counter)
        if got is None:
            b.states = [self.state[p] for p in b.params]
            for state in b.states:
                state["step"] = counter
        else:
            b.states, b.momentum_buffers = got
        b.local_params = [local_tensor(p) for p in b.params] if b.sharded else b.params
        b.local_grads = [local_tensor(g) for g in b.grads] if b.sharded else b.grads
        if b.torch_sgd:
            b.kwargs.update(torch_sgd=True, differentiable=b.group.get("differentiable", False))
        elif b.is_complex:
            b.local_params = [torch.view_as_real(p) for p in b.local_params]
            b.local_grads = [torch.view_as_real(g) for g in b.local_grads]
        if b.backend.contiguous_only and not b.grads_contiguous:  # the fused kernels read grads as flat arrays
            b.local_grads = [g if g.is_contiguous() else g.contiguous() for g in b.local_grads]
        if b.params[0].dtype in _LOW_PRECISION:
            self._prepare_masters(b)
            b.momentum_buffers = None  # they may have been replaced
        chunk = b.backend.param_sq_chunk
        if b.hp["lars"] and use_cache and chunk is not None:
            b.cache_key = (id(b.group), device, b.params[0].dtype)
            b.param_sq, b.param_sq_cached = self._cached_param_sq(b.cache_key, b.local_params, b.masters, chunk)

    def _prepare_masters(self, b: _Bucket) -> None:
        """bf16/fp16 buckets: with master_weights, the fp32 master copies and fp32 momentum, made on first use (also
        when switched on mid-training) and made again from a param changed outside the optimizer since its last
        step (the model's load_state_dict, an edit under no_grad: the version counter moved), which the master
        would otherwise silently undo (edits through .data bump no counter and stay unseen, as by autograd).
        Without: the params (the masters' rounding) go on alone, momentum in their dtype."""
        if b.group["master_weights"]:
            seen = self._master_versions
            for p, lp, state in zip(b.params, b.local_params, b.states):
                if "master_param" not in state or seen.get(id(p), lp._version) != lp._version:
                    state["master_param"] = p.detach().float()
                if state.get("momentum_buffer") is not None and state["momentum_buffer"].dtype != torch.float32:
                    state["momentum_buffer"] = state["momentum_buffer"].float()
            b.masters = [local_tensor(s["master_param"]) if b.sharded else s["master_param"] for s in b.states]
            return
        for p, state in zip(b.params, b.states):
            if state.pop("master_param", None) is not None:
                self._master_versions.pop(id(p), None)
            buf = state.get("momentum_buffer")
            if buf is not None and buf.dtype != p.dtype:
                state["momentum_buffer"] = buf.to(p.dtype)

    def _update(self, b: _Bucket, advance_step: bool) -> None:
        """One backend call updates the bucket (and advances the step count with ``advance_step``); new momentum
        buffers and the cache's versions are recorded."""
        current = b.momentum_buffers
        if current is None:
            current = [state.get("momentum_buffer") for state in b.states]
        if b.sharded:
            current = [local_tensor(x) for x in current]
        if b.is_complex and not b.torch_sgd:
            current = [None if x is None else torch.view_as_real(x) for x in current]
        bufs = b.backend.step_(b.local_params, b.local_grads, current, masters=b.masters, norms_sq=b.norms_sq,
                               param_sq=b.param_sq, param_sq_cached=b.param_sq_cached, advance_step=advance_step,
                               **b.kwargs)
        if bufs is not current:  # new buffers were made (a backend returns the list it was given otherwise)
            for p, state, buf in zip(b.params, b.states, bufs):
                if buf is not None and state.get("momentum_buffer") is None:
                    if b.is_complex and not b.torch_sgd:
                        buf = torch.view_as_complex(buf)  # the state keeps torch's complex buffer
                    state["momentum_buffer"] = wrap_like(buf, p) if is_dtensor(p) else buf
        if b.param_sq is not None:
            entry = self._param_sq_cache[b.cache_key]
            # Written by this update: the cache holds
            entry["versions"] = _versions_after_update(entry["tensors"], entry.pop("before"))
        if b.masters is not None:
            self._master_versions.update((id(p), lp._version) for p, lp in zip(b.params, b.local_params))

    # ------------------------------------------------------------------ LARS norms
    def _cached_param_sq(self, key, local_params: list[Tensor], masters, chunk: int) -> tuple[Tensor, bool]:
        """The bucket's |p|^2 cache (chunk sums of squares written by its last update) and whether it still holds
        for the params: the same tensors, none changed since (version counters; the masters' when the update runs
        on them), none given new storage (``p.data = t`` keeps the counter), and not cleared by load_state_dict.
        In-place edits through ``.data`` move no counter: unseen here as by autograd (edit under torch.no_grad()).
        """
        entry = self._param_sq_cache.get(key)
        targets = masters or local_params
        versions, ptrs = _versions(targets, True)
        valid = entry is not None and entry["versions"] == versions and entry["ptrs"] == ptrs and \
            len(entry["tensors"]) == len(targets) and all(map(operator.is_, entry["tensors"], targets))
        if not valid:
            n_chunks = sum(-(-t.numel() // chunk) for t in targets)
            entry = {"tensors": list(targets), "versions": None, "ptrs": ptrs,
                     "param_sq": torch.zeros(n_chunks, dtype=torch.float32, device=targets[0].device)}
            self._param_sq_cache[key] = entry
        entry["before"] = versions  # before this step's update (_update records the versions after it)
        return entry["param_sq"], valid

    def _all_reduce_norms(self, buckets: list[_Bucket]) -> None:
        """Whole-tensor LARS norms for buckets holding sharded params: the local sums of squares of every such
        bucket in one buffer, one all-reduce per process group (one per step under FSDP2), then each bucket's
        [2, N] norms; replicated and plain params keep their local sums (counted once, not once per rank)."""
        if not buckets:
            return
        for b in buckets:
            b.norms_sq = b.backend.sum_squares(b.local_params, b.local_grads, b.masters or [],
                                               b.param_sq if b.param_sq_cached else None, b.kwargs["grad_scale"])
            b.param_sq_cached = False  # read by sum_squares; the update only writes the new chunk sums
        by_group: dict = {}  # process group -> [(bucket, indices of its tensors sharded over that group)]
        for b in buckets:
            per_bucket: dict = {}
            for i, pg in enumerate(b.norm_groups):
                if pg is not None:
                    per_bucket.setdefault(pg, []).append(i)
            for pg, idx in per_bucket.items():
                by_group.setdefault(pg, []).append((b, None if len(idx) == len(b.norm_groups) else idx))
        for pg, entries in by_group.items():
            # Float64 on the wire: the buckets may mix dtypes (the reference gives fp64 for fp64 params).
            pieces = [(b.norms_sq if idx is None else b.norms_sq[:, idx]).double() for b, idx in entries]
            flat = torch.cat([x.flatten() for x in pieces])
            all_reduce_sum_(flat, pg)
            offset = 0
            for (b, idx), piece in zip(entries, pieces):
                summed = flat[offset:offset + piece.numel()].view(piece.shape).to(b.norms_sq.dtype)
                offset += piece.numel()
                if idx is None:
                    b.norms_sq = summed
                else:
                    b.norms_sq[:, idx] = summed

    def _needs_host_inf_check(self, b: _Bucket) -> bool:
        """Whether a skipped step must be known on the host: the reference backend cannot skip on the device, and a
        momentum buffer started under dampening != 0 would be wrong if its first update were skipped (a zero
        buffer continued with m*0 + (1-dampening)*d is not torch's buf = d)."""
        if b.backend.name == "torch":
            return True
        return b.group["momentum"] != 0 and b.group["dampening"] != 0 and \
            any("momentum_buffer" not in self.state.get(p, ()) for p in b.params)

    def current_lrs(self) -> list:
        """The LR the next step will use, per param group: a float, or a device tensor for LEGW (no host sync)."""
        out = []
        for group in self.param_groups:
            lr = group["lr"]
            if isinstance(lr, LEGW):
                device = group["params"][0].device if group["params"] else torch.device("cpu")
                lr = lr.lr_tensor(self._counter(device))
            out.append(lr)
        return out

    # ------------------------------------------------------------------ state_dict
    def state_dict(self) -> dict:
        sd = super().state_dict()
        for g in sd["param_groups"]:
            if isinstance(g["lr"], LEGW):
                # Plain values, so torch.load(weights_only=True) reads the checkpoint without our classes.
                g["lr"] = {"legw": g["lr"].to_dict()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load our own state_dict or torch.optim.SGD's; everything is checked before anything changes."""
        checked, t = self._checked_state_dict(state_dict)
        # torch's loader casts state tensors to the parameter's dtype; fp32 masters and their momentum stay fp32.
        id_to_param = {i: p for saved, g in zip(checked["param_groups"], self.param_groups)
                       for i, p in zip(saved["params"], g["params"])}
        fp32_state = {id_to_param[k]: {key: v for key, v in st.items()
                                       if key in ("master_param", "momentum_buffer") and isinstance(v, Tensor)}
                      for k, st in checked["state"].items() if "master_param" in st and k in id_to_param}
        super().load_state_dict(checked)
        self._param_sq_cache.clear()  # masters may have been replaced; params are usually loaded alongside
        self._master_versions.clear()  # loaded masters are the truth, whatever happened to the params
        for group in self.param_groups:  # a state_dict of torch.optim.SGD or of an older version lacks some keys
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self._track_groups()
        for p, saved in fp32_state.items():
            for key, value in saved.items():
                self.state[p][key] = value.to(device=p.device, dtype=torch.float32, copy=True)
        self._link_step_counters(t)

    def _link_step_counters(self, t: int) -> None:
        """One counter per device holding ``t``, shared by the state of every parameter on it."""
        self._step_counters = {}
        for group in self.param_groups:
            for p in group["params"]:
                counter = self._counter(p.device, t)
                if p in self.state:
                    self.state[p]["step"] = counter

    def _checked_state_dict(self, state_dict: dict) -> tuple[dict, int]:
        """The state_dict made loadable, and its step count; raises on anything wrong, changing nothing."""
        name = type(self).__name__
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError(f"{name}.load_state_dict: expected a dict with 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{name}.load_state_dict: the state_dict has {len(saved_groups)} param groups, the "
                             f"optimizer {len(self.param_groups)}")
        groups, id_to_param = [], {}
        for index, (saved, current) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(current["params"]):
                raise ValueError(f"{name}.load_state_dict: param group {index} holds {len(saved['params'])} "
                                 f"params in the state_dict and {len(current['params'])} in the optimizer")
            group = dict(saved)
            for key in _TORCH_GROUP_KEYS:
                if key not in self.defaults:
                    group.pop(key, None)
            if isinstance(group.get("lr"), dict) and "legw" in group["lr"]:
                group["lr"] = LEGW.from_dict(group["lr"]["legw"])
            self._check_group({**self.defaults, **group}, index)
            groups.append(group)
            id_to_param.update(zip(saved["params"], current["params"]))
        steps = []
        for key, state in state_dict["state"].items():
            param = id_to_param.get(key)
            for key_name in ("momentum_buffer", "master_param"):
                value = state.get(key_name)
                if value is not None and not isinstance(value, Tensor):
                    raise ValueError(f"{name}.load_state_dict: {key_name} of parameter {key} must be a tensor, got "
                                     f"{type(value).__name__}")
                if param is not None and value is not None and tuple(value.shape) != tuple(param.shape):
                    raise ValueError(f"{name}.load_state_dict: {key_name} of parameter {key} has shape "
                                     f"{tuple(value.shape)} but the parameter has shape {tuple(param.shape)}")
            if state.get("step") is not None:
                steps.append(_checked_step(name, key, state["step"]))
        # The step count is the largest one saved (all equal when we saved it); torch.optim.SGD saves none: 0.
        return {**state_dict, "param_groups": groups}, max(steps, default=0)

    def _track_groups(self) -> None:
        """After the groups were replaced (load_state_dict, unpickling): which LEGW drives each group, and their
        values (see _legw_lrs, _groups_seen)."""
        self._legw_lrs = [g["lr"] if isinstance(g["lr"], LEGW) else None for g in self.param_groups]
        self._groups_seen = [_group_values(g) for g in self.param_groups]

    # copy.deepcopy / pickle: torch.optim.Optimizer keeps only defaults, state and param_groups.
    def __getstate__(self):
        return {**super().__getstate__(), "backend": self.backend, "cache_norms": self.cache_norms}

    def __setstate__(self, state):
        # torch's __setstate__ adds "differentiable" to the defaults of every optimizer; ours keep the keys their
        # constructor defines, since load_state_dict fills every group from them (a state_dict must load as saved).
        defaults = dict(state["defaults"] if "defaults" in state else self.defaults)
        super().__setstate__(state)
        self.defaults = defaults
        if "_step_counters" not in self.__dict__:  # unpickled, not load_state_dict's internal call
            self.backend = state.get("backend", "auto")
            self.cache_norms = state.get("cache_norms", True)
            self._param_sq_cache = {}
            self._master_versions = {}
            self._init_memos()
            t = max((int(s["step"]) for s in self.state.values() if s.get("step") is not None), default=0)
            self._link_step_counters(t)
            self._track_groups()


def _on(t: Tensor | None, device: torch.device) -> Tensor | None:
    # Asynchronous only host -> device: CPU kernels read their copy at once, so a device -> host copy must complete.
    return t if t is None or t.device == device else t.to(device, non_blocking=t.device.type == "cpu")


def _checked_step(name: str, key, step) -> int:
    value = step.item() if isinstance(step, Tensor) and step.numel() == 1 else step
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0 \
        and value == int(value)
    if not ok:
        raise ValueError(f"{name}.load_state_dict: step of parameter {key} must be one integer >= 0, got {step!r}")
    return int(value)


def _check_nonnegative(where: str, name: str, value, torch_name: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {name} must be a real number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: Invalid {torch_name or name + ' value'}: {value}; {name} must be a finite number "
                         f">= 0")


def _check_tensor_lr(lr, where: str) -> None:
    """The value of a tensor lr (one host read: at construction and add_param_group only, never in step())."""
    if isinstance(lr, Tensor):
        value = lr.item()
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{where}: Invalid learning rate: {value}; lr must be a finite number >= 0")


def _group_values(group: dict) -> dict:
    return {k: v for k, v in group.items() if k != "params"}


# The step's per-parameter bucketing in C++ (csrc/step_python.cpp); None without the extension.
_group_params = getattr(ops._C, "group_params", None)

# The |p|^2 cache's per-tensor reads (it is never used under torch.compile, which cannot trace these): in one C++
# pass for plain tensors (csrc/step_python.cpp), else mapped over the getters.
_tensor_versions = getattr(ops._C, "tensor_versions", None)
_param_states = getattr(ops._C, "param_states", None)
_version = operator.attrgetter("_version")


def _versions(tensors: list[Tensor], data_ptrs: bool = False) -> tuple[list[int], list[int] | None]:
    """The version counters of ``tensors`` (and their data pointers, with ``data_ptrs``)."""
    got = None if _tensor_versions is None else _tensor_versions(tensors, data_ptrs)
    if got is None:
        got = list(map(_version, tensors)), list(map(Tensor.data_ptr, tensors)) if data_ptrs else None
    return got


def _versions_after_update(tensors: list[Tensor], before: list[int]) -> list[int]:
    """The version counters of ``tensors`` right after a fused_step_ update wrote them, which bumps each once:
    ``before`` + 1, read back where the first tensor's was not bumped so (a step dispatched below ADInplaceOrView
    bumps nothing). One read instead of one per tensor, each a cache miss after the update's memory traffic (~50
    us for 112 tensors on the 2-core EPYC). A tensor bumped twice (views of one base share a counter) is then
    recorded one short: its cache entry is found stale at the next step and rebuilt, never wrongly kept."""
    if tensors and tensors[0]._version == before[0] + 1:
        return [v + 1 for v in before]
    return _versions(tensors)[0]


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the backends compute a parameter in: complex ones are updated through torch.view_as_real."""
    return dtype.to_real() if dtype.is_complex else dtype


class SGD(_MomentumOptimizer):
    """torch.optim.SGD with the same signature and update; ``lr`` is a float, a tensor or a ``LEGW`` schedule.

    ``maximize``, complex parameters (updated through their real views, the momentum buffer stays complex),
    sparse gradients and ``differentiable=True`` as in torch.optim.SGD; the last two are served by the reference
    backend through torch.optim's own functional SGD (a LEGW lr is then read on the host).

    ``fused``: None (default) lets ``backend`` choose; True requires a fused backend (cpp, cuda, triton) for every
    parameter and raises if none can run; False runs the reference backend ("torch"). ``foreach`` is accepted for
    torch's signature and has no effect: every backend is multi-tensor (the reference over torch._foreach_* ops).

    ``master_weights=True``: bf16/fp16 parameters are updated through an fp32 copy (state ``master_param``) with an
    fp32 momentum buffer, and receive its rounding; fp32 parameters are unaffected. A parameter changed outside the
    optimizer (version counter moved) gets a new master made from it at the next step.

    ``backend``: "auto" (fastest available for the params' device), or one of ``legw_fused.backend_info()``.
    A ``lars`` key in param groups (from ``param_groups()``) is ignored by SGD.
    """

    _flags = _MomentumOptimizer._flags + ("differentiable",)
    _optional_flags = ("foreach", "fused")

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None, backend="auto",
                 master_weights=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize, foreach=foreach,
                                      differentiable=differentiable, fused=fused, master_weights=master_weights),
                         backend)

    def _check_group(self, group: dict, where) -> None:
        super()._check_group(group, where)
        if group["fused"]:  # torch.optim.SGD's errors, word for word
            if group["differentiable"]:
                raise RuntimeError("`fused` does not support `differentiable`")
            if group["foreach"]:
                raise RuntimeError("`fused` and `foreach` cannot be `True` together.")

    def _hyperparameters(self, group: dict) -> dict:
        return {**super()._hyperparameters(group), "lars": False}


class LARS(_MomentumOptimizer):
    """LARS: SGD whose per-tensor step is scaled by the trust ratio tc*|p| / (|g| + wd*|p| + eps).

    Param groups may carry ``lars`` (default True); ``lars=False`` groups (biases, norms) take the plain SGD step.
    ``max_trust_ratio`` (None: off) clamps the ratio from above; with ``trust_clip=True`` the ratio then becomes
    min(ratio / lr, 1) (LARC's clip mode). ``maximize`` as in torch.optim.SGD. Equals timm's ``Lars`` with
    ``always_adapt=True``.

    ``cache_norms`` (fused backends): the update that writes p_{t+1} also sums its squares, so the next step's norm
    pass reads only the grads (24 instead of 28 bytes per fp32 element). The cache is dropped when a parameter (or
    its fp32 master) is changed by anything else (its version counter moves, or ``p.data = t`` gives it new
    storage), on load_state_dict, and in steps traced by torch.compile. A GradScaler-skipped step leaves it valid.
    In-place edits through ``p.data`` are not seen (nor by autograd): edit under torch.no_grad() instead.

    DTensor parameters (FSDP2 ``fully_shard``): the kernels run on the local shards and the norms of sharded
    parameters are summed over their ranks with one all-reduce per step (see legw_fused.distributed).
    """

    _nonnegative = _MomentumOptimizer._nonnegative + ("trust_coefficient", "eps")
    _flags = _MomentumOptimizer._flags + ("lars", "trust_clip")

    def __init__(self, params, lr, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
                 trust_coefficient=0.001, eps=1e-8, trust_clip=False, *, max_trust_ratio=None, maximize=False,
                 backend="auto", master_weights=False, cache_norms=True):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize, lars=True,
                                      trust_coefficient=trust_coefficient, eps=eps, trust_clip=trust_clip,
                                      max_trust_ratio=max_trust_ratio, master_weights=master_weights),
                         backend, cache_norms)

    def _check_group(self, group: dict, where) -> None:
        super()._check_group(group, where)
        cap = group["max_trust_ratio"]
        if cap is not None:
            if isinstance(cap, bool) or not isinstance(cap, numbers.Real):
                raise TypeError(f"{self._where(where)}: max_trust_ratio must be None or a real number, got {cap!r}")
            if not cap > 0:  # also NaN; +inf is allowed and means no clamp, as None
                raise ValueError(f"{self._where(where)}: max_trust_ratio must be > 0 (or None: no clamp), got {cap}")

    def _hyperparameters(self, group: dict) -> dict:
        return {**super()._hyperparameters(group), "lars": group["lars"],
                "trust_coefficient": group["trust_coefficient"], "eps": group["eps"],
                "trust_clip": group["trust_clip"], "max_trust_ratio": group["max_trust_ratio"]}


# Modules whose parameters are normalisation scales and shifts: no weight decay and no LARS adaptation, whatever
# their shape (a LayerNorm over (C, H) has a 2-D weight). _NormBase covers BatchNorm*, SyncBatchNorm, InstanceNorm*.
NORM_MODULES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.CrossMapLRN2d,
                nn.RMSNorm)


def _is_bias(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf == "bias" or leaf.startswith("bias_") or leaf.endswith("_bias")  # bias_ih_l0, in_proj_bias


def param_groups(model: nn.Module, weight_decay: float, exclude_bias_and_norm: bool = True, *,
                 exclude=None) -> list[dict]:
    """Param groups for SGD/LARS: ``{"weight_decay": weight_decay, "lars": True}`` for the adapted parameters and
    ``{"weight_decay": 0.0, "lars": False}`` for the excluded ones (the filter of the LARS reference codes, used
    both as weight-decay filter and as LARS-adaptation filter). Frozen parameters are left out; a parameter shared
    by several modules appears once.

    Excluded with ``exclude_bias_and_norm``: parameters of normalisation layers (``NORM_MODULES``, by module type),
    biases (by name: ``bias``, ``bias_*``, ``*_bias``) and every parameter with ndim <= 1. Also excluded: those
    for which ``exclude(name, param)`` is True (``name`` as in ``model.named_parameters()``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups: model must be a torch.nn.Module, got {type(model).__name__}")
    _check_nonnegative("param_groups", "weight_decay", weight_decay)
    if exclude is not None and not callable(exclude):
        raise TypeError(f"param_groups: exclude must be None or a callable (name, param) -> bool, got {exclude!r}")
    adapted, plain, seen = [], [], set()
    for module_name, module in model.named_modules():
        in_norm = isinstance(module, NORM_MODULES)
        for leaf, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            name = f"{module_name}.{leaf}" if module_name else leaf
            excluded = exclude_bias_and_norm and (in_norm or _is_bias(name) or p.ndim <= 1)
            (plain if excluded or (exclude is not None and exclude(name, p)) else adapted).append(p)
    groups = []
    if adapted:
        groups.append({"params": adapted, "weight_decay": weight_decay, "lars": True})
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0, "lars": False})
    return groups
