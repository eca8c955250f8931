"""Optimizer-step benchmark: legw_fused SGD/LARS backends against torch and timm baselines, in one run.

    python -m legw_fused.bench.optimizer --device cpu  --sets cpu-mixed-10M
    python -m legw_fused.bench.optimizer --device cuda --sets resnet50 lstm-lm flat-1B

Every provider runs one full optimizer step per call on the same parameter set, with the same LEGW schedule:
ours evaluate it on the device from the step count; torch/timm get it through a LambdaLR stepped every iteration.
Reported per provider: median time per step; effective bandwidth at the bytes a step *must* move (SGD 20 B,
LARS 24 B per fp32 element: read p, g, m and write p, m, plus one more read of g for its norm), as % of a copy and
of an add_ pass measured in the same run; speedup over the baseline (torch foreach SGD / timm Lars). LARS runs
with the |p|^2 cache (default) and without it. JSON and
Markdown go to bench/results/ with device, versions and commit (bench/harness.py: the history is kept).
"""

from __future__ import annotations

import argparse
import gc

import torch

import legw_fused
from legw_fused.bench import shapes as shape_sets
from legw_fused.bench.harness import add_common_args, cpu_times_ms, cuda_times_ms, describe, metadata, write_results

SCHED = dict(base_lr=0.1, base_batch_size=256, batch_size=8192, base_warmup_epochs=0.1, steps_per_epoch=50,
             epochs=90)
HP = dict(momentum=0.9, weight_decay=1e-4)
MIN_BYTES = {"sgd": 20, "lars": 24, "copy": 8, "add": 12}


def schedule():
    return legw_fused.LEGW(**SCHED)


def lambda_lr(opt):
    sched = schedule()
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: sched(t) / sched.peak_lr)


def make_params(shape_list, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, device=device, generator=g) * 0.05) for s in shape_list]
    for p in params:
        p.grad = torch.randn(p.shape, device=device, generator=g) * 1e-3
    return params


def providers(device: torch.device):
    """(name, kind, factory) where factory(params) -> step callable; baselines first in each kind."""
    out = []
    sgd_kw = dict(lr=schedule().peak_lr, **HP)
    out.append(("torch SGD foreach + LambdaLR", "sgd", lambda ps: _with_sched(torch.optim.SGD(ps, foreach=True,
                                                                                               **sgd_kw))))
    try:
        torch.optim.SGD(make_params([(2,)], device), fused=True, **sgd_kw).step()
        out.append(("torch SGD fused + LambdaLR", "sgd", lambda ps: _with_sched(torch.optim.SGD(ps, fused=True,
                                                                                                 **sgd_kw))))
    except (RuntimeError, ValueError) as exc:
        print(f"skip torch SGD fused on {device}: {exc}")
    for name, b in legw_fused.backends.STEP_BACKENDS.items():
        reason = b.unavailable_reason(device.type, torch.float32)
        if reason is not None:
            print(f"skip legw_fused backend {name!r} on {device}: {reason}")
            continue
        out.append((f"legw_fused.SGD [{name}]", "sgd",
                    lambda ps, name=name: legw_fused.SGD(ps, lr=schedule(), backend=name, **HP).step))
    try:
        from timm.optim import Lars

        out.append(("timm Lars + LambdaLR", "lars", lambda ps: _with_sched(Lars(ps, lr=schedule().peak_lr,
                                                                                  trust_coeff=1e-3, **HP))))
    except ImportError as exc:
        print(f"skip timm Lars: {exc}")
    if device.type == "cuda":
        try:
            import bitsandbytes as bnb

            out.append(("bitsandbytes LARS + LambdaLR", "lars",
                        lambda ps: _with_sched(bnb.optim.LARS(ps, lr=schedule().peak_lr, **HP))))
        except ImportError as exc:
            print(f"skip bitsandbytes LARS: {exc}")
    for name, b in legw_fused.backends.STEP_BACKENDS.items():
        if b.unavailable_reason(device.type, torch.float32) is None:
            # The default keeps the |p|^2 cache (the norm pass reads only g); the uncached variant is the 28 B path.
            variants = [("", True)] + ([(", no norm cache", False)] if b.param_sq_chunk is not None else [])
            for suffix, cache in variants:
                out.append((f"legw_fused.LARS [{name}{suffix}]", "lars",
                            lambda ps, name=name, cache=cache: legw_fused.LARS(
                                ps, lr=schedule(), trust_coefficient=1e-3, backend=name, cache_norms=cache,
                                **HP).step))
    return out


def _with_sched(opt):
    sched = lambda_lr(opt)

    def step():
        opt.step()
        sched.step()
    return step


def launches_per_step(fn, device: torch.device) -> int | None:
    """Kernels launched by one call (CUDA only), counted by the profiler."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def run_set(set_name: str, device: torch.device, warmup: int, reps: int) -> list[dict]:
    shape_list = shape_sets.SETS[set_name]()
    n = shape_sets.numel(shape_list)
    x, y = torch.randn(n, device=device), torch.randn(n, device=device)
    entries = [(f"one {kind}_ pass (flat)", kind, fn) for kind, fn in (("copy", lambda: x.copy_(y)),
                                                                      ("add", lambda: x.add_(y)))]
    rows = []
    if device.type == "cuda":
        # GPU timings are stable: one provider at a time, so that only one parameter set occupies memory.
        for name, kind, fn in entries:
            rows.append({"set": set_name, "provider": name, "kind": kind, "numel": n,
                         **cuda_times_ms(fn, warmup, reps)})
        del x, y, entries
        for name, kind, factory in providers(device):
            params = make_params(shape_list, device)
            fn = factory(params)
            rows.append({"set": set_name, "provider": name, "kind": kind, "numel": n,
                         **cuda_times_ms(fn, warmup, reps), "launches": launches_per_step(fn, device)})
            del params, fn
            gc.collect()
            torch.cuda.empty_cache()
    else:
        entries += [(name, kind, factory(make_params(shape_list, device))) for name, kind, factory in providers(device)]
        for (name, kind, _), times in zip(entries, cpu_times_ms([fn for _, _, fn in entries], warmup, reps)):
            rows.append({"set": set_name, "provider": name, "kind": kind, "numel": n, **times})
    bw = {r["kind"]: MIN_BYTES[r["kind"]] * n / (r["ms"] * 1e-3) / 1e9 for r in rows if r["kind"] in ("copy", "add")}
    base = {}
    for r in rows:
        r["tensors"] = len(shape_list)
        r["bytes_per_elem"] = MIN_BYTES[r["kind"]]
        r["GBps"] = r["bytes_per_elem"] * n / (r["ms"] * 1e-3) / 1e9
        r["pct_copy"] = 100 * r["GBps"] / bw["copy"]
        r["pct_add"] = 100 * r["GBps"] / bw["add"]
        base.setdefault(r["kind"], r["ms"])  # the first provider of each kind is its baseline
        r["speedup"] = base[r["kind"]] / r["ms"]
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"Optimizer step, {describe(meta)}", "",
             "| set | provider | ms/step (p50) | p20 - p80 | B/elem (min) | GB/s | % copy | % add | speedup "
             "| launches |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['set']} | {r['provider']} | {r['ms']:.3f} | {r['p20']:.3f} - {r['p80']:.3f} | "
                     f"{r['bytes_per_elem']} | {r['GBps']:.1f} | "
                     f"{r['pct_copy']:.0f} | {r['pct_add']:.0f} | {r['speedup']:.2f}x | "
                     f"{r.get('launches') if r.get('launches') is not None else '-'} |")
    if any(r["set"] == "host-161" for r in rows):
        lines += ["", "host-161: 161 one-element tensors (ResNet-50's count), so ms/step is the step's host-side "
                  "cost; its bandwidth columns mean nothing."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, warmup=3, reps=15)
    parser.add_argument("--sets", nargs="+", default=None, help=f"of {', '.join(shape_sets.SETS)}")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sets = args.sets or (["resnet50", "lstm-lm", "flat-1B", "host-161"] if device.type == "cuda" else
                         ["cpu-mixed-10M", "host-161"])
    unknown = [s for s in sets if s not in shape_sets.SETS]
    if unknown:
        parser.error(f"unknown set(s) {unknown}; choose from {list(shape_sets.SETS)}")
    meta = {**metadata(device), "schedule": SCHED, "hyperparameters": HP}
    rows = [r for s in sets for r in run_set(s, device, args.warmup, args.reps)]
    write_results(args.out, f"optimizer_{device.type}", meta, rows, markdown(meta, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
