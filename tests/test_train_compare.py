"""The study's comparison of sweeps (report.format_comparison / plot_comparison, experiments/study64_summary.py):
each cell's figures over the seeds that finished, checked against statistics computed here from the runs."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import matplotlib.axes
import pytest
from test_train import PNG_MAGIC

from legw_fused.train.report import format_comparison, summarize

ROOT = Path(__file__).resolve().parents[1]


def _summary_module():
    """experiments/study64_summary.py, a script rather than a package module, loaded from its path."""
    spec = importlib.util.spec_from_file_location("study64_summary", ROOT / "experiments" / "study64_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(batch, seed, test, best_val, diverged_epoch=None):
    return {"scheme": "legw", "batch": batch, "seed": seed, "peak_lr": 0.8 if batch == 128 else 6.4,
            "warmup_steps": 6, "total_steps": 9750 if batch == 128 else 150,
            "test": None if diverged_epoch else test, "best_val": None if diverged_epoch else best_val,
            "diverged": {"epoch": diverged_epoch, "reason": "loss"} if diverged_epoch else None,
            "train_seconds": 1.0, "samples_per_s": 1.0}


def _results(runs, lr, w0, complete=True):
    return {"metric": "accuracy", "optimizer": "sgd", "baseline": {"lr": lr, "warmup_epochs": w0}, "epochs": 25,
            "complete": complete, "runs": runs, "cells": summarize(runs)}


SWEEPS = {
    "A": _results([_run(128, 0, 0.9871, 0.9880), _run(8192, 0, 0, 0, diverged_epoch=3),
                   _run(128, 1, 0.9893, 0.9901), _run(8192, 1, 0.8714, 0.8836),
                   _run(128, 2, 0.9902, 0.9899), _run(8192, 2, 0, 0, diverged_epoch=17)], 0.8, 1 / 64),
    "C": _results([_run(128, 0, 0.9882, 0.9887), _run(8192, 0, 0.9043, 0.9119)], 0.2, 0.25, complete=False),
}


def _rows(table: str) -> dict:
    rows = {}
    for line in table.splitlines()[2:]:
        cols = [c.strip() for c in line.strip("|").split("|")]
        rows[cols[0], int(cols[5])] = cols
    return rows


def test_comparison_rows_give_each_cells_figures_over_the_seeds_that_finished():
    rows = _rows(format_comparison(SWEEPS))
    assert set(rows) == {("A", 128), ("A", 8192), ("C (partial)", 128), ("C (partial)", 8192)}
    b0 = [0.9871, 0.9893, 0.9902]
    mean, sd = 100 * statistics.fmean(b0), 100 * statistics.stdev(b0)
    a128 = rows["A", 128]
    assert a128[1:5] == ["sgd", "0.8", "0.015625", "25"] and a128[6:9] == ["0.8", "6 / 9750", "3 of 3"]
    assert a128[9] == f"{mean:.2f} ± {sd:.2f}%" and a128[11] == "-"
    # One seed of three finished: its figures alone, no sd, and where the others diverged.
    assert rows["A", 8192][8:12] == ["1 of 3", "87.14%", "88.36%", "0: 3, 2: 17"]
    assert rows["C (partial)", 8192][2:4] == ["0.2", "0.25"] and rows["C (partial)", 8192][9] == "90.43%"


def test_comparison_plot_draws_means_with_sd_and_marks_cells_that_all_diverged(tmp_path, monkeypatch):
    bars, marks = [], []
    errorbar, plot = matplotlib.axes.Axes.errorbar, matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar",
                        lambda self, x, y, yerr=None, **kw: bars.append((list(x), list(y), list(yerr)))
                        or errorbar(self, x, y, yerr=yerr, **kw))
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *a, **kw: marks.append((list(a[0]), a[2] if len(a) > 2 else None))
                        or plot(self, *a, **kw))
    gone = {"D": _results([_run(8192, s, 0, 0, diverged_epoch=2) for s in (0, 1)], 32.0, 1 / 64)}
    module = _summary_module()
    for name, res in {**SWEEPS, **gone}.items():
        (tmp_path / name / "mnist").mkdir(parents=True)
        (tmp_path / name / "mnist" / "results.json").write_text(json.dumps(res))
    table = module.main(tmp_path)
    assert (tmp_path / "summary.md").read_text().endswith(table) and len(_rows(table)) == 5
    assert (tmp_path / "summary.png").read_bytes()[:8] == PNG_MAGIC
    (x128, y128, e128), (x8k, y8k, e8k) = bars  # one series per batch size, the sweeps side by side
    assert y128 == pytest.approx([statistics.fmean([0.9871, 0.9893, 0.9902]), 0.9882])
    assert e128 == pytest.approx([statistics.stdev([0.9871, 0.9893, 0.9902]), 0.0])
    assert y8k == pytest.approx([0.8714, 0.9043]) and x8k[0] < 1 < x8k[1] < 2  # sweeps A and C, not D
    assert marks == [([x8k[1] + 1], "x")]  # D (third sweep): every training diverged
    names = ["D-epochs-100", "B-lars-w0-0.25", "D-epochs-50", "B-lars-w0-0.015625", "B-lars-lr-1"]
    ordered = sorted((tmp_path / n / "mnist" / "results.json" for n in names), key=module._order)
    assert [p.parents[1].name for p in ordered] == ["B-lars-lr-1", "B-lars-w0-0.015625", "B-lars-w0-0.25",
                                                    "D-epochs-50", "D-epochs-100"]  # numbers as numbers


def test_summary_of_a_folder_without_sweeps_says_what_it_expected(tmp_path):
    module = _summary_module()
    with pytest.raises(SystemExit, match="no sweep under .*<sweep>/<task>/results.json"):
        module.main(tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing written
