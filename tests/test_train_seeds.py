"""legw-fused train --seeds: every (scheme, batch size) cell trained once per seed, exactly as a --seed run of that
seed; the table, results.json's cells and the metric plot's error bars give mean and sample standard deviation."""

from __future__ import annotations

import json
import statistics

import matplotlib.axes
import pytest
from test_train import PNG_MAGIC, needs_mnist
from test_train_resume import _timeless

from legw_fused.cli import main

TINY = ["train", "mnist", "--train-items", "256", "--eval-items", "100", "--batch-sizes", "128", "--schemes", "legw",
        "--epochs", "1", "--quiet", "--device", "cpu"]


@needs_mnist
def test_seeds_train_each_cell_per_seed_and_report_mean_and_sd(tmp_path, capsys, monkeypatch):
    bars = []
    errorbar = matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar",
                        lambda self, x, y, yerr=None, **kw: bars.append((list(x), list(y), list(yerr)))
                        or errorbar(self, x, y, yerr=yerr, **kw))
    assert main([*TINY, "--batch-sizes", "128", "256", "--seeds", "2", "0", "1", "--out", str(tmp_path / "s")]) == 0
    res = json.loads((tmp_path / "s" / "mnist" / "results.json").read_text())
    assert res["seeds"] == [0, 1, 2]
    assert [(r["batch"], r["seed"]) for r in res["runs"]] == [(b, s) for s in (0, 1, 2) for b in (128, 256)]

    # Each seed's trainings are those of a one-seed run with that seed.
    assert main([*TINY, "--batch-sizes", "128", "256", "--seed", "1", "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "mnist" / "results.json").read_text())
    assert _timeless(one)["runs"] == [r for r in _timeless(res)["runs"] if r["seed"] == 1]
    tests = {b: [r["test"] for r in res["runs"] if r["batch"] == b] for b in (128, 256)}
    assert len(set(tests[128])) > 1  # the seeds differ, so the standard deviation is not trivially 0

    table = (tmp_path / "s" / "mnist" / "results.md").read_text()
    for cell in res["cells"]:
        values = tests[cell["batch"]]
        mean, sd = statistics.fmean(values), statistics.stdev(values)  # sample standard deviation (n - 1)
        assert cell["test"] == pytest.approx({"mean": mean, "std": sd, "n": 3}, rel=1e-12)
        row = next(line for line in table.splitlines() if line.startswith("legw") and f" {cell['batch']} " in line)
        assert f"{mean:.4f}±{sd:.4f}" in row and row.split()[6] == "3"  # the n column
    assert "over 3 seeds" in table
    x, y, yerr = bars[0]
    assert x == [128, 256] and y == pytest.approx([statistics.fmean(tests[b]) for b in x])
    assert yerr == pytest.approx([statistics.stdev(tests[b]) for b in x])
    assert (tmp_path / "s" / "mnist" / "metric_vs_batch.png").read_bytes()[:8] == PNG_MAGIC
    capsys.readouterr()


def test_seed_and_seeds_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exc:
        main([*TINY, "--seed", "1", "--seeds", "0", "1"])
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err
