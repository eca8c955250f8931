"""The compiled op legw_fused::legw_lr (the in-kernel LEGW schedule) against LEGW.__call__."""

import os
import subprocess
import sys

import pytest
import torch
import torch._dynamo.testing

import legw_fused
from _helpers import assert_close
from legw_fused import LEGW, ops

needs_ext = pytest.mark.skipif(ops.EXTENSION_ERROR is not None, reason=f"{ops.EXTENSION_ERROR}")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SCHEDULES = {
    "poly": LEGW(0.1, 128, 2048, 0.25, 39, 10, decay="poly", power=2.0, end_lr=1e-4),
    "poly-no-warmup": LEGW(0.1, 128, 2048, 0, 39, 10, decay="poly", power=0.5),
    "cosine": LEGW(0.05, 64, 512, 0.5, 17.5, 7, decay="cosine", end_lr=0.001),
    "exp": LEGW(0.2, 32, 32, 0.5, 25, 12, decay="exp", gamma=0.8),
    "step": LEGW(1.0, 256, 8192, 0.05, 11, 90, decay="step", gamma=0.1, milestones=(30, 60, 60, 80)),
    "step-none": LEGW(1.0, 256, 8192, 0.05, 11, 90, decay="step"),
    "constant-goyal": LEGW(0.1, 256, 1024, 5, 20, 30, decay="constant", scaling="linear",
                           warmup_scaling="constant"),
    "warmup-equals-total": LEGW(0.1, 1, 1, 2, 5, 2, decay="cosine"),
}


def host_lrs(sched, steps):
    return torch.tensor([sched(int(t)) for t in steps], dtype=torch.float64)


def steps_for(sched):
    T = sched.total_steps
    return torch.cat([torch.arange(0, T + 20), torch.tensor([T + 1000, 10**7])])


@needs_ext
@pytest.mark.parametrize("name", SCHEDULES)
def test_cpu_op_equals_host_schedule(name):
    sched = SCHEDULES[name]
    t = steps_for(sched)
    got = ops.fused_step.legw_lr(t, sched.packed("cpu"))
    assert got.dtype == torch.float64 and got.shape == t.shape
    # Same formula, same operation order, same libm: bitwise equal on CPU.
    assert_close(got, host_lrs(sched, t), "exact")


@needs_ext
def test_cpu_op_any_shape_and_empty():
    sched = SCHEDULES["poly"]
    t = torch.randint(0, sched.total_steps * 2, (3, 5, 7))
    got = ops.fused_step.legw_lr(t, sched.packed("cpu"))
    assert_close(got, host_lrs(sched, t.flatten()).view(3, 5, 7), "exact")
    assert ops.fused_step.legw_lr(torch.tensor(5), sched.packed("cpu")).shape == ()
    assert ops.fused_step.legw_lr(torch.empty(0, dtype=torch.int64), sched.packed("cpu")).shape == (0,)


@needs_ext
def test_op_rejects_bad_arguments():
    sched = SCHEDULES["step"]
    with pytest.raises(RuntimeError, match="step must be an int64"):
        ops.fused_step.legw_lr(torch.arange(3, dtype=torch.int32), sched.packed("cpu"))
    with pytest.raises(RuntimeError, match="schedule must be the 1-D float64"):
        ops.fused_step.legw_lr(torch.arange(3), sched.packed("cpu").float())
    with pytest.raises(RuntimeError, match="announces"):
        ops.fused_step.legw_lr(torch.arange(3), sched.packed("cpu")[:-1])
    with pytest.raises(RuntimeError, match="fewer than the fixed header"):
        ops.fused_step.legw_lr(torch.arange(3), torch.zeros(4, dtype=torch.float64))


@needs_ext
def test_opcheck():
    sched = SCHEDULES["cosine"]
    for t in (torch.arange(0, 50), torch.tensor(7), torch.randint(0, 100, (4, 4))):
        torch.library.opcheck(torch.ops.legw_fused.legw_lr.default, (t, sched.packed("cpu")))


@needs_ext
def test_compiles_fullgraph_without_recompiling_on_new_steps():
    sched = SCHEDULES["exp"]
    packed = sched.packed("cpu")
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def lr_of(step):
        return torch.ops.legw_fused.legw_lr(step, packed) * 2.0

    for t in (0, 5, 300):
        assert lr_of(torch.tensor(t)).item() == pytest.approx(2 * sched(t), rel=1e-15)
    assert counter.frame_count == 1


@needs_ext
@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name", SCHEDULES)
def test_cuda_op_equals_host_schedule(name):
    sched = SCHEDULES[name]
    t = steps_for(sched)
    got = ops.fused_step.legw_lr(t.cuda(), sched.packed("cuda"))
    assert got.is_cuda
    # CUDA's pow/cos are within 1-2 ulp of glibc's.
    assert_close(got.cpu(), host_lrs(sched, t), "legw_lr_gpu")


def test_cuda_sources_were_compiled_when_forced():
    """CI builds with LEGW_FUSED_FORCE_CUDA_BUILD=1: the CUDA kernel must then be linked and registered."""
    if os.environ.get("LEGW_FUSED_FORCE_CUDA_BUILD") != "1":
        pytest.skip("LEGW_FUSED_FORCE_CUDA_BUILD is not set: this build may legitimately be CPU-only")
    assert ops.EXTENSION_ERROR is None
    assert ops.WITH_CUDA
    assert ops.has_kernel("legw_lr", "CUDA") and ops.has_kernel("legw_lr", "CPU")
    assert legw_fused.backend_info()["extension"]["ops"]["legw_lr"] == ["CPU", "CUDA"]


def test_package_works_without_the_extension():
    """With _C unloadable the package imports, says why in backend_info, and the torch backend still steps."""
    code = r"""
import sys
sys.modules["legw_fused._C"] = None  # makes `import legw_fused._C` raise ImportError
import torch, legw_fused
info = legw_fused.backend_info()
assert not info["extension"]["available"], info
assert "not built" in info["extension"]["reason"], info
assert info["torch"]["available"] and info["auto"]["cpu"] == "torch"
p = torch.nn.Parameter(torch.ones(3))
p.grad = torch.ones(3)
opt = legw_fused.SGD([p], lr=legw_fused.LEGW(0.1, 1, 1, 0, 10, 1), momentum=0.9)
opt.step()
assert torch.allclose(p.detach(), torch.full((3,), 0.9)), p
try:
    legw_fused.SGD([p], lr=0.1, backend="cpp")
except RuntimeError as e:
    assert "not built" in str(e), e
else:
    raise AssertionError("backend='cpp' without the extension must raise")
try:
    legw_fused.ops.fused_step.legw_lr(torch.tensor(1), torch.zeros(9, dtype=torch.float64))
except RuntimeError as e:
    assert "not built" in str(e)
else:
    raise AssertionError("legw_lr without the extension must raise")
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
