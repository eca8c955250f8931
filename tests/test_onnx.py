"""torch.onnx.export of models holding legw_fused.LSTM / LSTMCell, run by onnxruntime, against the module itself.

While exporting, the modules compute with torch's own forward (translated to ONNX's LSTM); the module run here
computes with the "auto" backend (cpp), so the two sides are different implementations: they agree within the
LSTM tolerance of tests/_helpers.py.
"""

import pytest
import torch

import legw_fused
from _helpers import LSTM_TOL, assert_close_scaled

onnx = pytest.importorskip("onnx", reason="onnx is a test dependency (requirements.txt)")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is a test dependency (requirements.txt)")

# Input x: [B, T, I]; outputs: the head's [B, T, O] and the LSTM's h_n, c_n: [L*D, B, H], then the cell's h: [B, H].
B, T, I, H, O = 3, 6, 5, 8, 4


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = legw_fused.LSTM(I, H, num_layers=2, batch_first=True, bidirectional=True)
        self.cell = legw_fused.LSTMCell(2 * H, H)
        self.head = torch.nn.Linear(2 * H, O)

    def forward(self, x):
        y, (h_n, c_n) = self.lstm(x)
        h, _ = self.cell(y[:, -1])
        return self.head(y), h_n, c_n, h


# torch's two exporters: dynamo (the default) and the TorchScript-based one (deprecated, still in torch 2.14).
EXPORTERS = [pytest.param(True, id="dynamo"), pytest.param(False, id="torchscript")]


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_exported_model_matches_module(dynamo, tmp_path):
    if dynamo:
        pytest.importorskip("onnxscript", reason="torch's dynamo exporter needs onnxscript (requirements.txt)")
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(B, T, I)
    path = tmp_path / "net.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=dynamo)
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # Another input than the one traced: the graph must compute, not replay.
    x2 = torch.randn(B, T, I)
    got = session.run(None, {session.get_inputs()[0].name: x2.numpy()})
    with torch.no_grad():
        want = model(x2)
    assert model.lstm.backend == "auto" and not torch.onnx.is_in_onnx_export()
    assert len(got) == len(want)
    for name, g, w in zip(("head", "h_n", "c_n", "cell_h"), got, want):
        assert_close_scaled(name, torch.from_numpy(g), w, LSTM_TOL[torch.float32][0])
