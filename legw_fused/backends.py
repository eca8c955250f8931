"""Backends: which implementations of the optimizer step and of the LSTM layer exist, which can run here, and which
"auto" picks per device. One mechanism for both op families: a registry of ``Backend`` entries and ``select``.

Choice is explicit and explains itself: an explicit backend that cannot run raises with the stored reason, and
"auto" takes the first available backend in the registry's ``auto_order`` for the tensors' device type (with the
reason in ``auto_why`` where the order depends on the machine). Nothing falls back silently.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

from . import ops
from .ops import fused_step, fused_step_reference, lstm, lstm_reference

__all__ = ["Backend", "StepBackend", "LSTMBackend", "Registry", "STEP_BACKENDS", "LSTM_BACKENDS", "select",
           "check_backend_name", "backend_info"]

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TRITON_INTERPRET = fused_step._TRITON_INTERPRET
_TRITON_DEVICES = ("cuda", "cpu") if _TRITON_INTERPRET else ("cuda",)  # CPU tensors only in the interpreter
_INTERPRETED = " (interpreted: TRITON_INTERPRET=1)" if _TRITON_INTERPRET else ""


@dataclass(frozen=True)
class Backend:
    name: str
    device_types: tuple[str, ...] | None  # None: any device torch runs on
    dtypes: tuple[torch.dtype, ...] | None  # None: any floating-point dtype
    description: str
    reason: str | None  # why it cannot run in this process at all (decided once, at import), or None
    contiguous_only: bool = True  # the fused kernels index tensors as flat arrays

    def unavailable_reason(self, device_type: str | None = None, dtype: torch.dtype | None = None,
                           contiguous: bool = True) -> str | None:
        reason = self.reason
        if reason is None and device_type is not None and self.device_types is not None \
                and device_type not in self.device_types:
            reason = f"runs on {'/'.join(self.device_types)} tensors only, not {device_type}"
        if reason is None and dtype is not None and self.dtypes is not None and dtype not in self.dtypes:
            reason = f"supports {', '.join(str(d).removeprefix('torch.') for d in self.dtypes)} tensors, not {dtype}"
        if reason is None and not contiguous and self.contiguous_only:
            reason = "needs contiguous tensors"
        return reason


@dataclass(frozen=True)
class StepBackend(Backend):
    # fused_step_reference.step_'s signature: one optimizer step over one bucket of tensors.
    step_: Callable = None
    # sum_squares(params, grads, masters, param_sq, grad_scale) -> [2, N] per-tensor sums of squares (the local half
    # of LARS's norms for sharded params).
    sum_squares: Callable = None
    # Elements per |p|^2 cache entry (param_sq); None: the backend keeps no |p|^2 cache.
    param_sq_chunk: int | None = None


@dataclass(frozen=True)
class LSTMBackend(Backend):
    # lstm_reference.layer's signature: one layer in one direction, with autograd.
    layer: Callable = None
    # lstm_reference.cell's signature: one time step (LSTMCell), with autograd.
    cell: Callable = None


def _triton_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    return ops.EXTENSION_ERROR  # the Triton ops' schemas live in the extension


def _extension_reason(op: str, dispatch_key: str) -> str | None:
    if ops.EXTENSION_ERROR:
        return ops.EXTENSION_ERROR
    if dispatch_key == "CUDA" and not ops.WITH_CUDA:
        return "legw_fused._C was built without CUDA sources"
    if not ops.has_kernel(op, dispatch_key):
        return f"legw_fused._C has no {dispatch_key} kernel for {op} (rebuild the extension)"
    return None


def _fused(name: str, device_types: tuple[str, ...], description: str, reason: str | None, op: Callable,
           sum_squares: Callable, param_sq_chunk: int) -> StepBackend:
    """A backend over one of the fused_step_ ops, through fused_step.step_'s calling convention."""
    return StepBackend(name, device_types, FUSED_DTYPES, description, reason,
                       step_=functools.partial(fused_step.step_, op, param_sq_chunk=param_sq_chunk),
                       sum_squares=sum_squares, param_sq_chunk=param_sq_chunk)


# What was built and installed does not change while the process runs: reasons are decided here, once, which also
# keeps step() free of dispatcher queries (torch.compile traces it).
class Registry(dict):
    """The backends of one op family by name, with the order in which "auto" tries them per device type (fastest
    first; "torch" closes every list so that auto always finds a backend) and why that order. A key "<device
    type>:<dtype>" (e.g. "cpu:float64") overrides the device type's order for that dtype."""

    def __init__(self, family: str, backends: dict[str, Backend], auto_order: dict[str, tuple[str, ...]],
                 auto_why: dict[str, str] | None = None):
        super().__init__(backends)
        self.family = family
        self.auto_order = auto_order
        self.auto_why = auto_why or {}


_STEP_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}

STEP_BACKENDS: Registry = Registry("", {
    "torch": StepBackend("torch", None, None, "pure-PyTorch reference over torch._foreach_* ops", None,
                         contiguous_only=False, step_=fused_step_reference.step_,
                         sum_squares=fused_step_reference.sum_squares),
    "cpp": _fused("cpp", ("cpu",), "fused C++ CPU kernel (legw_fused._C)", _extension_reason("fused_step_", "CPU"),
                  fused_step.fused_step_, fused_step.sum_squares, fused_step.PARAM_SQ_CHUNK),
    "cuda": _fused("cuda", ("cuda",), "fused multi-tensor CUDA kernel (legw_fused._C)",
                   _extension_reason("fused_step_", "CUDA"), fused_step.fused_step_, fused_step.sum_squares,
                   fused_step.PARAM_SQ_CHUNK),
    "triton": _fused("triton", _TRITON_DEVICES, "fused multi-tensor Triton kernel" + _INTERPRETED, _triton_reason(),
                     fused_step.fused_step_triton_, fused_step.sum_squares_triton, fused_step.TRITON_PARAM_SQ_CHUNK),
}, _STEP_AUTO_ORDER)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _lstm_cpu_auto_by_capability() -> tuple[tuple[str, ...], str]:
    """The LSTM's CPU order where the C++ layer runs its per-step path (half precision, or a torch without an fp32
    brgemm): torch's own kernel first on AVX-512 CPUs, where oneDNN's LSTM beat that path (0.57x at B 128, 0.92x at
    B 1024 fwd+bwd on an AVX-512 EPYC, issue #17; bf16 0.6x at B 128), the C++ layer elsewhere (1.24x nn.LSTM on an
    AVX2 CPU, bench/results/lstm_cpu.*)."""
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    if capability.startswith("AVX512"):
        return ("native", "cpp", "torch"), (f"ATen CPU capability {capability}: torch's oneDNN LSTM beat the C++ "
                                            f"layer's per-step path on AVX-512 (0.57x at B 128)")
    return ("cpp", "native", "torch"), f"ATen CPU capability {capability}: the C++ layer (1.24x nn.LSTM on AVX2)"


def _lstm_cpu_auto() -> tuple[tuple[str, ...], str]:
    """The LSTM's CPU order for "auto" in fp32: the C++ layer's whole-sequence kernel (ops.LSTM_CPU_SEQUENCE) where it
    is built, on every instruction set; it measured LSTM_CPU_FIGURES below. Without it, by ATen's capability."""
    if not ops.LSTM_CPU_SEQUENCE:
        return _lstm_cpu_auto_by_capability()
    return ("cpp", "native", "torch"), (f"fp32 sequence kernel ({ops.LSTM_CPU_GEMM} GEMMs, {ops.LSTM_CPU_ROWS} row "
                                        f"loops): {LSTM_CPU_FIGURES}")


# bench/lstm.py, MNIST shape (T 28, I 28, H 128), C++ layer over nn.LSTM measured interleaved within each run: a
# 2-core AVX-512 EPYC (Zen 4; brgemm GEMMs; commit caf496e, four runs) and a 2-core AVX2 EPYC (Zen 3; BLAS GEMMs;
# commits 1c25c6f-f30063b, ten runs of the same layer code; 1.17-1.32x / 1.57-1.81x in eleven runs at 6aaf3f7 and
# 612e4af, before the weight gradient's GEMM changed orientation).
LSTM_CPU_FIGURES = ("1.18-1.39x / 1.77-1.83x nn.LSTM fwd+bwd at B 128 / 1024 on an AVX-512 EPYC, 1.26-1.48x / "
                    "1.69-1.94x on an AVX2 EPYC (bench/results)")


_LSTM_CPU_ORDER, _LSTM_CPU_WHY = _lstm_cpu_auto()


def _lstm_cpu_half(dtype: torch.dtype) -> tuple[tuple[str, ...], str]:
    """bf16 / fp16: where torch has no native GEMM for the dtype on this CPU (ops.LSTM_CPU_HALF_IN_FP32), its own
    LSTM takes a slow generic path and the C++ layer computes in fp32 on the sequence kernel: the C++ layer first.
    Elsewhere the C++ layer runs its per-step path in the dtype: by ATen's capability."""
    name = _dtype_name(dtype)
    if dtype in ops.LSTM_CPU_HALF_IN_FP32:
        return ("cpp", "native", "torch"), (f"no native {name} GEMM on this CPU: the C++ layer in fp32 on its "
                                            f"sequence kernel ({LSTM_CPU_HALF_FIGURES})")
    return _lstm_cpu_auto_by_capability()


# bench/lstm.py --settings mnist-bf16 on the 2-core AVX2 EPYC (Zen 3), session 15: before, the per-step path in
# bf16 measured 1.21x / 1.42x nn.LSTM fwd+bwd at B 128 / 1024 (paired; fp16 1.32x at B 128), both ~25x slower
# than fp32.
LSTM_CPU_HALF_FIGURES = ("20-22x / 19-23x nn.LSTM's bf16 fwd+bwd at B 128 / 1024 on an AVX2 EPYC, fp16 22x at B "
                         "128; within 1-2 ms of the fp32 layer")
_LSTM_CPU_HALF = {dt: _lstm_cpu_half(dt) for dt in (torch.bfloat16, torch.float16)}
# fp64 on every CPU: oneDNN has no fp64 LSTM, so torch runs its per-op reference cell there; the C++ layer measured
# 2.05x nn.LSTM fwd+bwd at torch's sine-wave shape (T 100, B 97, I 1, H 51) on the AVX-512 EPYC (bench/lstm.py,
# commit 15e4551; 2.33x at f6e8d69, 2.80x at 0f79f29, 2.03x at caf496e).
_LSTM_CPU_FP64 = ("cpp", "native", "torch"), "float64: no oneDNN LSTM; the C++ layer 2.03-2.80x nn.LSTM (B 97, H 51)"

# Without gradients (evaluation, inference), fp32: with the sequence kernel built, the C++ layer's inference op (it
# keeps no gates for a backward), else torch's kernel: the per-step path's forward always wrote the [T, B, 4H] gates
# (58 MB at B 1024) and measured 0.61x and 0.88x nn.LSTM's no-grad forward at B 1024 with oneDNN and ATen held to
# AVX2. fp64, bf16 and fp16 keep their own orders (a "cpu:<dtype>" key is looked up first).
def _lstm_cpu_no_grad() -> tuple[tuple[str, ...], str]:
    if ops.LSTM_CPU_SEQUENCE:
        return ("cpp", "native", "torch"), f"no gradients needed: the C++ inference op ({LSTM_CPU_NO_GRAD_FIGURES})"
    return ("native", "cpp", "torch"), ("no gradients needed: torch's kernel (the C++ layer's per-step forward "
                                        "keeps the gates for a backward; 0.61-0.88x nn.LSTM at B 1024)")


LSTM_CPU_NO_GRAD_FIGURES = ("1.05-1.45x / 1.27-1.80x nn.LSTM's no-grad forward at B 128 / 1024 on the AVX-512 EPYC, "
                            "1.28-1.44x / 1.56-1.98x on the AVX2 EPYC")
_LSTM_CPU_NO_GRAD = _lstm_cpu_no_grad()

LSTM_BACKENDS: Registry = Registry("LSTM ", {
    "torch": LSTMBackend("torch", None, None, "pure-PyTorch reference (autograd through torch ops)", None,
                         contiguous_only=False, layer=lstm_reference.layer, cell=lstm_reference.cell),
    "cpp": LSTMBackend("cpp", ("cpu",), FUSED_DTYPES + (torch.float64,),
                       "C++ CPU layer: fp32 sequences per batch slice (oneDNN brgemm or BLAS GEMMs), fused pointwise "
                       "kernels",
                       _extension_reason("lstm_layer_fwd", "CPU"), contiguous_only=False,
                       layer=lstm.extension_layer, cell=lstm.extension_cell),
    "cuda": LSTMBackend("cuda", ("cuda",), FUSED_DTYPES + (torch.float64,),
                        "CUDA layer: cuBLAS GEMMs + fused pointwise kernels",
                        _extension_reason("lstm_layer_fwd", "CUDA"), contiguous_only=False, layer=lstm.extension_layer,
                        cell=lstm.extension_cell),
    "native": LSTMBackend("native", None, None, "torch's own LSTM kernel (oneDNN/MKL on CPU, cuDNN on GPUs)", None,
                          contiguous_only=False, layer=lstm.native_layer, cell=lstm.native_cell),
    "triton": LSTMBackend("triton", _TRITON_DEVICES, FUSED_DTYPES,
                          "Triton: persistent whole-sequence kernel (small H) or per-step fused cell" + _INTERPRETED,
                          _triton_reason(), contiguous_only=False, layer=lstm.triton_layer, cell=lstm.triton_cell),
}, {"cuda": ("cuda", "triton", "torch"), "cpu": _LSTM_CPU_ORDER, "cpu:float64": _LSTM_CPU_FP64[0],
    "cpu:bfloat16": _LSTM_CPU_HALF[torch.bfloat16][0], "cpu:float16": _LSTM_CPU_HALF[torch.float16][0],
    "cpu:no_grad": _LSTM_CPU_NO_GRAD[0]},
    {"cpu": _LSTM_CPU_WHY, "cpu:float64": _LSTM_CPU_FP64[1], "cpu:bfloat16": _LSTM_CPU_HALF[torch.bfloat16][1],
     "cpu:float16": _LSTM_CPU_HALF[torch.float16][1], "cpu:no_grad": _LSTM_CPU_NO_GRAD[1]})

# LSTMCell (one step per call, from a Python loop): the same backends, each through its ``cell``, in their own
# order. On CPUs the C++ cell comes first on every instruction set: on the 2-core AVX-512 EPYC where the C++ layer
# loses to oneDNN's, the C++ cell measured 1.02-1.04x (MNIST, B 128 and 1024) and 1.05x (fp64, B 97, H 51)
# nn.LSTMCell forward + backward in a loop (bench/lstm.py, commit 15e4551; torch's cell has no oneDNN kernel: ATen
# ops per gate), and torch's own cell behind our module 0.96-0.98x (our Python around the same kernel). On a 2-core
# AVX2 EPYC (Zen 3) 1.12-1.19x (commit 612e4af; before it a masked load from a null pointer in the backward's row
# loop made it 0.89-0.97x there), 1.06-1.27x in four runs at 1c25c6f.
LSTM_CELL_BACKENDS: Registry = Registry("LSTM cell ", dict(LSTM_BACKENDS), {
    "cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "native", "torch")}, {
    "cpu": "the C++ cell: 1.02-1.05x nn.LSTMCell fwd+bwd in a loop on AVX-512, 1.06-1.27x on AVX2 (bench/lstm.py cell "
           "rows)"})


def check_backend_name(backend: str, registry: Registry = STEP_BACKENDS) -> str:
    if backend != "auto" and backend not in registry:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(map(repr, registry))}, got {backend!r}")
    return backend


def select(registry: Registry, backend: str, device: torch.device, dtype: torch.dtype | None = None,
           contiguous: bool = True, grad: bool = True) -> Backend:
    """The backend of ``registry`` that runs on tensors of ``device``/``dtype``; raises with the reason if an
    explicit one cannot. "auto" takes the first in the registry's auto order that can (the reference always can):
    the order of "<device>:<dtype>" if the registry has one, else of "<device>:no_grad" when no gradient will be
    taken (``grad=False``) and it has one, else of "<device>"."""
    if backend == "auto":
        order = None if dtype is None else registry.auto_order.get(f"{device.type}:{_dtype_name(dtype)}")
        if order is None and not grad:
            order = registry.auto_order.get(f"{device.type}:no_grad")
        for name in order or registry.auto_order.get(device.type, ("torch",)):
            if registry[name].unavailable_reason(device.type, dtype, contiguous) is None:
                return registry[name]
        raise AssertionError("the torch backend is always available")
    chosen = registry[check_backend_name(backend, registry)]
    reason = chosen.unavailable_reason(device.type, dtype, contiguous)
    if reason is not None:
        raise RuntimeError(f"{registry.family}backend {backend!r} cannot run on {device}"
                           f"{'' if dtype is None else f' with {dtype} tensors'}: {reason}")
    return chosen


def _describe(registry: Registry) -> dict[str, dict]:
    info: dict[str, dict] = {}
    for name, b in registry.items():
        reason = b.unavailable_reason()
        info[name] = {"available": reason is None, "reason": reason, "device_types": b.device_types or "any",
                      "dtypes": [_dtype_name(d) for d in b.dtypes] if b.dtypes else "any",
                      "description": b.description}
    def chosen(key: str) -> str:
        device, _, variant = key.partition(":")
        if variant == "no_grad":
            return select(registry, "auto", torch.device(device), grad=False).name
        return select(registry, "auto", torch.device(device), getattr(torch, variant) if variant else None).name

    info["auto"] = {key: chosen(key) for key in registry.auto_order}
    info["auto_why"] = dict(registry.auto_why)
    return info


def backend_info() -> dict[str, dict]:
    """For each optimizer-step backend: whether it can run here, on which devices, and if not why; ``"auto"``: the
    backend ``backend="auto"`` chooses per device type; ``"lstm"``: the same for the LSTM backends (and
    ``"auto_cell"``, ``"auto_cell_why"``: auto's choice for LSTMCell);
    ``"extension"``: the compiled extension and its kernels."""
    info = _describe(STEP_BACKENDS)
    info["lstm"] = _describe(LSTM_BACKENDS)
    cell = _describe(LSTM_CELL_BACKENDS)
    info["lstm"]["auto_cell"], info["lstm"]["auto_cell_why"] = cell["auto"], cell["auto_why"]
    info["extension"] = {"available": ops.EXTENSION_ERROR is None, "reason": ops.EXTENSION_ERROR,
                         "with_cuda": ops.WITH_CUDA,
                         "ops": {op: [k for k in ("CPU", "CUDA") if ops.has_kernel(op, k)]
                                 for op in ("legw_lr", "fused_step_", "sum_squares", "lstm_layer_fwd",
                                            "lstm_layer_bwd", "lstm_layer_infer")}}
    return info
