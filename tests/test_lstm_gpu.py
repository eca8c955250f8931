"""GPU tests of legw_fused.LSTM: the cuda and triton backends against torch.nn.LSTM (float32, on the CPU: cuDNN
may use TF32) with the same weights, forward and every gradient. Skipped without a CUDA device."""

import pytest
import torch
from test_lstm import LAYER_CASES, _check_against_torch

import legw_fused
from _helpers import LSTM_TOL, assert_close_scaled
from legw_fused.backends import LSTM_BACKENDS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
GPU_BACKENDS = ["cuda", "triton"]


def require(name):
    reason = LSTM_BACKENDS[name].unavailable_reason("cuda")
    if reason is not None:
        pytest.skip(f"LSTM backend {name!r} unavailable: {reason}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", LAYER_CASES + [(6, 300, 16, 128, 1, True, False, True),
                                                (3, 33, 32, 650, 2, False, True, True)])
def test_matches_torch_on_gpu(backend, dtype, case):
    require(backend)
    _check_against_torch(backend, case, dtype, device="cuda")


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "per-step"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_both_kernels_on_gpu(monkeypatch, persistent, dtype):
    """Each strategy where the launcher picks it (nothing is compiled that cannot launch on this GPU): the persistent
    kernels at the H this device allows, the per-step ones (persistent turned off) at small and large H."""
    require("triton")
    from legw_fused.kernels import lstm as K

    device = torch.device("cuda")
    if persistent:
        sizes = [H for H in (17, 32, 37, 64, 128) if K.use_persistent("fwd", H, dtype, device)
                 and K.use_persistent("bwd", H, dtype, device)]
        if not sizes:
            pytest.skip(f"no persistent LSTM kernel fits on {torch.cuda.get_device_name()} for {dtype}")
    else:
        monkeypatch.setattr(K, "PERSISTENT_MAX_H", 0)
        sizes = [37, 128, 256]
    for H in sizes:
        _check_against_torch("triton", (5, 70, 24, H, 1, True, False, True), dtype, device="cuda")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_large_batch_forward(backend):
    """MNIST-LSTM at B = 8192: many programs / rows per launch."""
    require(backend)
    torch.manual_seed(0)
    ours = legw_fused.LSTM(28, 128, batch_first=True, device="cuda", backend=backend)
    ref = torch.nn.LSTM(28, 128, batch_first=True)
    ref.load_state_dict({k: v.cpu() for k, v in ours.state_dict().items()})
    x = torch.randn(8192, 28, 28)
    with torch.no_grad():
        out, (h, c) = ours(x.cuda())
        rout, (rh, rc) = ref(x)
    for name, a, b in (("output", out, rout), ("h_n", h, rh), ("c_n", c, rc)):
        assert_close_scaled(name, a, b, LSTM_TOL[torch.float32][0])
