"""Results of a sweep: the printed table, results.json and the PNG plots (made from the results, not by hand).

With several seeds, every (scheme, batch size) cell is summarized over them (``summarize``): the table and
results.json's "cells" give the mean, the sample standard deviation and n of each figure, and the metric plot draws
the standard deviations as error bars. A diverged training has no test metric: it counts in no mean.
"""

from __future__ import annotations

import json
import math
import statistics

__all__ = ["PLOTS", "format_comparison", "format_table", "plot_all", "plot_comparison", "summarize", "to_json"]

PLOTS = ("metric_vs_batch.png", "lr_schedules.png", "training_curves.png")
_LABEL = {"accuracy": "test accuracy", "bpc": "test bits per character"}


def _stats(values) -> dict:
    """Mean, sample standard deviation (None below 2 values) and n of the values that are not None."""
    v = [x for x in values if x is not None]
    return {"mean": statistics.fmean(v) if v else None, "std": statistics.stdev(v) if len(v) > 1 else None,
            "n": len(v)}


def summarize(runs: list[dict]) -> list[dict]:
    """One entry per (scheme, batch) cell, in the runs' order, with its figures over the cell's seeds."""
    cells: dict[tuple, list] = {}
    for r in runs:
        cells.setdefault((r["scheme"], r["batch"]), []).append(r)
    out = []
    for (scheme, batch), rs in cells.items():
        ok = [r for r in rs if not r["diverged"]]
        out.append({"scheme": scheme, "batch": batch, "seeds": [r["seed"] for r in rs],
                    "diverged": [{"seed": r["seed"], **r["diverged"]} for r in rs if r["diverged"]],
                    "test": _stats(r["test"] for r in ok), "best_val": _stats(r["best_val"] for r in ok),
                    "train_seconds": _stats(r["train_seconds"] for r in rs),
                    "samples_per_s": _stats(r["samples_per_s"] for r in rs),
                    "time_to_target": _stats(r.get("time_to_target") for r in rs),
                    "speedup": _stats(r.get("speedup") for r in rs)})
    return out


def _fmt(v, spec: str, missing: str = "-") -> str:
    return missing if v is None else format(v, spec)


def _mean_std(s: dict, spec: str, missing: str = "-") -> str:
    if s["n"] == 0:
        return missing
    return format(s["mean"], spec) + ("" if s["std"] is None else "±" + format(s["std"], spec))


# (header, minimum width): the first column is left-aligned, the others right-aligned; wider values widen them.
_COLUMNS = [("scheme", 14), ("batch", 6), ("peak LR", 10), ("warmup ep", 10), ("W", 5), ("T", 6), ("n", 6),
            ("test", 10), ("best val", 10), ("time s", 8), ("samples/s", 10), ("to target s", 12), ("speedup", 8)]


def _row(c: dict, run: dict, spec: str, seeds: int) -> list[str]:
    n = str(c["test"]["n"]) + (f"/{len(c['seeds'])}" if c["diverged"] else "")
    return [c["scheme"], str(c["batch"]), format(run["peak_lr"], ".4g"), format(run["warmup_epochs"], ".3g"),
            str(run["warmup_steps"]), str(run["total_steps"]), n if seeds > 1 else None,
            _mean_std(c["test"], spec, "diverged" if c["diverged"] else "-"), _mean_std(c["best_val"], spec),
            _fmt(c["train_seconds"]["mean"], ".1f"), _fmt(c["samples_per_s"]["mean"], ".0f"),
            _fmt(c["time_to_target"]["mean"], ".1f", "never"), _fmt(c["speedup"]["mean"], ".2f")]


def format_table(results: dict) -> str:
    metric = results["metric"]
    m = "acc" if metric == "accuracy" else metric
    spec = ".4f" if metric == "accuracy" else ".3f"
    seeds = len(results["seeds"])
    first = _first_runs(results)
    rows = [_row(c, first[c["scheme"], c["batch"]], spec, seeds) for c in results["cells"]]
    keep = [i for i, (name, _) in enumerate(_COLUMNS) if name != "n" or seeds > 1]
    heads = [_COLUMNS[i][0] + (" " + m if _COLUMNS[i][0] == "test" else "") for i in keep]
    widths = [max([_COLUMNS[i][1], len(h) + 1] + [len(r[i]) + 1 for r in rows]) for i, h in zip(keep, heads)]
    lines = [_join(heads, widths)] + [_join([r[i] for i in keep], widths) for r in rows]
    if seeds > 1:
        lines.append(f"over {seeds} seeds: test and best val are mean±sample standard deviation over the n seeds that "
                     f"did not diverge, the other figures means")
    lines += [f"diverged: {r['scheme']} B={r['batch']} seed {r['seed']} at epoch {r['diverged']['epoch']} "
              f"({r['diverged']['reason']}); its remaining epochs were skipped"
              for r in results["runs"] if r["diverged"] and "same_as" not in r]
    target = results.get("target")
    if target:
        cmp = ">=" if metric == "accuracy" else "<="
        lines.append(f"target: val {m} {cmp} {target['value']:.4f} (the baseline's best val {m} "
                     f"{target['baseline_best_val']:.4f}{', mean over seeds' if seeds > 1 else ''}, "
                     f"{target['slack']:.0%} slack); 'to target s' is training time (evaluation excluded) at the end "
                     f"of the first epoch that reached it")
    return "\n".join(lines)


def _first_runs(results: dict) -> dict:
    """Each (scheme, batch) cell's first run: the figures every seed of the cell shares (peak LR, steps)."""
    return {(r["scheme"], r["batch"]): r for r in reversed(results["runs"])}


def _join(cols: list[str], widths: list[int]) -> str:
    return "".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths)))


def to_json(results: dict) -> str:
    return json.dumps(results, indent=1, allow_nan=False) + "\n"


def plot_all(results: dict, out) -> list:
    plt = _pyplot()
    title = f"{results['task']} ({results['preset']} preset, {results['optimizer']})"
    runs = results["runs"]
    schemes = list(dict.fromkeys(r["scheme"] for r in runs))
    return [_plot_metric(plt, results, title, out / PLOTS[0]), _plot_lr(plt, runs, schemes, title, out / PLOTS[1]),
            _plot_curves(plt, runs, schemes, results["metric"], title, out / PLOTS[2])]


def _plot_metric(plt, results: dict, title: str, path):
    """The test metric's mean per cell against the batch size, the seeds' standard deviation as error bars; a cell
    whose every seed diverged is marked x at the bottom."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, s in enumerate(dict.fromkeys(c["scheme"] for c in results["cells"])):
        cells = sorted((c for c in results["cells"] if c["scheme"] == s), key=lambda c: c["batch"])
        pts = [c for c in cells if c["test"]["n"]]
        if pts:
            ax.errorbar([c["batch"] for c in pts], [c["test"]["mean"] for c in pts],
                        yerr=[c["test"]["std"] or 0.0 for c in pts], marker="o", capsize=3, color=f"C{i}", label=s)
        lost = [c["batch"] for c in cells if not c["test"]["n"] and c["diverged"]]
        if lost:
            ax.plot(lost, [0.02] * len(lost), "x", color=f"C{i}", markersize=9, transform=ax.get_xaxis_transform(),
                    label=f"{s}: diverged")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    seeds = len(results["seeds"])
    ax.set_ylabel(_LABEL[results["metric"]] + (f" (mean ± sd, {seeds} seeds)" if seeds > 1 else ""))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(plt, fig, path)


def _plot_lr(plt, runs: list[dict], schemes: list[str], title: str, path):
    fig, axes = plt.subplots(1, len(schemes), figsize=(4.5 * len(schemes), 3.5), sharey=True, squeeze=False)
    for ax, s in zip(axes[0], schemes):
        drawn = set()
        for r in runs:
            if r["scheme"] != s or r["batch"] in drawn:
                continue  # every seed has the same schedule
            drawn.add(r["batch"])
            lrs = r["lr_curve"]
            ax.plot([i / r["steps_per_epoch"] for i in lrs["steps"]], lrs["lr"], label=f"B={r['batch']}")
        ax.set_title(s)
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[0][0].set_ylabel("learning rate")
    fig.suptitle(f"LR schedules: {title}")
    return _save(plt, fig, path)


def _plot_curves(plt, runs: list[dict], schemes: list[str], metric: str, title: str, path):
    """Val metric per epoch; one colour per batch size, one line per seed (a diverged training's line ends)."""
    batches = sorted({r["batch"] for r in runs})
    fig, axes = plt.subplots(1, len(schemes), figsize=(4.5 * len(schemes), 3.5), sharey=True, squeeze=False)
    for ax, s in zip(axes[0], schemes):
        labelled = set()
        for r in runs:
            if r["scheme"] != s:
                continue
            ax.plot([h["epoch"] for h in r["history"]], [math.nan if h["val"] is None else h["val"]
                                                         for h in r["history"]],
                    marker=".", color=f"C{batches.index(r['batch'])}",
                    label=None if r["batch"] in labelled else f"B={r['batch']}")
            labelled.add(r["batch"])
        ax.set_title(s)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[0][0].set_ylabel("val " + ("accuracy" if metric == "accuracy" else "bits per character"))
    fig.suptitle(f"Training curves: {title}")
    return _save(plt, fig, path)


def _mean_sd_text(s: dict, metric: str) -> str:
    """A comparison's mean ± sd: accuracy in percent, bits per character as they are; "-" without a value."""
    if not s["n"]:
        return "-"
    scale, spec, unit = (100, ".2f", "%") if metric == "accuracy" else (1, ".3f", "")
    sd = "" if s["std"] is None else f" ± {scale * s['std']:{spec}}"
    return f"{scale * s['mean']:{spec}}{sd}{unit}"


def _sweep_label(label: str, results: dict) -> str:
    return label + ("" if results.get("complete", True) else " (partial)")


def format_comparison(named: dict[str, dict]) -> str:
    """A Markdown table comparing sweeps (label -> results), one row per (sweep, scheme, batch) cell: the sweep's
    optimizer, baseline LR and warmup w0 at B0, epochs; the cell's peak LR, warmup and total steps; how many of its
    trainings finished; test and best val as mean ± sample sd over those; where the others diverged. A sweep that
    is still running is marked "(partial)": its cells count only the trainings done."""
    lines = ["| sweep | optimizer | LR0 | w0 | epochs | batch | peak LR | warmup / total steps | finished | test | "
             "best val | diverged (seed: epoch) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for label, res in named.items():
        first, name, metric = _first_runs(res), _sweep_label(label, res), res["metric"]
        for c in res["cells"]:
            r = first[c["scheme"], c["batch"]]
            lost = ", ".join(f"{d['seed']}: {d['epoch']}" for d in c["diverged"]) or "-"
            lines.append(f"| {name} | {res['optimizer']} | {res['baseline']['lr']:g} | "
                         f"{res['baseline']['warmup_epochs']:g} | {res['epochs']} | {c['batch']} | "
                         f"{r['peak_lr']:.4g} | {r['warmup_steps']} / {r['total_steps']} | "
                         f"{c['test']['n']} of {len(c['seeds'])} | {_mean_sd_text(c['test'], metric)} | "
                         f"{_mean_sd_text(c['best_val'], metric)} | {lost} |")
    return "\n".join(lines) + "\n"


def plot_comparison(named: dict[str, dict], path):
    """The test metric of every sweep's cells (mean ± sd over the seeds that finished), one colour per batch size,
    the sweeps side by side; a cell whose every training diverged is marked x at the bottom."""
    plt = _pyplot()
    labels = list(named)
    batches = sorted({c["batch"] for res in named.values() for c in res["cells"]})
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) + 2), 4.5))
    for j, b in enumerate(batches):
        dx = (j - (len(batches) - 1) / 2) * 0.15  # side by side within a sweep
        pts, lost = [], []
        for i, res in enumerate(named.values()):
            for c in res["cells"]:
                if c["batch"] == b:
                    (pts if c["test"]["n"] else lost).append((i + dx, c))
        if pts:
            ax.errorbar([x for x, _ in pts], [c["test"]["mean"] for _, c in pts],
                        yerr=[c["test"]["std"] or 0.0 for _, c in pts], fmt="o", capsize=3, color=f"C{j}",
                        label=f"B={b}")
            for x, c in pts:
                if c["diverged"]:  # how many finished: the mean is over these only
                    ax.annotate(f"{c['test']['n']}/{len(c['seeds'])}", (x, c["test"]["mean"]), fontsize="small",
                                xytext=(4, 4), textcoords="offset points", color=f"C{j}")
        if lost:
            ax.plot([x for x, _ in lost], [0.02] * len(lost), "x", color=f"C{j}", markersize=9,
                    transform=ax.get_xaxis_transform(), label=f"B={b}: every training diverged")
    ax.set_xticks(range(len(labels)), [_sweep_label(k, named[k]) for k in labels], rotation=30, ha="right",
                  fontsize="small")
    metric = next(iter(named.values()))["metric"] if named else "accuracy"
    ax.set_ylabel(_LABEL[metric] + " (mean ± sd)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(plt, fig, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
