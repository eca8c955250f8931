"""Stage 3 of bench/gpu_session.sh: a warm fused optimizer step or LSTM pass never waits for the GPU.

After warm-up calls (state, buffers, cached launch tables and compiled kernels exist from then on), each fused
backend runs again under ``torch.cuda.set_sync_debug_mode("error")``, which turns any call that synchronises with the
device (``.item()``, a device-to-host copy, ``nonzero``...) into an error. Cases: SGD and LARS with a LEGW schedule
(the LR computed on the device), fp32 and bf16 with fp32 master weights; the LSTM layer's forward + backward. On a
CPU (the script's ``--dry-run``) the same calls run without the check: that proves the script, not the property.

    python -m legw_fused.bench.gpu_session_syncs --device cuda
"""

from __future__ import annotations

import argparse
import contextlib

import torch

import legw_fused
from legw_fused.backends import LSTM_BACKENDS, STEP_BACKENDS

SHAPES = [(1000, 512), (512,), (7,), (65537,)]  # a matrix, a bias, a tail-only tensor, an odd size past 64K
SCHEDULE = dict(base_lr=0.5, base_batch_size=32, batch_size=256, base_warmup_epochs=0.125, steps_per_epoch=4,
                epochs=3)
WARM_CALLS = 2  # LARS: the first step fills the |p|^2 cache, the second is the first to use it
CHECKED_CALLS = 2


@contextlib.contextmanager
def syncs_raise(device: torch.device):
    if device.type != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def optimizer_step(kind: str, backend: str, dtype: torch.dtype, device: torch.device):
    g = torch.Generator(device=device).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, device=device).to(dtype)) for s in SHAPES]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, device=device).to(dtype)
    cls = legw_fused.SGD if kind == "sgd" else legw_fused.LARS
    opt = cls(params, lr=legw_fused.LEGW(**SCHEDULE), momentum=0.9, weight_decay=1e-4, backend=backend,
              master_weights=dtype != torch.float32)
    return opt.step


def lstm_pass(backend: str, device: torch.device):
    """x [B, T, I] -> the layer's output [B, T, H], then the gradients of x and every weight."""
    torch.manual_seed(0)
    lstm = legw_fused.LSTM(28, 128, batch_first=True, device=device, backend=backend)
    x = torch.randn(64, 28, 28, device=device, requires_grad=True)

    def forward_backward():
        out, _ = lstm(x)
        out.sum().backward()

    return forward_backward


def cases(device: torch.device):
    """(label, callable or None, why not) for every fused backend of this device."""
    fused = [name for name in STEP_BACKENDS.auto_order[device.type] if name != "torch"]
    for name in fused:
        for dtype in (torch.float32, torch.bfloat16):
            reason = STEP_BACKENDS[name].unavailable_reason(device.type, dtype)
            for kind in ("sgd", "lars"):
                label = f"{kind.upper()} {str(dtype).removeprefix('torch.')} [{name}]"
                yield label, None if reason else optimizer_step(kind, name, dtype, device), reason
    for name in fused:
        reason = LSTM_BACKENDS[name].unavailable_reason(device.type, torch.float32)
        yield f"LSTM fwd+bwd float32 [{name}]", None if reason else lstm_pass(name, device), reason


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(parser.parse_args(argv).device)
    checked = "under set_sync_debug_mode('error')" if device.type == "cuda" else "(CPU: no sync check)"
    failed = 0
    for label, fn, reason in cases(device):
        if fn is None:
            print(f"skip    {label}: {reason}")
            continue
        try:
            for _ in range(WARM_CALLS):
                fn()
            with syncs_raise(device):
                for _ in range(CHECKED_CALLS):
                    fn()
            print(f"ok      {label} {checked}")
        except RuntimeError as exc:
            failed += 1
            print(f"FAILED  {label}: {str(exc).splitlines()[0]}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
