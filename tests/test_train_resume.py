"""legw-fused train --resume: a sweep killed with SIGKILL in the middle of a training, resumed, ends with the results
of an uninterrupted run (bitwise on CPU: every loss and metric; only times differ); refusals that protect a sweep."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_train import needs_mnist

from legw_fused.cli import main
from legw_fused.train.checkpoint import checkpoint_path

ROOT = Path(__file__).resolve().parents[1]
# 512 images: batch 128 takes 4 steps per epoch, batch 256 two; 2 schemes x 2 batch sizes x 2 seeds, 2 epochs.
SWEEP = ["train", "mnist", "--train-items", "512", "--eval-items", "200", "--batch-sizes", "128", "256",
         "--schemes", "legw", "linear-goyal", "--epochs", "2", "--seeds", "0", "1", "--quiet", "--device", "cpu"]
# The sweep's 12th loss: seed 0's legw B=128 took 8 (2 epochs x 4 steps); legw B=256 took 2 in epoch 1 (then
# wrote its checkpoint) and 1 in epoch 2. The process stops there, inside the training, until it is killed.
BLOCK_AT = 12

BLOCKER = """
import sys, time
from pathlib import Path
from legw_fused.cli import main
from legw_fused.train import tasks

calls, loss = 0, tasks.MnistTask.loss

def blocking_loss(self, model, x, y):
    global calls
    calls += 1
    if calls == int(sys.argv[1]):
        Path(sys.argv[2]).touch()
        time.sleep(600)
    return loss(self, model, x, y)

tasks.MnistTask.loss = blocking_loss
sys.exit(main(sys.argv[3:]))
"""

TIMES = ("train_seconds", "samples_per_s", "time_to_target", "speedup")


def _timeless(results: dict) -> dict:
    """results.json without what depends on the clock or the session (wall times, date, command, resumes)."""
    drop = ("date", "total_seconds", "resumes", "command")
    runs = [{**{k: v for k, v in r.items() if k not in TIMES},
             "history": [{k: v for k, v in h.items() if k != "train_seconds"} for h in r["history"]]}
            for r in results["runs"]]
    cells = [{k: v for k, v in c.items() if k not in TIMES} for c in results["cells"]]
    return {**{k: v for k, v in results.items() if k not in drop}, "runs": runs, "cells": cells}


def _kill_mid_training(out: Path, marker: Path, sweep=SWEEP, block_at=BLOCK_AT, env=None) -> None:
    proc = subprocess.Popen([sys.executable, "-c", BLOCKER, str(block_at), str(marker), *sweep, "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None, f"the sweep ended before it was killed: {proc.stderr.read().decode()[-3000:]}"
        assert time.monotonic() < deadline, "the sweep never reached the point where it is killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


@needs_mnist
def test_sweep_killed_mid_training_resumes_to_the_uninterrupted_results(tmp_path, capsys):
    killed = tmp_path / "killed"
    _kill_mid_training(killed, tmp_path / "blocked")
    sweep = killed / "mnist"
    saved = json.loads((sweep / "results.json").read_text())
    assert saved["complete"] is False
    assert [(r["scheme"], r["batch"], r["seed"]) for r in saved["runs"]] == [("legw", 128, 0)]
    ckpt_file = checkpoint_path(sweep, "legw", 256, 0)
    ckpt = torch.load(ckpt_file, weights_only=True)  # plain values and tensors only
    assert (ckpt["epoch"], ckpt["step"], len(ckpt["history"])) == (1, 2, 1)
    assert ckpt["optimizer"]["param_groups"][0]["lr"]["legw"]["batch_size"] == 256
    assert not checkpoint_path(sweep, "legw", 128, 0).exists()  # deleted once its result was recorded
    frozen = {p: p.read_bytes() for p in (sweep / "results.json", ckpt_file)}

    # Neither a fresh start nor a resume with other options touches the unfinished sweep.
    assert main([*SWEEP, "--out", str(killed)]) == 2
    err = capsys.readouterr().err
    assert "unfinished sweep (1 of 8 trainings done)" in err and "--resume" in err
    other = [*SWEEP[:SWEEP.index("--epochs") + 1], "4", *SWEEP[SWEEP.index("--epochs") + 2:]]
    assert main([*other, "--out", str(killed), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--resume: --epochs differs" in err and "(2 there, 4 now)" in err
    assert main([*SWEEP, "--seeds", "0", "--out", str(killed), "--resume"]) == 2
    assert "--resume: --seeds differs" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in frozen} == frozen

    assert main([*SWEEP, "--out", str(killed), "--resume"]) == 0
    resumed = json.loads((sweep / "results.json").read_text())
    assert main([*SWEEP, "--out", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "mnist" / "results.json").read_text())
    assert resumed["complete"] and resumed["resumes"] == 1 and len(resumed["runs"]) == 8
    assert _timeless(resumed) == _timeless(whole)
    assert not (sweep / "checkpoints").exists()
    # The comparison can fail: the seeds trained differently, and the interrupted training did train on.
    legw256 = [r for r in whole["runs"] if (r["scheme"], r["batch"]) == ("legw", 256)]
    assert legw256[0]["history"] != legw256[1]["history"]
    assert len({h["train_loss"] for h in legw256[0]["history"]}) == 2


@needs_mnist
def test_resume_of_a_finished_sweep_trains_nothing_and_a_rerun_replaces_it(tmp_path, capsys):
    tiny = ["train", "mnist", "--train-items", "256", "--eval-items", "100", "--batch-sizes", "128", "--schemes",
            "legw", "--epochs", "1", "--quiet", "--device", "cpu", "--out", str(tmp_path)]
    path = tmp_path / "mnist" / "results.json"
    stale = checkpoint_path(tmp_path / "mnist", "legw", 128, 0)
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"not a checkpoint")  # with no results.json it belongs to no sweep: never loaded
    assert main([*tiny, "--resume"]) == 0  # nothing to resume: a fresh sweep
    assert not stale.parent.exists()
    first = json.loads(path.read_text())
    assert first["complete"] and first["resumes"] == 0
    assert main([*tiny, "--resume"]) == 0
    again = json.loads(path.read_text())
    assert again["resumes"] == 1 and again["runs"] == first["runs"]  # the same record, times included: not retrained
    # Each run names the code that trained it; a resume by other code keeps that (the file's "commit" is its
    # last writer). Runs recorded before runs carried a commit get the commit of the file that recorded them.
    assert all(r["commit"] == first["commit"] for r in first["runs"])
    older = {**again, "commit": "0123abc", "runs": [{k: v for k, v in r.items() if k != "commit"}
                                                    for r in again["runs"]]}
    path.write_text(json.dumps(older))
    assert main([*tiny, "--resume"]) == 0
    resumed = json.loads(path.read_text())
    assert [r["commit"] for r in resumed["runs"]] == ["0123abc"] and resumed["commit"] == first["commit"]
    assert main(tiny) == 0  # a finished sweep is replaced, as a rerun of a command always did
    assert json.loads(path.read_text())["resumes"] == 0
    capsys.readouterr()


@needs_mnist
def test_resume_of_results_without_options_is_a_clear_error(tmp_path, capsys):
    """results.json from before resumable sweeps records no options: it cannot be checked, so it is not resumed;
    a broken one is not guessed at either."""
    (tmp_path / "mnist").mkdir()
    old = {"task": "mnist", "runs": [], "schemes": ["legw"], "batch_sizes": [128]}
    (tmp_path / "mnist" / "results.json").write_text(json.dumps(old))
    assert main(["train", "mnist", "--out", str(tmp_path), "--resume", "--quiet", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--resume:" in err and "no record of its options" in err
    assert json.loads((tmp_path / "mnist" / "results.json").read_text()) == old
    (tmp_path / "mnist" / "results.json").write_text('{"task": "mn')
    assert main(["train", "mnist", "--out", str(tmp_path), "--quiet", "--device", "cpu"]) == 2
    assert "results.json is not a results file" in capsys.readouterr().err


@pytest.fixture
def one_rank_group(monkeypatch):
    """The environment torchrun gives a 1-rank job (gloo on CPU); the process group is gone afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield {**os.environ, **env}
    if dist.is_initialized():
        dist.destroy_process_group()


@needs_mnist
@pytest.mark.parametrize("mode,optimizer", [("ddp", "sgd"), ("fsdp", "lars")])
def test_distributed_sweep_resumes_from_its_shards(tmp_path, capsys, one_rank_group, mode, optimizer):
    """Under --distributed the model and optimizer (FSDP: DTensor shards) go through torch.distributed.checkpoint;
    killed and resumed, the sweep ends as an uninterrupted one (1 rank here; the sharded path is the same)."""
    sweep = ["train", "mnist", "--train-items", "256", "--eval-items", "100", "--batch-sizes", "128", "--schemes",
             "legw", "--epochs", "3", "--quiet", "--device", "cpu", "--distributed", mode, "--optimizer", optimizer]
    killed = tmp_path / "killed"
    # Two steps per epoch: killed at the 2nd step of epoch 2, after the checkpoint of epoch 1.
    _kill_mid_training(killed, tmp_path / "blocked", sweep, 4, one_rank_group)
    ckpt_file = checkpoint_path(killed / "mnist", "legw", 128, 0)
    ckpt = torch.load(ckpt_file, weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["shards"] == "legw-B128-seed0-epoch1"
    assert (ckpt_file.parent / ckpt["shards"] / ".metadata").exists()
    assert main([*sweep, "--out", str(killed), "--resume"]) == 0
    assert main([*sweep, "--out", str(tmp_path / "whole")]) == 0
    resumed, whole = (json.loads((tmp_path / d / "mnist" / "results.json").read_text()) for d in ("killed", "whole"))
    assert resumed["resumes"] == 1 and _timeless(resumed) == _timeless(whole)
    assert not (killed / "mnist" / "checkpoints").exists()
    capsys.readouterr()
