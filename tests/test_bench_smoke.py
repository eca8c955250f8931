"""The benchmark scripts run end to end at tiny sizes and write well-formed results (figures come from real runs,
not from here: see bench/NOTES.md)."""

import json

import torch

from legw_fused.bench import lstm as bench_lstm


def test_lstm_bench_writes_rows_for_every_provider(tmp_path):
    assert bench_lstm.main(["--device", "cpu", "--settings", "mnist", "--batches", "2", "--warmup", "0",
                            "--reps", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "lstm_cpu.json").read_text())
    providers = {r["provider"] for r in data["rows"]}
    assert {"nn.LSTM", "nn.LSTMCell loop", "unfused PyTorch cell"} <= providers
    assert any(p.startswith("legw_fused.LSTM [") for p in providers)
    assert {r["pass"] for r in data["rows"]} == {"fwd", "fwd+bwd"}
    for r in data["rows"]:
        assert r["ms"] > 0 and r["TFLOPs"] > 0 and r["B"] == 2 and r["T"] == 28
    assert data["meta"]["torch"] == torch.__version__
    assert (tmp_path / "lstm_cpu.md").read_text().count("\n| mnist |") == len(data["rows"])
