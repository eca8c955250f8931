"""Diverged trainings stop early: a non-finite epoch loss, or an epoch's mean training loss above DIVERGENCE_FACTOR
times the starting loss; reported with the epoch in results.json and the table, their remaining epochs skipped."""

from __future__ import annotations

import json
import math

from test_train import PNG_MAGIC, needs_mnist

from legw_fused.cli import main
from legw_fused.train.loop import DIVERGENCE_FACTOR, divergence


def test_divergence_rule():
    start = math.log(10)  # an untrained 10-class model's cross entropy
    assert DIVERGENCE_FACTOR == 3.0
    assert divergence(0.3, start) is None
    assert divergence(3.0 * start, start) is None  # at the bound: not above it
    assert "3 x the starting loss" in divergence(3.0 * start * (1 + 1e-9), start)
    for bad in (math.nan, math.inf, -math.inf):
        assert divergence(bad, start) == "non-finite training loss"


def _check_stopped_early(res: dict, epochs: int) -> None:
    """Every run stopped at the first epoch the rule flags (applied to its recorded losses), tested only if not."""
    for r in res["runs"]:
        losses = [math.nan if h["train_loss"] is None else h["train_loss"] for h in r["history"]]
        flagged = [i + 1 for i, loss in enumerate(losses) if divergence(loss, r["start_loss"])]
        if r["diverged"]:
            assert flagged == [r["diverged"]["epoch"]] == [len(r["history"])]
            assert r["diverged"]["reason"] == divergence(losses[-1], r["start_loss"])
            assert r["history"][-1]["step"] == len(r["history"]) * r["steps_per_epoch"]  # no step after it
            assert r["test"] is None
        else:
            assert flagged == [] and len(r["history"]) == epochs and r["test"] is not None


@needs_mnist
def test_huge_lr_diverges_in_the_first_epoch_and_skips_the_rest(tmp_path, capsys):
    assert main(["train", "mnist", "--train-items", "512", "--eval-items", "100", "--batch-sizes", "128", "256",
                 "--schemes", "legw", "--epochs", "3", "--base-lr", "1000", "--quiet", "--device", "cpu",
                 "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "mnist" / "results.json").read_text())
    _check_stopped_early(res, 3)
    assert [r["diverged"]["epoch"] for r in res["runs"]] == [1, 1]
    # The untrained model's loss is about log(10); one epoch at LR 1000 ends far above 3x that.
    assert all(abs(r["start_loss"] - math.log(10)) < 0.1 for r in res["runs"])
    assert res["target"] is None  # a diverged baseline sets no target
    table = (tmp_path / "mnist" / "results.md").read_text()
    assert table.count("diverged: legw B=") == 2 and "at epoch 1 (mean training loss" in table
    rows = table.splitlines()[2:4]  # after ``` and the header
    assert [row.split()[6] for row in rows] == ["diverged", "diverged"]  # the test column
    for name in ("metric_vs_batch.png", "lr_schedules.png", "training_curves.png"):
        assert (tmp_path / "mnist" / name).read_bytes()[:8] == PNG_MAGIC
    capsys.readouterr()


@needs_mnist
def test_non_finite_loss_stops_the_training_and_the_report_still_works(tmp_path, capsys, monkeypatch):
    """A model whose loss turns NaN (here: every batch of 256 from its second step on) is diverged in that epoch;
    its NaN losses are missing values in results.json (JSON has no NaN), the other cell trains on."""
    from legw_fused.train import tasks

    loss, steps = tasks.MnistTask.loss, {"n": 0}

    def nan_at_256(self, model, x, y):
        if len(x) == 256:
            steps["n"] += 1
            if steps["n"] >= 2:
                return loss(self, model, x, y) * math.nan
        return loss(self, model, x, y)

    monkeypatch.setattr(tasks.MnistTask, "loss", nan_at_256)
    assert main(["train", "mnist", "--train-items", "512", "--eval-items", "100", "--batch-sizes", "128", "256",
                 "--schemes", "legw", "--epochs", "2", "--quiet", "--device", "cpu", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "mnist" / "results.json").read_text())
    _check_stopped_early(res, 2)
    base, big = res["runs"]
    assert base["diverged"] is None
    assert big["diverged"] == {"epoch": 1, "reason": "non-finite training loss"}
    assert big["history"][0]["train_loss"] is None
    assert res["cells"][1]["test"] == {"mean": None, "std": None, "n": 0}
    assert res["cells"][1]["diverged"] == [{"seed": 0, "epoch": 1, "reason": "non-finite training loss"}]
    assert "diverged: legw B=256 seed 0 at epoch 1 (non-finite training loss)" in capsys.readouterr().out
    assert (tmp_path / "mnist" / "metric_vs_batch.png").read_bytes()[:8] == PNG_MAGIC
