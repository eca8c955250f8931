"""What every benchmark shares: timing with quantiles, the machine it ran on, common arguments, and results files that
keep their history.

Times are reported as p20 / p50 / p80 in ms: the median is the figure, the spread says how far to trust it. Results
go to ``<out>/<stem>.json`` as a list of runs (each: meta + rows), the newest appended, so a figure is never compared
across machines without its machine being named; ``<stem>.md`` is the newest run's table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import legw_fused

QUANTILES = (0.2, 0.5, 0.8)


def _quantiles(samples_ms: list[float]) -> dict:
    if len(samples_ms) == 1:
        return {"p20": samples_ms[0], "ms": samples_ms[0], "p80": samples_ms[0]}
    cuts = statistics.quantiles(samples_ms, n=10, method="inclusive")  # deciles: cuts[1] = p20, cuts[7] = p80
    return {"p20": cuts[1], "ms": statistics.median(samples_ms), "p80": cuts[7]}


def cuda_times_ms(fn, warmup: int, reps: int) -> dict:
    """p20 / median ("ms") / p80 of one call on the GPU (triton.testing.do_bench: flushes L2 between calls)."""
    import triton.testing

    p20, p50, p80 = triton.testing.do_bench(fn, warmup=warmup * 10, rep=reps * 10, quantiles=list(QUANTILES))
    return {"p20": p20, "ms": p50, "p80": p80}


def cpu_times_ms(fns: list, warmup: int, reps: int) -> list[dict]:
    """p20 / median ("ms") / p80 wall time of each callable, measured round-robin: on a shared 2-core machine the
    speed drifts by tens of percent over minutes, and interleaving makes every provider see the same drift. Each
    round runs the callables in a new order (fixed seed): a call finds in the caches what the call before it left
    there, and one LARS step over 161 one-element tensors took 0.43-0.50 ms right after another LARS of ours but
    0.75-0.86 ms right after torch's reference LARS (bench/NOTES.md, session 11); a fixed order gave every provider
    the same, unequal, predecessor."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    shuffle = random.Random(0).shuffle
    for _ in range(reps):
        shuffle(order)
        for i in order:
            start = time.perf_counter()
            fns[i]()
            times[i].append((time.perf_counter() - start) * 1e3)
    return [_quantiles(ts) for ts in times]


def cpu_description() -> dict:
    """The CPU model, its vector extensions, and what torch runs on it (ATen's CPU capability, oneDNN, MKL)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        info = Path("/proc/cpuinfo").read_text()
        found = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
        model = found.group(1).strip() if found else model
        found = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
        flags = set(found.group(1).split()) if found else set()
    except OSError:
        pass
    vector = sorted(f for f in flags if re.fullmatch(r"avx\d*\w*|fma|f16c|amx\w*|sse4_2", f))
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    # ONEDNN_MAX_CPU_ISA (or its old name) caps oneDNN's JIT kernels below what the CPU has: how a run emulates a
    # CPU with fewer vector extensions, together with ATEN_CPU_CAPABILITY (which also picks legw_fused's row loops).
    onednn_cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "the CPU's"
    return {"cpu": model, "vector_extensions": vector, "aten_cpu_capability": capability,
            "mkldnn": torch.backends.mkldnn.is_available(), "mkl": torch.backends.mkl.is_available(),
            "onednn_max_cpu_isa": onednn_cap, "lstm_cpu_rows": legw_fused.ops.LSTM_CPU_ROWS,
            "lstm_cpu_gemm": legw_fused.ops.LSTM_CPU_GEMM}


def commit(repo: Path | None = None) -> str:
    """HEAD's short hash, with "+modified" when tracked files other than bench/results/ differ from it: a figure
    measured on uncommitted code must not carry the commit's name alone."""
    repo = repo or Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=repo)
        if not head.stdout.strip():
            return "unknown"
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                 ":(exclude)bench/results"], capture_output=True, text=True, cwd=repo)
        return head.stdout.strip() + ("+modified" if status.stdout.strip() else "")
    except OSError:
        return "unknown"


def metadata(device: torch.device) -> dict:
    """Device (GPU name, or the CPU with its vector extensions), threads, versions, commit and date."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "triton": triton_version, "legw_fused": legw_fused.__version__, "commit": commit(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cuda":
        meta["device_name"] = torch.cuda.get_device_name(device)
    else:
        cpu = cpu_description()
        meta["device_name"] = cpu["cpu"]
        meta.update(cpu)
    return meta


def describe(meta: dict) -> str:
    """One line naming the machine and versions of a run, for the head of its table."""
    extra = ""
    if "vector_extensions" in meta:
        extra = (f", {' '.join(meta['vector_extensions'])}, ATen {meta['aten_cpu_capability']}, "
                 f"oneDNN {'on' if meta['mkldnn'] else 'off'}, MKL {'on' if meta['mkl'] else 'off'}")
        if "onednn_max_cpu_isa" in meta:  # runs from before session 9 did not record these
            extra += (f", oneDNN ISA {meta['onednn_max_cpu_isa']}, legw_fused C++ LSTM rows "
                      f"{meta['lstm_cpu_rows']}")
        if "lstm_cpu_gemm" in meta:  # since session 13
            extra += f", GEMMs {meta['lstm_cpu_gemm']}"
    return (f"{meta['device_name']} ({meta['device']}, {meta['threads']} threads{extra}), torch {meta['torch']}, "
            f"triton {meta['triton']}, commit {meta['commit']}, {meta['date']}")


def add_common_args(parser: argparse.ArgumentParser, warmup: int, reps: int) -> None:
    """--device, --warmup, --reps and --out, shared by the benchmarks."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--reps", type=int, default=reps)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))


def write_results(out: str | Path, stem: str, meta: dict, rows: list[dict], table: str) -> None:
    """Append this run (meta + rows) to <out>/<stem>.json, write <stem>.md (its table), print the table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.json"
    runs = []
    if path.exists():
        old = json.loads(path.read_text())
        runs = old["runs"] if "runs" in old else [old]  # a file from before the history: its one run
    runs.append({"meta": meta, "rows": rows})
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"runs": runs}, indent=1))
    tmp.replace(path)
    (out / f"{stem}.md").write_text(table)
    print(table)
