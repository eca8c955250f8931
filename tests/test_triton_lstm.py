"""The Triton LSTM's choice of strategy, made before launching from the table of what fits (kernels/lstm.py's
PERSISTENT_MAX_BH, checked against compiled kernels by test_triton_aot.py), on simulated GPUs."""

import types

import pytest
import torch

from _helpers import require_backend


@pytest.fixture
def K():
    require_backend("triton")
    from legw_fused.kernels import lstm

    return lstm


def _gpu(monkeypatch, capability, shared_optin):
    props = types.SimpleNamespace(shared_memory_per_block_optin=shared_optin)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    return torch.device("cuda", 0)


@pytest.mark.parametrize("capability,shared", [((9, 0), 232448), ((8, 0), 166912)], ids=["sm_90", "sm_80"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_persistent_up_to_the_tables_block_size(K, monkeypatch, capability, shared, dtype, direction):
    device = _gpu(monkeypatch, capability, shared)
    max_bh = K.PERSISTENT_MAX_BH[(capability[0], direction, K._NAMES[dtype])]
    assert K.use_persistent(direction, max_bh, dtype, device)
    assert K.use_persistent(direction, max_bh // 2 + 1, dtype, device)  # padded up to max_bh
    assert not K.use_persistent(direction, max_bh + 1, dtype, device)  # padded to 2 * max_bh: not in the table


@pytest.mark.parametrize("capability,shared", [((8, 6), 101376), ((8, 9), 101376), ((12, 0), 101376),
                                               ((10, 0), 232448), ((7, 0), 98304)])
def test_gpus_not_checked_run_per_step(K, monkeypatch, capability, shared):
    """Less per-block shared memory than the budget a major's entries were checked against (sm_86, sm_89), or a
    major never compiled (Blackwell, Volta): the per-step kernels, which fit everywhere."""
    device = _gpu(monkeypatch, capability, shared)
    assert not any(K.use_persistent(d, 16, dtype, device) for d in ("fwd", "bwd")
                   for dtype in (torch.float32, torch.bfloat16))


def test_interpreter_runs_persistent_up_to_the_cap(K, monkeypatch):
    cpu = torch.device("cpu")
    assert K.use_persistent("fwd", K.PERSISTENT_MAX_H, torch.float32, cpu)
    assert not K.use_persistent("fwd", K.PERSISTENT_MAX_H + 1, torch.float32, cpu)
    monkeypatch.setattr(K, "PERSISTENT_MAX_H", 0)
    assert not K.use_persistent("bwd", 1, torch.float32, cpu)
