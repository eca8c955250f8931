"""`legw-fused train mnist --distributed ddp|fsdp` under torchrun (2 CPU processes, gloo) trains exactly like one
process on the same global batches: each rank draws its share of the same DistributedSampler permutation, so a
2-rank step sees the same 256 images as a 1-rank step, and the LEGW schedule is built for the global batch."""

import json
import os
import subprocess
import sys

import pytest
from test_train import needs_mnist

ARGS = ["--train-items", "1024", "--eval-items", "256", "--batch-sizes", "128", "256", "--schemes", "legw",
        "--epochs", "2", "--quiet"]


def _torchrun(nproc: int, mode: str, out, extra=()) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "legw_fused", "train", "mnist", "--distributed", mode, "--out", str(out), *ARGS, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "mnist" / "results.json").read_text())


@needs_mnist
@pytest.mark.parametrize("mode,extra", [("ddp", ()), ("fsdp", ("--optimizer", "lars"))])
def test_two_ranks_train_like_one(tmp_path, mode, extra):
    two = _torchrun(2, mode, tmp_path / "two", extra)
    one = _torchrun(1, mode, tmp_path / "one", extra)
    assert two["distributed"] == {"mode": mode, "world_size": 2}
    assert one["distributed"] == {"mode": mode, "world_size": 1}
    for r2, r1 in zip(two["runs"], one["runs"], strict=True):
        assert (r2["batch"], r2["total_steps"], r2["peak_lr"]) == (r1["batch"], r1["total_steps"], r1["peak_lr"])
        for h2, h1 in zip(r2["history"], r1["history"], strict=True):
            # Gradients averaged over ranks instead of summed in one process: fp32 rounding only.
            assert h2["train_loss"] == pytest.approx(h1["train_loss"], rel=1e-4, abs=1e-5)
            assert abs(h2["val"] - h1["val"]) <= 1 / 256  # at most one of 256 images flips
    # Both trained (the same way): the baseline's loss fell from the first epoch to the second.
    base = one["runs"][0]["history"]
    assert base[1]["train_loss"] < base[0]["train_loss"]


@needs_mnist
def test_distributed_without_torchrun_says_how(monkeypatch, capsys, tmp_path):
    from legw_fused.cli import main

    monkeypatch.delenv("RANK", raising=False)
    assert main(["train", "mnist", "--distributed", "ddp", *ARGS, "--out", str(tmp_path)]) == 2
    assert "--distributed: start the command with torchrun" in capsys.readouterr().err
