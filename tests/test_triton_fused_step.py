"""Host-side facts of the Triton step kernels that the numbers alone do not show: which compiled variant each launch
asks for (a CUDA graph captured after one warm-up step replays the variants of that step), the aligned fast path's
choice, and the packed-schedule slots the kernels read. Run in the interpreter here, as compiled on a GPU."""

import inspect

import pytest
import torch
from test_fused_step import LRS, make

from _helpers import assert_close_to_reference, require_backend
from legw_fused.schedule import PACKED_SLOTS


@pytest.fixture
def kernels():
    require_backend("triton")
    from legw_fused.kernels import fused_step

    return fused_step


def _do_not_specialize(kernel) -> set:
    """Names of the kernel's run-time arguments that Triton does not specialise on (JITFunction or, under
    TRITON_INTERPRET=1, InterpretedFunction)."""
    names = list(inspect.signature(kernel.fn).parameters)
    listed = getattr(kernel, "do_not_specialize", None) or kernel.kwargs.get("do_not_specialize") or ()
    return {names[x] if isinstance(x, int) else x for x in listed}


def _variant(kernel, args, kwargs) -> tuple:
    """What Triton's JIT keys a compiled variant on: constexpr values, the type of each argument, pointer alignment
    to 16 bytes, and for integers not listed in do_not_specialize whether they equal 1 or divide by 16."""
    params = inspect.signature(kernel.fn).parameters
    bound = dict(zip(params, args)) | kwargs
    fixed = _do_not_specialize(kernel)
    key = []
    for name, param in params.items():
        value = bound[name]
        if "constexpr" in str(param.annotation):
            key.append((name, repr(value)))
        elif isinstance(value, torch.Tensor):
            key.append((name, value.dtype, value.data_ptr() % 16 == 0))
        elif isinstance(value, bool):
            key.append((name, "i1"))
        elif isinstance(value, int):
            width = "i32" if -2**31 <= value < 2**31 else "i64"
            key.append((name, width) if name in fixed else (name, width, value == 1, value % 16 == 0))
        else:
            key.append((name, type(value).__name__))
    return tuple(key)


@pytest.fixture
def launches(kernels, monkeypatch):
    """Every launch of the step kernels as (kernel name, variant key), in order."""
    seen = []
    for name in ("_sum_squares_kernel", "_trust_ratio_kernel", "_fused_step_kernel"):
        kernel = getattr(kernels, name)

        def run(*args, _kernel=kernel, _run=kernel.run, **kwargs):
            launch_kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
            seen.append((_kernel.fn.__name__, _variant(_kernel, args, launch_kwargs)))
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run)
    return seen


def _step_variants(opt, params, launches, steps, gen):
    per_step = []
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        launches.clear()
        opt.step()
        per_step.append(list(launches))
    return per_step


@pytest.mark.parametrize("kind,cfg", [
    ("sgd", dict(momentum=0.9, weight_decay=1e-4)),
    ("sgd", dict(momentum=0.0)),
    ("lars", dict(momentum=0.9, weight_decay=1e-4, trust_clip=True)),
    ("lars", dict(momentum=0.9, weight_decay=1e-4, cache_norms=False)),
], ids=["sgd-momentum", "sgd-plain", "lars-cached", "lars-uncached"])
def test_kernel_variants_are_those_of_the_first_step(launches, kind, cfg):
    """The first step (new momentum buffers, |p|^2 cache not yet filled) launches the variants of every later step:
    a graph captured after one warm-up step needs no compile and replays what the warm-up ran."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(7,), (40000,), (3, 5)]]
    opt = make(kind, params, LRS["legw-lr"], "triton", cfg)
    first, *later = _step_variants(opt, params, launches, 3, gen)
    expected = ["_sum_squares_kernel", "_trust_ratio_kernel"] if kind == "lars" else []
    assert [name for name, _ in first] == expected + ["_fused_step_kernel"]
    for step, variants in enumerate(later, start=2):
        assert variants == first, f"step {step} launches other variants than step 1"


def test_variant_key_sees_a_changed_flag(kernels, launches):
    """The recorder itself: a constexpr that changes (momentum on/off) gives another key."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(9, generator=gen))]
    keys = []
    for momentum in (0.0, 0.9):
        _step_variants(make("sgd", params, 0.1, "triton", dict(momentum=momentum)), params, launches, 1, gen)
        keys.append(launches[-1])
    assert keys[0][0] == keys[1][0] and keys[0][1] != keys[1][1]


def test_unaligned_tensors_take_the_unhinted_path(kernels, launches):
    """Tensors 4 bytes past a 16-byte boundary must not be launched with the 128-bit hints (a misaligned vector
    access faults on the GPU); the results still match the reference."""
    gen = torch.Generator().manual_seed(3)
    storage = [torch.randn(n + 1, generator=gen) for n in (5, 20001)]
    a = [torch.nn.Parameter(s[1:]) for s in storage]  # data_ptr() 4 bytes past the allocation
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    assert all(p.data_ptr() % 16 == 4 for p in a)
    cfg = dict(momentum=0.9, weight_decay=1e-4)
    fused, ref = make("lars", a, 0.1, "triton", cfg), make("lars", b, 0.1, "torch", cfg)
    for _ in range(3):
        for pa, pb in zip(a, b):
            g = torch.randn(pa.shape, generator=gen)
            pa.grad, pb.grad = g.clone(), g.clone()
        launches.clear()
        fused.step()
        ref.step()
        for pa, pb in zip(a, b):
            assert_close_to_reference(pa.detach(), pb.detach(), torch.float32)
    update = [key for name, key in launches if name == "_fused_step_kernel"][0]
    assert ("ALIGNED", "False") in update


def test_aligned_tensors_take_the_hinted_path(kernels, launches):
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (5, 20001)]
    _step_variants(make("sgd", params, 0.1, "triton", dict(momentum=0.9)), params, launches, 1, gen)
    assert ("ALIGNED", "True") in launches[-1][1]


def test_schedule_slots_are_packed_slots(kernels):
    """The kernels read the packed schedule through named slots: they must be PACKED_SLOTS' positions, milestones
    right after."""
    slots = [getattr(kernels, f"SLOT_{name.upper()}").value for name in PACKED_SLOTS]
    assert slots == list(range(len(PACKED_SLOTS)))
    assert kernels.SLOT_MILESTONES.value == len(PACKED_SLOTS)
