"""Results of a sweep: the printed table, results.json and the PNG plots (made from the results, not by hand)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["format_table", "write_json", "plot_all", "PLOTS"]

PLOTS = ("metric_vs_batch.png", "lr_schedules.png", "training_curves.png")
_LABEL = {"accuracy": "test accuracy", "bpc": "test bits per character"}


def _fmt(v, spec: str, missing: str = "-") -> str:
    return missing if v is None else format(v, spec)


def format_table(results: dict) -> str:
    metric = results["metric"]
    m = "acc" if metric == "accuracy" else metric
    spec = ".4f" if metric == "accuracy" else ".3f"
    head = (f"{'scheme':<14}{'batch':>6}{'peak LR':>10}{'warmup ep':>10}{'W':>5}{'T':>6}{'test ' + m:>10}"
            f"{'best val':>10}{'time s':>8}{'samples/s':>10}{'to target s':>12}{'speedup':>8}")
    lines = [head]
    for r in results["runs"]:
        test = "diverged" if r["diverged"] else _fmt(r["test"], spec)
        lines.append(f"{r['scheme']:<14}{r['batch']:>6}{r['peak_lr']:>10.4g}{r['warmup_epochs']:>10.3g}"
                     f"{r['warmup_steps']:>5}{r['total_steps']:>6}{test:>10}{_fmt(r['best_val'], spec):>10}"
                     f"{r['train_seconds']:>8.1f}{_fmt(r['samples_per_s'], '.0f'):>10}"
                     f"{_fmt(r.get('time_to_target'), '.1f', 'never'):>12}{_fmt(r.get('speedup'), '.2f'):>8}")
    target = results.get("target")
    if target:
        cmp = ">=" if metric == "accuracy" else "<="
        lines.append(f"target: val {m} {cmp} {target['value']:.4f} (the baseline's best val {m} "
                     f"{target['baseline_best_val']:.4f}, {target['slack']:.0%} slack); 'to target s' is training "
                     f"time (evaluation excluded) at the end of the first epoch that reached it")
    return "\n".join(lines)


def write_json(results: dict, path: Path) -> None:
    path.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n", encoding="utf-8")


def plot_all(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    metric = results["metric"]
    runs = results["runs"]
    schemes = list(dict.fromkeys(r["scheme"] for r in runs))
    title = f"{results['task']} ({results['preset']} preset, {results['optimizer']})"
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in schemes:
        pts = sorted((r["batch"], r["test"]) for r in runs if r["scheme"] == s and r["test"] is not None)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel(_LABEL[metric])
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out / PLOTS[0]))

    fig, axes = plt.subplots(1, len(schemes), figsize=(4.5 * len(schemes), 3.5), sharey=True, squeeze=False)
    for ax, s in zip(axes[0], schemes):
        for r in runs:
            if r["scheme"] != s:
                continue
            lrs = r["lr_curve"]
            ax.plot([i / r["steps_per_epoch"] for i in lrs["steps"]], lrs["lr"], label=f"B={r['batch']}")
        ax.set_title(s)
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[0][0].set_ylabel("learning rate")
    fig.suptitle(f"LR schedules: {title}")
    paths.append(_save(fig, out / PLOTS[1]))

    fig, axes = plt.subplots(1, len(schemes), figsize=(4.5 * len(schemes), 3.5), sharey=True, squeeze=False)
    for ax, s in zip(axes[0], schemes):
        for r in runs:
            if r["scheme"] == s:
                ax.plot([h["epoch"] for h in r["history"]], [h["val"] for h in r["history"]], marker=".",
                        label=f"B={r['batch']}")
        ax.set_title(s)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[0][0].set_ylabel("val " + ("accuracy" if metric == "accuracy" else "bits per character"))
    fig.suptitle(f"Training curves: {title}")
    paths.append(_save(fig, out / PLOTS[2]))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
