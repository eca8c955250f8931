"""legw_fused.LSTM / LSTMCell / functional against torch.nn.LSTM / torch.nn.LSTMCell with the same weights.

Oracle: torch's own modules in float32 (or float64 for gradcheck). Low-precision runs are compared with the float32
oracle run on the same (rounded) weights and inputs, within a per-dtype bound relative to the tensor's magnitude.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import legw_fused
from _helpers import LSTM_TOL, assert_close_scaled
from legw_fused import functional as LF
from legw_fused import ops
from legw_fused.backends import LSTM_BACKENDS

# Worst error allowed, as a fraction of max(1, max |oracle|), for outputs/states and for gradients. fp32: a few
# ulps accumulated over T steps and a GEMM of length I+H. bf16/fp16: the inputs of every GEMM are rounded to 8/11
# significant bits, so errors of a few 2^-8 / 2^-11 relative to the magnitude are expected (torch's own bf16 LSTM
# differs from its fp32 one by as much).

BACKENDS = [name for name in ("torch", "cpp", "triton") if name in LSTM_BACKENDS]


@pytest.fixture(params=BACKENDS)
def lstm_backend(request):
    reason = LSTM_BACKENDS[request.param].unavailable_reason("cpu")
    if reason is not None:
        pytest.skip(f"LSTM backend {request.param!r} unavailable: {reason}")
    return request.param


def _pair(cls_ours, cls_torch, *args, dtype=torch.float32, backend="auto", device="cpu", **kwargs):
    """Our module in ``dtype`` on ``device`` and torch's in float32 on the CPU with the same (dtype-rounded)
    weights (the oracle stays on the CPU: cuDNN may use TF32)."""
    ours = cls_ours(*args, **kwargs, dtype=dtype, backend=backend, device=device)
    ref = cls_torch(*args, **kwargs)
    ref.load_state_dict({k: v.float().cpu() for k, v in ours.state_dict().items()})
    return ours, ref


LAYER_CASES = [
    # (T, B, I, H, num_layers, bidirectional, batch_first, bias)
    (5, 3, 4, 6, 1, False, False, True),
    (1, 1, 3, 37, 1, False, False, True),      # T = 1, B = 1, odd H
    (7, 2, 11, 37, 2, False, True, True),      # I != H, 2 layers, batch_first
    (4, 3, 5, 8, 2, True, False, True),        # bidirectional
    (3, 2, 4, 5, 1, True, True, False),        # no bias
]


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: "T{}B{}I{}H{}L{}{}{}{}".format(
    *c[:5], "-bi" if c[5] else "", "-bf" if c[6] else "", "" if c[7] else "-nobias"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_lstm_matches_torch(lstm_backend, case, dtype):
    _check_against_torch(lstm_backend, case, dtype)


def _check_against_torch(lstm_backend, case, dtype, device="cpu"):
    T, B, I, H, L, bi, bf, bias = case
    torch.manual_seed(0)
    ours, ref = _pair(legw_fused.LSTM, nn.LSTM, I, H, L, bias, bf, 0.0, bi, dtype=dtype, backend=lstm_backend,
                      device=device)
    D = 2 if bi else 1
    x = torch.randn((B, T, I) if bf else (T, B, I)).to(dtype)
    h0 = (0.5 * torch.randn(L * D, B, H)).to(dtype)
    c0 = torch.randn(L * D, B, H).to(dtype)
    xs = [t.to(device, copy=True).requires_grad_() for t in (x, h0, c0)]
    xr = [t.float().clone().requires_grad_() for t in (x, h0, c0)]
    out, (h_n, c_n) = ours(xs[0], (xs[1], xs[2]))
    rout, (rh, rc) = ref(xr[0], (xr[1], xr[2]))
    assert out.dtype == h_n.dtype == c_n.dtype == dtype
    ftol, gtol = LSTM_TOL[dtype]
    for name, a, b in (("output", out, rout), ("h_n", h_n, rh), ("c_n", c_n, rc)):
        assert_close_scaled(name, a, b, ftol)
    # One backward through all three outputs, with random cotangents.
    cot = [torch.randn_like(t, dtype=torch.float32) for t in (rout, rh, rc)]
    torch.autograd.backward([out, h_n, c_n], [c.to(device, dtype) for c in cot])
    torch.autograd.backward([rout, rh, rc], cot)
    for name, a, b in zip(("d input", "d h0", "d c0"), xs, xr):
        assert_close_scaled(name, a.grad, b.grad, gtol)
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        assert_close_scaled(f"d {name}", p.grad, q.grad, gtol)


@pytest.mark.parametrize("threads", [1, 3])
def test_cpp_batch_slices(threads):
    """The CPU op runs each thread's batch rows through the whole time loop on their own (B >= 32 rows a slice):
    uneven slices (70 rows over 3 threads) must give torch's results, forward and backward, both directions."""
    if LSTM_BACKENDS["cpp"].unavailable_reason("cpu") is not None:
        pytest.skip(LSTM_BACKENDS["cpp"].unavailable_reason("cpu"))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_against_torch("cpp", (4, 70, 6, 9, 1, True, False, True), torch.float32)
    finally:
        torch.set_num_threads(before)


# The C++ CPU layer's instruction-set paths (csrc/lstm.cpp): the row loops are built for baseline x86-64, AVX2 and
# AVX-512 and chosen by ATen's CPU capability; fp32 sequences run their GEMMs on oneDNN's brgemm, whose JIT follows
# ONEDNN_MAX_CPU_ISA and which falls back to torch's gemm below AVX2 or with oneDNN disabled. Each path is checked
# against nn.LSTM on the machine at hand; a path this CPU cannot execute is skipped and says so.
ISA_CASES = [(6, 70, 6, 9, 1, True, False, True),  # two batch slices on two threads, both directions
             (5, 3, 4, 6, 1, False, False, True)]
ISA_RUNS = {  # the row loops' build: the environment that selects it, the CPU flags it needs
    "avx2": ({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}, {"avx2", "fma"}),
    "baseline": ({"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}, set()),
}
ISA_SUBPROCESS = "LEGW_FUSED_TEST_LSTM_ISA_SUBPROCESS"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _check_isa_cases():
    for case in ISA_CASES:
        for dtype in (torch.float32, torch.bfloat16):
            _check_against_torch("cpp", case, dtype)
    _check_final_state_only("cpp", ISA_CASES[0])


def _check_final_state_only(backend, case):
    """A loss on h_n and c_n alone (a classifier reading the last state; every LSTMCell step but the last): the
    layer's output gets no gradient, so the backward runs without one (the C++ row loops' own branch)."""
    T, B, I, H, L, bi, bf, bias = case
    torch.manual_seed(2)
    ours, ref = _pair(legw_fused.LSTM, nn.LSTM, I, H, L, bias, bf, 0.0, bi, backend=backend)
    x = torch.randn((B, T, I) if bf else (T, B, I))
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    cot = torch.randn(2, L * (2 if bi else 1), B, H)
    for m, inp in ((ours, xs), (ref, xr)):
        _, (h_n, c_n) = m(inp)
        torch.autograd.backward([h_n, c_n], [cot[0], cot[1]])
    gtol = LSTM_TOL[torch.float32][1]
    assert_close_scaled("d input", xs.grad, xr.grad, gtol)
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        assert_close_scaled(f"d {name}", p.grad, q.grad, gtol)


def test_loss_on_the_final_state_only(lstm_backend):
    _check_final_state_only(lstm_backend, (6, 70, 6, 9, 1, True, False, True))


def _skip_without_cpp():
    if LSTM_BACKENDS["cpp"].unavailable_reason("cpu") is not None:
        pytest.skip(LSTM_BACKENDS["cpp"].unavailable_reason("cpu"))


def test_cpp_row_loops_follow_aten_capability_and_the_cpu():
    _skip_without_cpp()
    capability, flags = torch.backends.cpu.get_cpu_capability(), _cpu_flags()
    if capability.startswith("AVX512") and {"avx512f", "avx512vl", "avx512bw", "avx512dq"} <= flags:
        expected = "avx512"
    elif capability != "DEFAULT" and {"avx2", "fma"} <= flags:
        expected = "avx2"
    else:
        expected = "baseline"
    assert ops.LSTM_CPU_ROWS == expected, (capability, sorted(f for f in flags if f.startswith("avx")))


def test_cpp_sequence_kernel_built_where_torch_has_an_fp32_brgemm():
    _skip_without_cpp()
    header = Path(torch.__file__).parent / "include" / "ATen" / "native" / "CPUBlas.h"
    if not header.exists():
        pytest.skip(f"torch ships no {header}: cannot tell which brgemm it exports")
    assert ops.LSTM_CPU_SEQUENCE == ("CPUBLAS_BRGEMM_F32F32F32" in header.read_text())


def test_cpp_layer_this_processes_rows():
    """The build this process runs (AVX-512 on an AVX-512 CPU), oneDNN's brgemm at the CPU's own level."""
    _skip_without_cpp()
    _check_isa_cases()


def test_cpp_layer_avx512_rows_ran_here():
    _skip_without_cpp()
    if ops.LSTM_CPU_ROWS != "avx512":
        pytest.skip(f"this process runs the {ops.LSTM_CPU_ROWS} row loops (ATen capability "
                    f"{torch.backends.cpu.get_cpu_capability()}): the AVX-512 build cannot be checked on this CPU")
    _check_isa_cases()


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
def test_cpp_layer_with_onednn_disabled():
    """torch.backends.mkldnn disabled: the brgemm calls fall back to torch's gemm."""
    _skip_without_cpp()
    with torch.backends.mkldnn.flags(enabled=False):
        _check_isa_cases()


@pytest.mark.skipif(ISA_SUBPROCESS in os.environ, reason="already the subprocess")
@pytest.mark.parametrize("rows", sorted(ISA_RUNS))
def test_cpp_layer_on_a_lower_instruction_set(rows):
    """A fresh process with ATen's capability (which picks the row loops) and oneDNN's JIT held to a lower level."""
    _skip_without_cpp()
    env_vars, needs = ISA_RUNS[rows]
    if needs - _cpu_flags():
        pytest.skip(f"this CPU lacks {sorted(needs - _cpu_flags())}: the {rows} build cannot run here")
    script = (f"import legw_fused.ops as o, test_lstm as t\n"
              f"assert o.LSTM_CPU_ROWS == {rows!r}, o.LSTM_CPU_ROWS\n"
              f"t._check_isa_cases()\n")
    out = _run_test_subprocess(script, env_vars)
    assert out.returncode == 0, out.stdout + out.stderr


# The fp32 sequence kernel's GEMMs (csrc/lstm.cpp, seq_gemm): oneDNN's brgemm or the BLAS sgemm that ATen calls (MKL
# in x86-64 wheels), one per process, by LEGW_FUSED_LSTM_CPU_GEMM or else by the instruction set. Both run here in
# fresh processes. The added case has H 64, so that dh = dA·W_hh runs on the BLAS too (narrower products stay on
# brgemm), and two bidirectional layers: the first layer's dx is narrow (I 20), the second's wide (I 128).
GEMM_CASES = ISA_CASES + [(5, 66, 20, 64, 2, True, True, True)]
GEMM_ENV = "LEGW_FUSED_LSTM_CPU_GEMM"


def _check_gemm_cases():
    for case in GEMM_CASES:
        _check_against_torch("cpp", case, torch.float32)
    # Without gradients the layer runs the inference op, whose forward keeps no gates: the same GEMMs.
    torch.manual_seed(1)
    ours, ref = _pair(legw_fused.LSTM, nn.LSTM, 20, 64, 2, True, False, 0.0, True, backend="cpp")
    x = torch.randn(6, 66, 20)
    with torch.no_grad():
        for name, a, b in zip(("output", "h_n", "c_n"), *(_flat(m(x)) for m in (ours, ref))):
            assert_close_scaled(f"no-grad {name}", a, b, LSTM_TOL[torch.float32][0])


def _flat(result):
    out, (h_n, c_n) = result
    return out, h_n, c_n


def _skip_without_sequence_kernel():
    _skip_without_cpp()
    if not ops.LSTM_CPU_SEQUENCE:
        pytest.skip("this torch exports no fp32 brgemm: the C++ layer has no sequence kernel (per-step path only)")


def test_cpp_sequence_gemm_follows_the_instruction_set():
    """Unchosen: brgemm where ATen runs AVX-512 code (it beat MKL there, which takes no AVX-512 path on AMD CPUs), the
    BLAS elsewhere (MKL beat brgemm's AVX2 kernel), brgemm alone where torch exports no BLAS sgemm."""
    _skip_without_sequence_kernel()
    if os.environ.get(GEMM_ENV, "auto") != "auto":
        pytest.skip(f"{GEMM_ENV}={os.environ[GEMM_ENV]} chose the GEMMs of this process")
    expected = "brgemm" if ops.LSTM_CPU_ROWS == "avx512" or not ops.LSTM_CPU_BLAS else "blas"
    assert ops.LSTM_CPU_GEMM == expected, (ops.LSTM_CPU_ROWS, ops.LSTM_CPU_BLAS)


@pytest.mark.skipif(ISA_SUBPROCESS in os.environ, reason="already the subprocess")
@pytest.mark.parametrize("gemm", ["brgemm", "blas"])
def test_cpp_layer_on_each_sequence_gemm(gemm):
    """Each GEMM choice, in a fresh process, against nn.LSTM: outputs, states and every gradient, both directions,
    two slices, the inference op."""
    _skip_without_sequence_kernel()
    if gemm == "blas" and not ops.LSTM_CPU_BLAS:
        pytest.skip("torch's libraries export no BLAS sgemm_: the sequence kernel runs on brgemm alone")
    script = (f"import legw_fused.ops as o, test_lstm as t\n"
              f"assert o.LSTM_CPU_GEMM == {gemm!r}, o.LSTM_CPU_GEMM\n"
              f"t._check_gemm_cases()\n")
    out = _run_test_subprocess(script, {GEMM_ENV: gemm})
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.skipif(ISA_SUBPROCESS in os.environ, reason="already the subprocess")
def test_an_unknown_gemm_choice_fails_the_import_and_names_the_variable():
    _skip_without_cpp()
    out = _run_test_subprocess("import legw_fused\n", {GEMM_ENV: "mkl"})
    assert out.returncode != 0
    assert f"ValueError: {GEMM_ENV} must be auto, brgemm or blas, got 'mkl'" in out.stderr, out.stderr


def _run_test_subprocess(script: str, env_vars: dict) -> subprocess.CompletedProcess:
    """``script`` in a fresh interpreter that can import this module, with ``env_vars`` set."""
    tests = Path(__file__).resolve().parent
    env = dict(os.environ, **env_vars, PYTHONPATH=os.pathsep.join(
        [str(tests), str(tests.parent), os.environ.get("PYTHONPATH", "")]), **{ISA_SUBPROCESS: "1"})
    return subprocess.run([sys.executable, "-c", script], env=env, cwd=tests.parent, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("case", [(6, 70, 6, 9, 1, True, False, True), (1, 3, 4, 5, 1, False, False, True),
                                  (5, 3, 4, 6, 2, False, True, False)], ids=["slices-bi", "T1", "2-layers-nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpp_layer_without_gradients_runs_the_inference_op(monkeypatch, case, dtype):
    """No gradient to take (grad mode off, or nothing requiring grad): the C++ layer runs lstm_layer_infer, which keeps
    nothing for a backward, and gives nn.LSTM's outputs; with gradients it runs lstm_layer_fwd."""
    _skip_without_cpp()
    T, B, I, H, L, bi, bf, bias = case
    torch.manual_seed(0)
    ours, ref = _pair(legw_fused.LSTM, nn.LSTM, I, H, L, bias, bf, 0.0, bi, dtype=dtype, backend="cpp")
    D = 2 if bi else 1
    x = torch.randn((B, T, I) if bf else (T, B, I))
    h0, c0 = 0.5 * torch.randn(L * D, B, H), torch.randn(L * D, B, H)
    called = []
    for op in ("lstm_layer_infer", "lstm_layer_fwd"):
        real = getattr(torch.ops.legw_fused, op)
        monkeypatch.setattr(torch.ops.legw_fused, op, lambda *a, real=real, op=op: called.append(op) or real(*a))
    with torch.no_grad():
        rout, (rh, rc) = ref(x, (h0, c0))
        out, (h, c) = ours(x.to(dtype), (h0.to(dtype), c0.to(dtype)))
    assert set(called) == {"lstm_layer_infer"} and len(called) == L * D
    for name, a, b in (("output", out, rout), ("h_n", h, rh), ("c_n", c, rc)):
        assert_close_scaled(name, a, b, LSTM_TOL[dtype][0])
    called.clear()
    ours(x.to(dtype).requires_grad_(), (h0.to(dtype), c0.to(dtype)))
    assert set(called) == {"lstm_layer_fwd"}


# bf16/fp16 on the C++ CPU layer: in fp32 on the sequence kernel where torch has no native GEMM for the dtype on this
# CPU (ops.LSTM_CPU_HALF_IN_FP32), else the per-step path in the dtype itself. Both run here whatever the CPU: the
# set is replaced for the test.
HALF_PATHS = {"in-fp32": lambda dt: frozenset({dt}), "per-step": lambda dt: frozenset()}


def test_cpp_half_in_fp32_follows_torchs_own_check():
    """The half dtypes widened to fp32 are those oneDNN (torch's CPU GEMMs) has no instructions for on this CPU."""
    native = {torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported(),
              torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported()}
    want = {dt for dt, ok in native.items() if not ok} if ops.LSTM_CPU_SEQUENCE else set()
    assert ops.LSTM_CPU_HALF_IN_FP32 == want, (native, ops.LSTM_CPU_SEQUENCE)


@pytest.mark.parametrize("path", HALF_PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpp_half_precision_paths_match_torch(monkeypatch, path, dtype):
    """Both half-precision paths of the C++ layer and cell against nn.LSTM / nn.LSTMCell in fp32: outputs, states
    and every gradient, returned in the module's dtype; the layer cases include batch slices, both directions, two
    layers and no bias."""
    _skip_without_cpp()
    monkeypatch.setattr(ops, "LSTM_CPU_HALF_IN_FP32", HALF_PATHS[path](dtype))
    for case in [(6, 70, 6, 9, 1, True, False, True), (7, 2, 11, 37, 2, False, True, True),
                 (3, 2, 4, 5, 1, True, True, False)]:
        _check_against_torch("cpp", case, dtype)
    torch.manual_seed(3)
    ours, ref = _pair(legw_fused.LSTMCell, nn.LSTMCell, 6, 37, dtype=dtype, backend="cpp")
    x, h0, c0 = (torch.randn(3, 6).to(dtype), torch.randn(3, 37).to(dtype), torch.randn(3, 37).to(dtype))
    a = [t.clone().requires_grad_() for t in (x, h0, c0)]
    b = [t.float().requires_grad_() for t in (x, h0, c0)]
    h, c = ours(a[0], (a[1], a[2]))
    rh, rc = ref(b[0], (b[1], b[2]))
    assert h.dtype == c.dtype == dtype
    ftol, gtol = LSTM_TOL[dtype]
    assert_close_scaled("cell h", h, rh, ftol)
    assert_close_scaled("cell c", c, rc, ftol)
    (h.float().sum() + (c.float() ** 2).sum()).backward()
    (rh.sum() + (rc ** 2).sum()).backward()
    for name, p, q in zip(("dx", "dh", "dc"), a, b):
        assert p.grad.dtype == dtype
        assert_close_scaled(f"cell {name}", p.grad, q.grad, gtol)
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        assert p.grad.dtype == dtype
        assert_close_scaled(f"cell d {name}", p.grad, q.grad, gtol)


def _within_one_rounding(name, got, want, dtype):
    """|got - want| <= half a unit in the last place of ``dtype`` at |want| (<= 2^-(p+1)·|want|, p its stored
    mantissa bits), plus 1e-5 x max|want| for fp32's own rounding: ``got`` is ``want`` rounded once to ``dtype``."""
    p = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    got, want = got.float(), want.float()
    bound = want.abs() * 2.0 ** -(p + 1) + 1e-5 * max(1.0, want.abs().max().item())
    bad = (got - want).abs() > bound
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {bad.numel()} elements more than one {dtype} rounding "
                           f"from fp32, worst {(got - want).abs().max().item():.3g}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpp_half_in_fp32_rounds_once(monkeypatch, dtype):
    """In fp32, the layer's outputs and gradients are nn.LSTM's fp32 results (on the same dtype-rounded inputs,
    weights and cotangent) rounded once to the dtype — not the per-step path's roundings at every GEMM."""
    _skip_without_cpp()
    monkeypatch.setattr(ops, "LSTM_CPU_HALF_IN_FP32", frozenset({dtype}))
    torch.manual_seed(4)
    T, B, I, H = 12, 40, 28, 64
    ours, ref = _pair(legw_fused.LSTM, nn.LSTM, I, H, dtype=dtype, backend="cpp")
    x = torch.randn(T, B, I).to(dtype)
    xs, xr = x.clone().requires_grad_(), x.float().requires_grad_()
    out, (h_n, c_n) = ours(xs)
    rout, (rh, rc) = ref(xr)
    for name, a, b in (("output", out, rout), ("h_n", h_n, rh), ("c_n", c_n, rc)):
        _within_one_rounding(name, a, b, dtype)
    cot = torch.randn(T, B, H).to(dtype)
    out.backward(cot)
    rout.backward(cot.float())
    _within_one_rounding("d input", xs.grad, xr.grad, dtype)
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        _within_one_rounding(f"d {name}", p.grad, q.grad, dtype)


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "per-step"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_both_kernels(monkeypatch, persistent, dtype):
    """Both Triton strategies, with several batch tiles (B > 16), several hidden tiles and K blocks (H = 37 > 32)
    and both directions."""
    if LSTM_BACKENDS["triton"].unavailable_reason("cpu") is not None:
        pytest.skip(LSTM_BACKENDS["triton"].unavailable_reason("cpu"))
    from legw_fused.kernels import lstm as K

    monkeypatch.setattr(K, "PERSISTENT_MAX_H", 128 if persistent else 0)
    _check_against_torch("triton", (3, 20, 5, 37, 1, True, False, True), dtype)


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("with_state", [True, False])
def test_lstm_cell_matches_torch(lstm_backend, batched, with_state):
    torch.manual_seed(1)
    ours, ref = _pair(legw_fused.LSTMCell, nn.LSTMCell, 6, 37, backend=lstm_backend)
    shape = (3,) if batched else ()
    x = torch.randn(*shape, 6)
    state = (torch.randn(*shape, 37), torch.randn(*shape, 37)) if with_state else None
    leaves = [x] + (list(state) if state else [])
    a = [t.clone().requires_grad_() for t in leaves]
    b = [t.clone().requires_grad_() for t in leaves]
    h, c = ours(a[0], (a[1], a[2]) if with_state else None)
    rh, rc = ref(b[0], (b[1], b[2]) if with_state else None)
    assert_close_scaled("h", h, rh, LSTM_TOL[torch.float32][0])
    assert_close_scaled("c", c, rc, LSTM_TOL[torch.float32][0])
    (h.sum() + (c * c).sum()).backward()
    (rh.sum() + (rc * rc).sum()).backward()
    for i, (p, q) in enumerate(zip(a, b)):
        assert_close_scaled(f"grad {i}", p.grad, q.grad, LSTM_TOL[torch.float32][1])
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        assert_close_scaled(f"d {name}", p.grad, q.grad, LSTM_TOL[torch.float32][1])


@pytest.mark.parametrize("backend", BACKENDS + ["native"])
@pytest.mark.parametrize("dtype,bias", [(torch.float32, True), (torch.float32, False), (torch.float64, True)],
                         ids=["fp32", "fp32-no-bias", "fp64"])
def test_lstm_cell_loop_through_time_matches_torch(backend, dtype, bias):
    """LSTMCell from a Python loop, as hand-written training loops use it (and bench/lstm.py's cell rows): the
    states and every gradient through 6 steps against nn.LSTMCell in the same dtype (fp64: the shape of torch's
    time-sequence example, I 1, H 51)."""
    reason = LSTM_BACKENDS[backend].unavailable_reason("cpu", dtype)
    if reason is not None:
        pytest.skip(f"LSTM backend {backend!r}: {reason}")
    torch.manual_seed(5)
    I, H, B, T = (1, 51, 9, 6) if dtype == torch.float64 else (7, 20, 5, 6)
    ours = legw_fused.LSTMCell(I, H, bias=bias, dtype=dtype, backend=backend)
    ref = nn.LSTMCell(I, H, bias=bias, dtype=dtype)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(T, B, I, dtype=dtype)
    h0, c0 = torch.randn(B, H, dtype=dtype), torch.randn(B, H, dtype=dtype)

    def run(cell):
        leaves = [t.clone().requires_grad_() for t in (x, h0, c0)]
        h, c = leaves[1], leaves[2]
        hs = []
        for t in range(T):
            h, c = cell(leaves[0][t], (h, c))
            hs.append(h)
        out = torch.stack(hs)
        (out.sin().sum() + (c * c).sum()).backward()
        return [out, c] + [t.grad for t in leaves] + [p.grad for p in cell.parameters()]

    fwd_tol, grad_tol = LSTM_TOL[dtype]
    names = ["out", "c_T", "dx", "dh0", "dc0"] + [f"d {n}" for n, _ in ours.named_parameters()]
    for i, (name, a, b) in enumerate(zip(names, run(ours), run(ref))):
        assert_close_scaled(name, a.to(dtype), b, fwd_tol if i < 2 else grad_tol)


def test_lstm_cell_second_derivative_raises_on_fused_backends():
    """The C++ cell's gradients are not differentiable: a backward with create_graph=True raises (as the layer's)."""
    if LSTM_BACKENDS["cpp"].unavailable_reason("cpu") is not None:
        pytest.skip(LSTM_BACKENDS["cpp"].unavailable_reason("cpu"))
    cell = legw_fused.LSTMCell(3, 4, backend="cpp")
    x = torch.randn(2, 3, requires_grad=True)
    g, = torch.autograd.grad(cell(x)[0].sum(), x, create_graph=False)
    assert g.shape == x.shape
    with pytest.raises(NotImplementedError, match="second derivatives"):
        torch.autograd.grad(cell(x)[0].sum(), x, create_graph=True)


def test_lstm_cell_loop_under_torch_compile_equals_eager():
    """The C++ cell (an autograd Function over the layer op) traces whole under torch.compile (fullgraph, through
    the ops' fakes) and gives eager's outputs and gradients."""
    if LSTM_BACKENDS["cpp"].unavailable_reason("cpu") is not None:
        pytest.skip(LSTM_BACKENDS["cpp"].unavailable_reason("cpu"))
    torch.manual_seed(6)
    cell = legw_fused.LSTMCell(5, 4, backend="cpp")

    def loop(x, h, c):
        for t in range(x.shape[0]):
            h, c = cell(x[t], (h, c))
        return h, c

    x, h0, c0 = torch.randn(3, 2, 5), torch.randn(2, 4), torch.randn(2, 4)
    results = []
    for fn in (torch.compile(loop, backend="aot_eager", fullgraph=True), loop):
        cell.zero_grad()
        xi = x.clone().requires_grad_()
        h, c = fn(xi, h0, c0)
        (h.sum() + (c * c).sum()).backward()
        results.append([h, c, xi.grad] + [p.grad.clone() for p in cell.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_state", [True, False])
def test_lstm_unbatched(lstm_backend, batch_first, with_state):
    torch.manual_seed(2)
    ours, ref = _pair(legw_fused.LSTM, nn.LSTM, 4, 9, 2, batch_first=batch_first, backend=lstm_backend)
    x = torch.randn(6, 4)
    state = (torch.randn(2, 9), torch.randn(2, 9)) if with_state else None
    out, (h, c) = ours(x, state)
    rout, (rh, rc) = ref(x, state)
    for name, a, b in (("output", out, rout), ("h_n", h, rh), ("c_n", c, rc)):
        assert_close_scaled(name, a, b, LSTM_TOL[torch.float32][0])


def test_functional_forms_match_torch(lstm_backend):
    torch.manual_seed(3)
    ref = nn.LSTM(5, 6, num_layers=2, bidirectional=True)
    x = torch.randn(4, 3, 5)
    hx = (torch.randn(4, 3, 6), torch.randn(4, 3, 6))
    out, h, c = LF.lstm(x, hx, ref._flat_weights, True, 2, 0.0, False, True, False, backend=lstm_backend)
    rout, rh, rc = torch._VF.lstm(x, hx, ref._flat_weights, True, 2, 0.0, False, True, False)
    for name, a, b in (("output", out, rout), ("h_n", h, rh), ("c_n", c, rc)):
        assert_close_scaled(name, a, b, LSTM_TOL[torch.float32][0])
    cell = nn.LSTMCell(5, 6)
    h1, c1 = LF.lstm_cell(x[0], hx[0][0], hx[1][0], cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh,
                          backend=lstm_backend)
    rh1, rc1 = cell(x[0], (hx[0][0], hx[1][0]))
    assert_close_scaled("cell h", h1, rh1, LSTM_TOL[torch.float32][0])
    assert_close_scaled("cell c", c1, rc1, LSTM_TOL[torch.float32][0])


def test_dropout_same_mask_as_torch_and_eval_mode(lstm_backend):
    """On CPU our inter-layer dropout draws the same mask as torch's for the same seed; eval mode disables it."""
    torch.manual_seed(4)
    ours, ref = _pair(legw_fused.LSTM, nn.LSTM, 5, 8, 3, dropout=0.5, backend=lstm_backend)
    x = torch.randn(6, 4, 5)
    torch.manual_seed(11)
    out, _ = ours(x)
    torch.manual_seed(11)
    rout, _ = ref(x)
    assert_close_scaled("train output", out, rout, LSTM_TOL[torch.float32][0])
    torch.manual_seed(12)
    out2, _ = ours(x)
    assert (out2 - out).abs().max() > 1e-3, "dropout draws a new mask on every call in train mode"
    ours.eval()
    ref.eval()
    e1, _ = ours(x)
    e2, _ = ours(x)
    assert torch.equal(e1, e2)
    assert_close_scaled("eval output", e1, ref(x)[0], LSTM_TOL[torch.float32][0])


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_gradcheck_float64(backend):
    reason = LSTM_BACKENDS[backend].unavailable_reason("cpu", torch.float64)
    if reason is not None:
        pytest.skip(f"LSTM backend {backend!r} unavailable: {reason}")
    torch.manual_seed(5)
    T, B, I, H = 3, 2, 3, 4
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, H, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(B, H, dtype=torch.float64, requires_grad=True)
    w_ih = torch.randn(4 * H, I, dtype=torch.float64, requires_grad=True)
    w_hh = torch.randn(4 * H, H, dtype=torch.float64, requires_grad=True)
    b_ih = torch.randn(4 * H, dtype=torch.float64, requires_grad=True)
    b_hh = torch.randn(4 * H, dtype=torch.float64, requires_grad=True)
    layer = LSTM_BACKENDS[backend].layer
    for reverse in (False, True):
        assert torch.autograd.gradcheck(lambda *a: layer(*a, reverse), (x, h0, c0, w_ih, w_hh, b_ih, b_hh))


def test_opcheck_compiled_ops():
    from legw_fused import ops

    if not hasattr(torch.ops.legw_fused, "lstm_layer_fwd") or not ops.has_kernel("lstm_layer_fwd", "CPU"):
        pytest.skip(LSTM_BACKENDS["cpp"].unavailable_reason("cpu"))
    torch.manual_seed(8)
    T, B, I, H = 3, 2, 5, 4
    x, w_ih, w_hh = torch.randn(T, B, I), torch.randn(4 * H, I), torch.randn(4 * H, H)
    b_ih, b_hh, h0, c0 = torch.randn(4 * H), torch.randn(4 * H), torch.randn(B, H), torch.randn(B, H)
    for reverse in (False, True):
        args = [t.clone().requires_grad_() for t in (x, w_ih, w_hh, b_ih, b_hh, h0, c0)] + [reverse]
        torch.library.opcheck(torch.ops.legw_fused.lstm_layer_fwd, args)
        out, h_n, c_n, gates, cs = torch.ops.legw_fused.lstm_layer_fwd(x, w_ih, w_hh, b_ih, b_hh, h0, c0, reverse)
        torch.library.opcheck(torch.ops.legw_fused.lstm_layer_bwd,
                              (torch.randn_like(out), torch.randn_like(h_n), None, x, w_ih, w_hh, h0, c0, out, gates,
                               cs, reverse, True))
        torch.library.opcheck(torch.ops.legw_fused.lstm_layer_infer, (x, w_ih, w_hh, b_ih, b_hh, h0, c0, reverse))
        infer = torch.ops.legw_fused.lstm_layer_infer(x, w_ih, w_hh, b_ih, b_hh, h0, c0, reverse)
        for a, b in zip(infer, (out, h_n, c_n)):  # the same kernel but for what it keeps: the same bits
            assert torch.equal(a, b)
    # batch_first hands the layer a transposed x (and the weights may be transposed views): the fakes must give
    # the kernel's contiguous strides all the same, or inductor rejects the compiled backward.
    xt = torch.randn(B, T, I).transpose(0, 1)
    w_ih_t = torch.randn(I, 4 * H).t()
    out, h_n, c_n, gates, cs = torch.ops.legw_fused.lstm_layer_fwd(xt, w_ih_t, w_hh, b_ih, b_hh, h0, c0, False)
    torch.library.opcheck(torch.ops.legw_fused.lstm_layer_bwd,
                          (torch.randn_like(out), torch.randn_like(h_n), None, xt, w_ih_t, w_hh, h0, c0, out, gates,
                           cs, False, True))


def test_cuda_lstm_kernels_linked_when_forced():
    """CI builds with LEGW_FUSED_FORCE_CUDA_BUILD=1: the CUDA LSTM kernels must then be registered."""
    import os

    from legw_fused import ops

    if os.environ.get("LEGW_FUSED_FORCE_CUDA_BUILD") != "1":
        pytest.skip("LEGW_FUSED_FORCE_CUDA_BUILD is not set: this build may legitimately be CPU-only")
    for op in ("lstm_layer_fwd", "lstm_layer_bwd"):
        assert ops.has_kernel(op, "CPU") and ops.has_kernel(op, "CUDA"), op


def test_bad_input_errors():
    m = legw_fused.LSTM(4, 3)
    with pytest.raises(ValueError, match="2D or 3D"):
        m(torch.randn(2, 3, 4, 5))
    with pytest.raises(RuntimeError, match="input_size"):
        m(torch.randn(5, 2, 5))
    with pytest.raises(RuntimeError, match="hidden"):
        m(torch.randn(5, 2, 4), (torch.zeros(1, 3, 3), torch.zeros(1, 3, 3)))
    with pytest.raises(RuntimeError, match="should also be 2-D"):
        m(torch.randn(5, 4), (torch.zeros(1, 2, 3), torch.zeros(1, 2, 3)))
    with pytest.raises(RuntimeError, match="larger than 0"):
        m(torch.randn(0, 2, 4))
    with pytest.raises(NotImplementedError, match="proj_size"):
        legw_fused.LSTM(4, 3, proj_size=2)
    with pytest.raises(NotImplementedError, match="PackedSequence"):
        m(pack_padded_sequence(torch.randn(5, 2, 4), torch.tensor([5, 3])))
    with pytest.raises(ValueError, match="backend"):
        legw_fused.LSTM(4, 3, backend="cudnn")
    cell = legw_fused.LSTMCell(4, 3)
    with pytest.raises(ValueError, match="1D or 2D"):
        cell(torch.randn(2, 2, 4))
    with pytest.raises(RuntimeError, match="input_size"):
        cell(torch.randn(2, 5))
    with pytest.raises(ValueError, match="dtype"):
        m(torch.randn(5, 2, 4, dtype=torch.float64))


def test_functional_lstm_checks_hx():
    w = [torch.randn(12, 4), torch.randn(12, 3), torch.randn(12), torch.randn(12)]
    x = torch.randn(5, 2, 4)
    for bad in [(3, 2, 3), (2, 3), (1, 1, 3)]:  # extra layers, 2-D, a batch of 1 that would broadcast
        with pytest.raises(RuntimeError, match=r"hx\[0\] \(h_0\) must have shape \(1, 2, 3\)"):
            LF.lstm(x, (torch.zeros(bad), torch.zeros(1, 2, 3)), w, backend="torch")
    with pytest.raises(RuntimeError, match=r"hx\[1\] \(c_0\) must have shape"):
        LF.lstm(x, (torch.zeros(1, 2, 3), torch.zeros(1, 2, 4)), w, backend="torch")


def test_second_derivative_is_torchs_or_raises(lstm_backend):
    """Double backward (create_graph=True): the reference differentiates its own ops and matches nn.LSTM; the
    fused kernels' gradients are not differentiable, so going through them again must raise, not give a wrong
    (partial) result."""
    torch.manual_seed(4)
    ours, ref = _pair(legw_fused.LSTM, nn.LSTM, 3, 4, backend=lstm_backend)
    x = torch.randn(5, 2, 3)

    def second(m):
        xi = x.clone().requires_grad_()
        g, = torch.autograd.grad(m(xi)[0].sum(), xi, create_graph=True)
        return torch.autograd.grad((g ** 2).sum(), m.weight_ih_l0)[0]

    if lstm_backend == "torch":
        assert_close_scaled("d2", second(ours), second(ref), LSTM_TOL[torch.float32][1])
    else:
        with pytest.raises(NotImplementedError, match="second derivatives"):
            second(ours)
        xi = x.clone().requires_grad_()  # a plain backward is unaffected
        ours(xi)[0].sum().backward()
        assert xi.grad is not None


@pytest.mark.parametrize("batch_first", [False, True])
def test_autocast_runs_the_layer_in_the_autocast_dtype(lstm_backend, batch_first):
    """Under torch.autocast an fp32 LSTM computes as torch's does there: input, states and weights cast to the
    autocast dtype. Oracle: nn.LSTM in fp32 on the bf16-rounded weights and input (bf16 bound); gradients reach the
    fp32 weights in fp32."""
    torch.manual_seed(5)
    ours, ref = _pair(legw_fused.LSTM, nn.LSTM, 3, 4, 2, batch_first=batch_first, backend=lstm_backend)
    ref.load_state_dict({k: v.bfloat16().float() for k, v in ours.state_dict().items()})
    x = torch.randn((2, 5, 3) if batch_first else (5, 2, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h_n, c_n) = ours(x)
    assert out.dtype == h_n.dtype == c_n.dtype == torch.bfloat16
    rout, (rh, rc) = ref(x.bfloat16().float())
    for name, got, want in (("out", out, rout), ("h_n", h_n, rh), ("c_n", c_n, rc)):
        assert_close_scaled(name, got, want, LSTM_TOL[torch.bfloat16][0])
    (out.float().sum() + c_n.float().sum()).backward()
    (rout.sum() + rc.sum()).backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert p.grad.dtype == torch.float32, name
        assert_close_scaled(name, p.grad, q.grad, LSTM_TOL[torch.bfloat16][1])


def test_state_dict_and_isinstance_are_torchs():
    ours = legw_fused.LSTM(4, 6, 2, bidirectional=True)
    ref = nn.LSTM(4, 6, 2, bidirectional=True)
    assert isinstance(ours, nn.LSTM)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert all(a.shape == b.shape for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))
    ref.load_state_dict(ours.state_dict())  # and back
    cell = legw_fused.LSTMCell(4, 6)
    assert isinstance(cell, nn.LSTMCell) and list(cell.state_dict()) == list(nn.LSTMCell(4, 6).state_dict())


def test_training_converges_like_torch(lstm_backend):
    """A sequence classifier trained 40 steps from the same init with ours and with nn.LSTM ends at the same loss."""

    def train(lstm_cls, **kw):
        torch.manual_seed(6)
        lstm = lstm_cls(3, 16, batch_first=True, **kw)
        head = nn.Linear(16, 2)
        opt = torch.optim.SGD(list(lstm.parameters()) + list(head.parameters()), lr=0.5, momentum=0.9)
        gen = torch.Generator().manual_seed(7)
        losses = []
        for _ in range(40):
            x = torch.randn(32, 12, 3, generator=gen)
            y = (x[:, :, 0].sum(1) > 0).long()  # the sign of a running sum: needs memory over the sequence
            out, _ = lstm(x)
            loss = nn.functional.cross_entropy(head(out[:, -1]), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    ours = train(legw_fused.LSTM, backend=lstm_backend)
    ref = train(nn.LSTM)
    assert ref[-1] < 0.5 * ref[0], "the task is learnable (oracle run)"
    assert abs(ours[-1] - ref[-1]) <= 1e-3 * max(1.0, ref[0]), (ours[-5:], ref[-5:])
