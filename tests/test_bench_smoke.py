"""The benchmark scripts run end to end at tiny sizes and write well-formed results (figures come from real runs,
not from here: see bench/NOTES.md)."""

import json

import torch

from legw_fused.bench import lstm as bench_lstm


def test_lstm_bench_writes_rows_for_every_provider(tmp_path):
    assert bench_lstm.main(["--device", "cpu", "--settings", "mnist", "--batches", "2", "--warmup", "0",
                            "--reps", "1", "--out", str(tmp_path)]) == 0
    (data,) = json.loads((tmp_path / "lstm_cpu.json").read_text())["runs"]
    providers = {r["provider"] for r in data["rows"]}
    assert {"nn.LSTM", "nn.LSTMCell loop", "unfused PyTorch cell"} <= providers
    assert any(p.startswith("legw_fused.LSTM [") for p in providers)
    assert "legw_fused.LSTMCell loop [auto]" in providers
    for r in data["rows"]:  # cell loops are also compared with nn.LSTMCell's loop
        assert (r["vs_nn_LSTMCell"] is not None) == ("LSTMCell loop" in r["provider"])
        if r["provider"] == "nn.LSTMCell loop":
            assert r["vs_nn_LSTMCell"] == 1.0
    assert {r["pass"] for r in data["rows"]} == {"fwd", "fwd+bwd"}
    for r in data["rows"]:
        assert 0 < r["p20"] <= r["ms"] <= r["p80"] and r["TFLOPs"] > 0 and r["B"] == 2 and r["T"] == 28
    assert data["meta"]["torch"] == torch.__version__
    assert data["meta"]["cpu"] and "aten_cpu_capability" in data["meta"]  # the CPU is named in every result
    assert (tmp_path / "lstm_cpu.md").read_text().count("\n| mnist |") == len(data["rows"])


def test_optimizer_bench_writes_rows_for_every_provider(tmp_path):
    from legw_fused.bench import optimizer as bench_optimizer

    assert bench_optimizer.main(["--device", "cpu", "--sets", "host-161", "--warmup", "0", "--reps", "2",
                                 "--out", str(tmp_path)]) == 0
    (data,) = json.loads((tmp_path / "optimizer_cpu.json").read_text())["runs"]
    providers = [r["provider"] for r in data["rows"]]
    assert {"torch SGD foreach + LambdaLR", "legw_fused.SGD [torch]", "legw_fused.LARS [torch]"} <= set(providers)
    assert providers[:2] == ["one copy_ pass (flat)", "one add_ pass (flat)"]
    for r in data["rows"]:
        assert r["set"] == "host-161" and r["tensors"] == 161 and r["numel"] == 161 and r["ms"] > 0
        assert r["bytes_per_elem"] == {"copy": 8, "add": 12, "sgd": 20, "lars": 24}[r["kind"]]
    # The first provider of each kind is its baseline.
    first = {}
    for r in data["rows"]:
        first.setdefault(r["kind"], r)
        assert abs(r["speedup"] - first[r["kind"]]["ms"] / r["ms"]) < 1e-9
    md = (tmp_path / "optimizer_cpu.md").read_text()
    assert md.count("\n| host-161 |") == len(data["rows"]) and "host-side cost" in md


def test_results_keep_their_history(tmp_path):
    """A second run is appended to the first (and a file from before the history becomes its first run)."""
    from legw_fused.bench.harness import write_results

    (tmp_path / "x.json").write_text(json.dumps({"meta": {"commit": "old"}, "rows": [{"ms": 1.0}]}))
    write_results(tmp_path, "x", {"commit": "a"}, [{"ms": 2.0}], "table a\n")
    write_results(tmp_path, "x", {"commit": "b"}, [{"ms": 3.0}], "table b\n")
    runs = json.loads((tmp_path / "x.json").read_text())["runs"]
    assert [r["meta"]["commit"] for r in runs] == ["old", "a", "b"]
    assert [r["rows"][0]["ms"] for r in runs] == [1.0, 2.0, 3.0]
    assert (tmp_path / "x.md").read_text() == "table b\n"


def test_results_name_uncommitted_code(tmp_path):
    """A run on a tree whose tracked code differs from HEAD is labelled "<hash>+modified"; new results under
    bench/results/ (what a run writes) and untracked files do not count."""
    import subprocess

    from legw_fused.bench.harness import commit

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("a = 1\n")
    (tmp_path / "bench" / "results" / "x.json").write_text("{}\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True,
                          text=True).stdout.strip()
    assert commit(tmp_path) == head
    (tmp_path / "bench" / "results" / "x.json").write_text('{"runs": []}\n')
    (tmp_path / "new.py").write_text("b = 2\n")
    assert commit(tmp_path) == head
    (tmp_path / "code.py").write_text("a = 2\n")
    assert commit(tmp_path) == head + "+modified"
