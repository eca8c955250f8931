"""LSTM benchmark: legw_fused.LSTM backends against torch's LSTM paths, in one run.

    python -m legw_fused.bench.lstm --device cpu                       # MNIST-LSTM shape (B 128, 1024), sine
    python -m legw_fused.bench.lstm --device cuda                      # all settings below
    python -m legw_fused.bench.lstm --device cuda --settings mnist --batches 64 8192
    python -m legw_fused.bench.lstm --device cpu --settings mnist-bf16 --reps 5     # bf16, where CPUs lack it

Providers (same weights, same input): ours per backend; nn.LSTM (cuDNN on GPUs, ATen's CPU kernels on CPUs);
nn.LSTM with cuDNN disabled (torch's native fused cell, GPU only); a loop of nn.LSTMCell, and the same loop of
legw_fused.LSTMCell per backend (also reported against the nn.LSTMCell loop); the plain unfused PyTorch
cell (legw_fused.functional.lstm_layer_reference); FlashRNN if it is installed. Each runs forward only and
forward + backward (gradients of the input and all weights). Reported: median ms, achieved TFLOP/s at
8·T·B·H·(I + H) FLOP forward (x3 for forward + backward), speedup over nn.LSTM. JSON and Markdown go to
bench/results/lstm_<device>.{json,md} with device, versions and commit.
"""

from __future__ import annotations

import argparse
import importlib.util

import torch
from torch import nn

import legw_fused
from legw_fused.backends import LSTM_BACKENDS, LSTM_CELL_BACKENDS
from legw_fused.bench.harness import add_common_args, cpu_times_ms, cuda_times_ms, describe, metadata, write_results
from legw_fused.ops.lstm_reference import layer as lstm_layer_reference

# (T, I, H, dtype, batch sizes): the paper's MNIST-LSTM, a PTB-style word LM (input = embedding = hidden), and
# FlashRNN's published setting.
SETTINGS = {
    "mnist": (28, 28, 128, torch.float32, (128, 1024, 8192)),
    "ptb-650": (35, 650, 650, torch.float32, (20, 80, 640)),
    "ptb-1500": (35, 1500, 1500, torch.float32, (20, 80, 640)),
    "flashrnn": (1024, 768, 768, torch.bfloat16, (16,)),
    # The MNIST shape in bf16: on CPUs without bf16 instructions torch's bf16 GEMMs take a slow generic path (there
    # the C++ layer computes in fp32: ops.LSTM_CPU_HALF_IN_FP32). Not in the CPU default: nn.LSTM takes ~1 s a call.
    "mnist-bf16": (28, 28, 128, torch.bfloat16, (128, 1024)),
    # torch's time-sequence-prediction example (sine waves, float64, LSTMCell loops), on 100 of its 999 steps.
    "sine": (100, 1, 51, torch.float64, (97,)),
}
CPU_DEFAULT = {"mnist": (128, 1024), "sine": (97,)}
CELL_BASELINE = "nn.LSTMCell loop"


def flops(T: int, B: int, I: int, H: int, backward: bool) -> float:
    fwd = 8.0 * T * B * H * (I + H)  # 2·B·(I+H)·4H per step
    return 3 * fwd if backward else fwd


class _CellLoop(nn.Module):
    """An LSTMCell called once per step from Python: what many hand-written training loops do (nn.LSTMCell, or
    legw_fused.LSTMCell with ``backend``)."""

    def __init__(self, lstm: nn.LSTM, backend: str | None = None):
        super().__init__()
        kwargs = dict(device=lstm.weight_ih_l0.device, dtype=lstm.weight_ih_l0.dtype)
        self.cell = (nn.LSTMCell(lstm.input_size, lstm.hidden_size, **kwargs) if backend is None else
                     legw_fused.LSTMCell(lstm.input_size, lstm.hidden_size, **kwargs, backend=backend))
        self.cell.load_state_dict({k.removesuffix("_l0"): v for k, v in lstm.state_dict().items()})

    def forward(self, x):
        h = c = x.new_zeros(x.shape[1], self.cell.hidden_size)
        outs = []
        for t in range(x.shape[0]):
            h, c = self.cell(x[t], (h, c))
            outs.append(h)
        return torch.stack(outs)


class _Unfused(nn.Module):
    """The readable reference cell: separate torch ops for every gate (legw_fused.functional)."""

    def __init__(self, lstm: nn.LSTM):
        super().__init__()
        self.lstm = lstm

    def forward(self, x):
        m = self.lstm
        z = x.new_zeros(x.shape[1], m.hidden_size)
        return lstm_layer_reference(x, z, z, m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0)[0]


def providers(device: torch.device, I: int, H: int, dtype: torch.dtype):
    """(name, module) pairs sharing one set of weights; the first is the baseline (nn.LSTM)."""
    torch.manual_seed(0)
    base = nn.LSTM(I, H, device=device, dtype=dtype)
    out = [("nn.LSTM" + (" (cuDNN)" if device.type == "cuda" else ""), base)]
    if device.type == "cuda":
        out.append(("nn.LSTM, cuDNN off (native cell)", base))
    # Every fused backend the device can run, and "auto" (which may be torch's own kernel: native).
    for name in LSTM_BACKENDS.auto_order.get(device.type, ()) + ("auto",):
        if name not in ("torch", "native") and (name == "auto" or
                                               LSTM_BACKENDS[name].unavailable_reason(device.type, dtype) is None):
            ours = legw_fused.LSTM(I, H, device=device, dtype=dtype, backend=name)
            ours.load_state_dict(base.state_dict())
            out.append((f"legw_fused.LSTM [{name}]", ours))
    out.append((CELL_BASELINE, _CellLoop(base)))
    # legw_fused.LSTMCell in the same loop: "auto" and every fused backend the device can run.
    for name in ("auto",) + tuple(n for n in LSTM_CELL_BACKENDS.auto_order.get(device.type, ())
                                  if n not in ("torch", "native")):
        if name == "auto" or LSTM_CELL_BACKENDS[name].unavailable_reason(device.type, dtype) is None:
            out.append((f"legw_fused.LSTMCell loop [{name}]", _CellLoop(base, name)))
    out.append(("unfused PyTorch cell", _Unfused(base)))
    if device.type == "cuda" and importlib.util.find_spec("flashrnn") is not None:
        out.append(("FlashRNN", _flashrnn(base)))
    return out


def _flashrnn(base: nn.LSTM):
    import flashrnn  # optional; its API takes [B, T, 4H] gate preactivations

    class _Flash(nn.Module):
        def forward(self, x):
            xw = (x @ base.weight_ih_l0.t() + base.bias_ih_l0 + base.bias_hh_l0).transpose(0, 1)
            return flashrnn.flashrnn(xw.unsqueeze(2), base.weight_hh_l0, function="lstm")[0]
    return _Flash()


def _call(module, x, backward: bool):
    """A callable running one forward (under no_grad) or forward + backward of ``module`` on ``x``."""
    def forward():
        out = module(x)
        return out[0] if isinstance(out, tuple) else out

    if not backward:
        def run_fwd():
            with torch.no_grad():
                forward()
        return run_fwd
    with torch.no_grad():
        grad = torch.randn_like(forward())

    def run_fwd_bwd():
        x.grad = None
        for p in module.parameters():
            p.grad = None
        forward().backward(grad)
    return run_fwd_bwd


def run_setting(name: str, device: torch.device, batches, warmup: int, reps: int) -> list[dict]:
    T, I, H, dtype, default_batches = SETTINGS[name]
    rows = []
    for B in batches or default_batches:
        provs = providers(device, I, H, dtype)
        for backward in (False, True):
            x = torch.randn(T, B, I, device=device, dtype=dtype, requires_grad=backward)
            fns = [_call(_CudnnOff(m) if p.startswith("nn.LSTM, cuDNN off") else m, x, backward) for p, m in provs]
            if device.type == "cuda":
                times = [cuda_times_ms(fn, warmup, reps) for fn in fns]
            else:
                times = cpu_times_ms(fns, warmup, reps)
            base = times[0]["ms"]
            cell_base = next(t["ms"] for (pname, _), t in zip(provs, times) if pname == CELL_BASELINE)
            for (pname, _), t in zip(provs, times):
                ms = t["ms"]
                rows.append({"setting": name, "T": T, "I": I, "H": H, "B": B, "dtype": str(dtype).removeprefix(
                    "torch."), "pass": "fwd+bwd" if backward else "fwd", "provider": pname, **t,
                    "TFLOPs": flops(T, B, I, H, backward) / (ms * 1e-3) / 1e12, "vs_nn_LSTM": base / ms,
                    # cell loops also against nn.LSTMCell's loop: what a script using LSTMCell would switch from
                    "vs_nn_LSTMCell": cell_base / ms if "LSTMCell loop" in pname else None})
    return rows


class _CudnnOff(nn.Module):
    def __init__(self, lstm: nn.LSTM):
        super().__init__()
        self.lstm = lstm

    def forward(self, x):
        with torch.backends.cudnn.flags(enabled=False):
            return self.lstm(x)


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"LSTM layer, {describe(meta)}", "",
             "| setting | T | I | H | B | dtype | pass | provider | ms (p50) | p20 - p80 | TFLOP/s | vs nn.LSTM | "
             "vs nn.LSTMCell loop |",
             "|---|---:|---:|---:|---:|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        cell = "" if r.get("vs_nn_LSTMCell") is None else f"{r['vs_nn_LSTMCell']:.2f}x"
        lines.append(f"| {r['setting']} | {r['T']} | {r['I']} | {r['H']} | {r['B']} | {r['dtype']} | {r['pass']} | "
                     f"{r['provider']} | {r['ms']:.3f} | {r['p20']:.3f} - {r['p80']:.3f} | {r['TFLOPs']:.3f} | "
                     f"{r['vs_nn_LSTM']:.2f}x | {cell} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, warmup=2, reps=10)
    parser.add_argument("--settings", nargs="+", default=None, help=f"of {', '.join(SETTINGS)}")
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="batch sizes (default per setting)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    settings = args.settings or (list(SETTINGS) if device.type == "cuda" else list(CPU_DEFAULT))
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting(s) {unknown}; choose from {list(SETTINGS)}")
    if any(b <= 0 for b in args.batches or ()):
        parser.error("--batches must be positive integers")
    meta = metadata(device)
    rows = []
    for s in settings:
        batches = args.batches or (CPU_DEFAULT.get(s) if device.type == "cpu" else None)
        rows += run_setting(s, device, batches, args.warmup, args.reps)
    write_results(args.out, f"lstm_{device.type}", meta, rows, markdown(meta, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
