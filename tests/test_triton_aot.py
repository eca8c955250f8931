"""Compile-time facts of every Triton kernel, for sm_80 (A100) and sm_90 (H100/H200), without a GPU.

The interpreter that runs the kernels in the other tests hides what only the compiled kernel shows: whether it
compiles for the target at all, spills to local memory, needs more shared memory than a block may have, reaches
memory with 128-bit accesses, or uses approximate square roots and divisions. Each variant is compiled once per
target in a separate process (tests/_triton_aot.py, which also says which variants: those the launchers produce,
not the cartesian product of their flags) and every test below reads those results.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
pytestmark = pytest.mark.skipif(not PTXAS.is_file(), reason=f"triton ships no ptxas here ({PTXAS})")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _triton_aot import SHARED_LIMIT, TARGETS  # noqa: E402

STEP_KERNELS = ("fused_step._fused_step_kernel", "fused_step._sum_squares_kernel", "fused_step._trust_ratio_kernel")


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "_triton_aot.py")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-4000:]
    facts = [json.loads(line) for line in out.stdout.splitlines()]
    assert {f["target"] for f in facts} == set(TARGETS)
    return facts


def _name(f: dict) -> str:
    extra = {k: f[k] for k in ("dtype", "flags", "BH") if k in f}
    return f"{f['kernel']} sm_{f['target']} {extra} {f['constexprs']}"


def _persistent(f: dict) -> bool:
    return f["kernel"].endswith("_persistent")


def test_every_variant_compiles(compiled):
    failed = [f"{_name(f)}: {f['error']}" for f in compiled if "error" in f and not _persistent(f)]
    assert not failed, "\n".join(failed)


def test_no_spills_and_shared_memory_within_the_block_limit(compiled):
    """Every kernel but the persistent LSTM ones (their limits: the next test)."""
    bad = [f"{_name(f)}: {f['spill_stores']} B spill stores, {f['spill_loads']} B spill loads, {f['shared']} B shared"
           for f in compiled if "error" not in f and not _persistent(f)
           and (f["spill_stores"] or f["spill_loads"] or f["shared"] > SHARED_LIMIT[f["target"]])]
    assert not bad, "\n".join(bad)


def _streams(f: dict) -> tuple[int, int]:
    """Tensors an update / norm-pass block reads and writes (each should be one or more 128-bit accesses)."""
    c = f["constexprs"]
    if f["kernel"].endswith("_sum_squares_kernel"):
        return 2, 0  # p (or the master) and g
    momentum = int(c["HAS_MOMENTUM"])
    return 2 + momentum, 1 + int(c["MASTER"]) + momentum  # g, p or master, buffer / p, master, buffer


def test_aligned_updates_use_128_bit_accesses(compiled):
    """With every tensor 16-byte aligned (the launcher's ALIGNED), the full blocks load and store 16 bytes per
    access: ld.global.v4 / st.global.v4 at least once per tensor streamed."""
    checked, bad = 0, []
    for f in compiled:
        if "error" in f or f["kernel"] not in STEP_KERNELS[:2] or not f["constexprs"]["ALIGNED"]:
            continue
        loads, stores = _streams(f)
        checked += 1
        if f["ld_v4"] < loads or f["st_v4"] < stores:
            bad.append(f"{_name(f)}: {f['ld_v4']} v4 loads for {loads} tensors, {f['st_v4']} v4 stores for {stores}")
    assert checked and not bad, "\n".join(bad)


def test_unaligned_variants_make_no_128_bit_claim(compiled):
    """The hints are what gives the vector accesses: without ALIGNED the compiler cannot assume them (and must not,
    a misaligned vector access faults)."""
    unaligned = [f for f in compiled if "error" not in f and f["kernel"] in STEP_KERNELS[:2]
                 and not f["constexprs"]["ALIGNED"]]
    assert unaligned and all(f["ld_v4"] == 0 and f["st_v4"] == 0 for f in unaligned)


def test_step_kernels_round_square_roots_and_divisions_correctly(compiled):
    """The trust ratio must agree to the bit with C++ and CUDA: no sqrt.approx / div.full in the step kernels."""
    bad = [f"{_name(f)}: {f['approx']}" for f in compiled if "error" not in f and f["kernel"] in STEP_KERNELS
           and f["approx"]]
    assert not bad, "\n".join(bad)


def _fits(f: dict) -> bool:
    return "error" not in f and not f["spill_stores"] and not f["spill_loads"] and \
        f["shared"] <= SHARED_LIMIT[f["target"]]


def test_persistent_lstm_table_is_what_fits(compiled):
    """kernels/lstm.py's PERSISTENT_MAX_BH (the launcher's choice, made before launching): every BH it allows on a
    target compiles without spills within the block's shared memory, and its shared-memory budget per major is the
    block limit checked here."""
    from legw_fused.kernels import lstm as K

    assert K.PERSISTENT_SHARED_BUDGET == {target // 10: SHARED_LIMIT[target] for target in TARGETS}
    checked, bad = 0, []
    for f in compiled:
        if _persistent(f) and f["BH"] <= K.PERSISTENT_MAX_BH.get((f["target"] // 10, f["direction"], f["dtype"]), 0):
            checked += 1
            if not _fits(f):
                bad.append(f"{_name(f)} is allowed but does not fit: {f}")
    assert checked and not bad, "\n".join(bad)
