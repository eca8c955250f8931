"""The "native" LSTM backend (torch's own kernel) and the CPU rule by which "auto" chooses between it and the C++
layer: the oracle is torch.nn.LSTM itself."""

import dataclasses

import pytest
import torch

import legw_fused
from _helpers import LSTM_TOL, assert_close_scaled
from legw_fused import backends


def _pair(**kwargs):
    torch.manual_seed(0)
    ref = torch.nn.LSTM(5, 7, **kwargs)
    ours = legw_fused.LSTM(5, 7, backend="native", **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def test_native_backend_is_torchs_own_lstm_bit_for_bit():
    ours, ref = _pair(num_layers=2)
    x = torch.randn(6, 3, 5, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, (h, c) = ours(x)
    out_ref, (h_ref, c_ref) = ref(x_ref)
    for a, b in ((out, out_ref), (h, h_ref), (c, c_ref)):
        assert torch.equal(a, b)
    (out.sum() + c.sum()).backward()
    (out_ref.sum() + c_ref.sum()).backward()
    assert torch.equal(x.grad, x_ref.grad)
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_native_backend_reverse_direction_by_flipping():
    """Bidirectional: the reverse direction runs torch's kernel on the flipped sequence."""
    ours, ref = _pair(bidirectional=True, batch_first=True)
    x = torch.randn(3, 6, 5, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, (h, c) = ours(x)
    out_ref, (h_ref, c_ref) = ref(x_ref)
    fwd_tol, grad_tol = LSTM_TOL[torch.float32]
    for name, a, b in (("out", out, out_ref), ("h", h, h_ref), ("c", c, c_ref)):
        assert_close_scaled(name, a, b, fwd_tol)
    out.pow(2).sum().backward()
    out_ref.pow(2).sum().backward()
    assert_close_scaled("dx", x.grad, x_ref.grad, grad_tol)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert_close_scaled(name, p.grad, q.grad, grad_tol)


@pytest.mark.parametrize("capability, first", [("AVX512", "native"), ("AVX512_VNNI", "native"), ("AVX2", "cpp"),
                                               ("DEFAULT", "cpp")])
def test_cpu_auto_rule_by_aten_capability(monkeypatch, capability, first):
    """Where the C++ layer has no whole-sequence kernel (a torch without an fp32 brgemm), and for bf16/fp16 where
    torch has native GEMMs for them: torch's oneDNN LSTM first on AVX-512 CPUs, the C++ layer elsewhere."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(backends.ops, "LSTM_CPU_SEQUENCE", False)
    for order, why in (backends._lstm_cpu_auto(), backends._lstm_cpu_auto_by_capability()):
        assert order[0] == first and order[-1] == "torch" and set(order) == {"native", "cpp", "torch"}
        assert capability in why


@pytest.mark.parametrize("capability", ["AVX512", "AVX2", "DEFAULT"])
def test_cpu_auto_takes_the_sequence_kernel_on_every_capability(monkeypatch, capability):
    """With the whole-sequence kernel built, fp32 training takes the C++ layer whatever the instruction set, and the
    reason names the kernel, its row loops and the measured figures."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(backends.ops, "LSTM_CPU_SEQUENCE", True)
    order, why = backends._lstm_cpu_auto()
    assert order == ("cpp", "native", "torch")
    assert f"{backends.ops.LSTM_CPU_GEMM} GEMMs" in why and backends.ops.LSTM_CPU_ROWS in why
    assert backends.LSTM_CPU_FIGURES in why


@pytest.mark.parametrize("capability", ["AVX512", "AVX2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_rule(monkeypatch, capability, dtype):
    """bf16/fp16: where torch has no native GEMM for the dtype (ops.LSTM_CPU_HALF_IN_FP32), its LSTM takes a slow
    generic path and the C++ layer computes in fp32: the C++ layer first, whatever the capability, with the measured
    figures; elsewhere the C++ layer's per-step path, where oneDNN's bf16 LSTM was faster on AVX-512 (0.6x at B
    128): the capability rule."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(backends.ops, "LSTM_CPU_HALF_IN_FP32", frozenset({dtype}))
    order, why = backends._lstm_cpu_half(dtype)
    assert order == ("cpp", "native", "torch")
    assert "fp32" in why and backends.LSTM_CPU_HALF_FIGURES in why
    monkeypatch.setattr(backends.ops, "LSTM_CPU_HALF_IN_FP32", frozenset())
    assert backends._lstm_cpu_half(dtype) == backends._lstm_cpu_auto_by_capability()


def test_half_precision_on_this_cpu_follows_the_rule():
    """The registry's "cpu:bfloat16" / "cpu:float16" keys carry the rule for this CPU, auto picks the first
    available, and fp32 keeps the device's order."""
    reg, cpu = backends.LSTM_BACKENDS, torch.device("cpu")
    for dtype in (torch.bfloat16, torch.float16):
        rule, why = backends._lstm_cpu_half(dtype)
        key = f"cpu:{str(dtype).removeprefix('torch.')}"
        assert reg.auto_order[key] == rule and reg.auto_why[key] == why
        available = [n for n in rule if reg[n].unavailable_reason("cpu", dtype) is None]
        assert backends.select(reg, "auto", cpu, dtype).name == available[0]
    assert backends.select(reg, "auto", cpu, torch.float32).name == backends.select(reg, "auto", cpu).name


def test_auto_on_this_cpu_follows_the_rule_and_says_why():
    order, why = backends._lstm_cpu_auto()
    assert backends.LSTM_BACKENDS.auto_order["cpu"] == order
    chosen = backends.select(backends.LSTM_BACKENDS, "auto", torch.device("cpu"), torch.float32)
    available = [n for n in order if backends.LSTM_BACKENDS[n].unavailable_reason("cpu", torch.float32) is None]
    assert chosen.name == available[0]
    info = legw_fused.backend_info()["lstm"]
    assert info["auto"]["cpu"] == chosen.name and info["auto_why"]["cpu"] == why
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith("AVX512"):
        print(f"this CPU dispatches ATen to {capability}: the AVX-512 branch of the rule is covered by "
              f"test_cpu_auto_rule_by_aten_capability only")


def test_lstm_cell_auto_takes_the_cpp_cell_on_cpu_and_says_why(monkeypatch):
    """LSTMCell's auto has its own order: the C++ cell first on every CPU (also where the layer's auto takes torch's
    oneDNN LSTM), and LSTMCell(backend="auto") runs it."""
    assert backends.LSTM_CELL_BACKENDS.auto_order["cpu"] == ("cpp", "native", "torch")
    if backends.LSTM_BACKENDS["cpp"].unavailable_reason("cpu") is not None:
        pytest.skip(backends.LSTM_BACKENDS["cpp"].unavailable_reason("cpu"))
    info = legw_fused.backend_info()["lstm"]
    assert info["auto_cell"]["cpu"] == "cpp" and "C++ cell" in info["auto_cell_why"]["cpu"]
    calls = []
    real = backends.LSTM_BACKENDS["cpp"].cell
    monkeypatch.setitem(backends.LSTM_CELL_BACKENDS, "cpp", dataclasses.replace(
        backends.LSTM_BACKENDS["cpp"], cell=lambda *a: calls.append(1) or real(*a)))
    cell, ref = legw_fused.LSTMCell(3, 4), torch.nn.LSTMCell(3, 4)
    ref.load_state_dict(cell.state_dict())
    x = torch.randn(2, 3)
    assert_close_scaled("h", cell(x)[0], ref(x)[0], LSTM_TOL[torch.float32][0])
    assert calls == [1]


def test_lstm_auto_takes_the_cpp_layer_for_float64_on_every_cpu():
    """fp64 has its own CPU order (torch's fp64 LSTM is no oneDNN kernel; the C++ layer measured 2.9x): the
    "cpu:float64" key overrides the device's order for that dtype only, and backend_info reports it."""
    assert backends.LSTM_BACKENDS.auto_order["cpu:float64"][0] == "cpp"
    if backends.LSTM_BACKENDS["cpp"].unavailable_reason("cpu") is not None:
        pytest.skip(backends.LSTM_BACKENDS["cpp"].unavailable_reason("cpu"))
    cpu = torch.device("cpu")
    assert backends.select(backends.LSTM_BACKENDS, "auto", cpu, torch.float64).name == "cpp"
    fp32 = backends.select(backends.LSTM_BACKENDS, "auto", cpu, torch.float32).name
    assert fp32 == backends.select(backends.LSTM_BACKENDS, "auto", cpu).name  # other dtypes: the device's order
    info = legw_fused.backend_info()["lstm"]
    assert info["auto"]["cpu:float64"] == "cpp" and "float64" in info["auto_why"]["cpu:float64"]


@pytest.mark.parametrize("sequence_kernel, first", [(True, "cpp"), (False, "native")])
def test_lstm_auto_without_gradients_rule(monkeypatch, sequence_kernel, first):
    """Evaluation and inference: the C++ inference op first where the sequence kernel is built (it keeps no gates for
    a backward), torch's kernel otherwise (the per-step forward writes them)."""
    monkeypatch.setattr(backends.ops, "LSTM_CPU_SEQUENCE", sequence_kernel)
    order, why = backends._lstm_cpu_no_grad()
    assert order[0] == first and order[-1] == "torch" and set(order) == {"native", "cpp", "torch"}
    assert "no gradients" in why


def test_lstm_auto_without_gradients_has_its_own_order_on_cpu(monkeypatch):
    """Evaluation and inference (grad mode off, or nothing requiring grad): "cpu:no_grad" has its own order for every
    dtype without a key of its own (float64's wins), and the module runs it; with gradients the device's order holds."""
    cpu = torch.device("cpu")
    reg = backends.LSTM_BACKENDS
    order, why = backends._lstm_cpu_no_grad()
    assert reg.auto_order["cpu:no_grad"] == order
    available = [n for n in order if reg[n].unavailable_reason("cpu", torch.float32) is None]
    assert backends.select(reg, "auto", cpu, torch.float32, grad=False).name == available[0]
    assert backends.select(reg, "auto", cpu, torch.float64, grad=False).name == \
        backends.select(reg, "auto", cpu, torch.float64).name
    info = legw_fused.backend_info()["lstm"]
    assert info["auto"]["cpu:no_grad"] == available[0] and info["auto_why"]["cpu:no_grad"] == why
    # Which backend the module runs in each mode, with the two orders made to differ.
    if reg["cpp"].unavailable_reason("cpu") is not None:
        pytest.skip(reg["cpp"].unavailable_reason("cpu"))
    monkeypatch.setitem(reg.auto_order, "cpu", ("cpp", "native", "torch"))
    monkeypatch.setitem(reg.auto_order, "cpu:no_grad", ("native", "cpp", "torch"))
    used = []
    for name in ("native", "cpp", "torch"):
        real = reg[name].layer
        monkeypatch.setitem(reg, name, dataclasses.replace(
            reg[name], layer=lambda *a, real=real, name=name: used.append(name) or real(*a)))
    ours, ref = _pair()
    ours.backend = "auto"
    x = torch.randn(4, 3, 5)
    with torch.no_grad():
        assert_close_scaled("out", ours(x)[0], ref(x)[0], LSTM_TOL[torch.float32][0])
    assert used == ["native"]
    for p in ours.parameters():
        p.requires_grad_(False)
    ours(x)  # grad mode on, but nothing requires grad
    assert used == ["native", "native"]
    for p in ours.parameters():
        p.requires_grad_(True)
    ours(x)[0].sum().backward()  # training: the device's order
    assert used == ["native", "native", "cpp"]
