"""Ahead-of-time compile of the Triton kernels for sm_80 and sm_90, without a GPU (used by test_triton_aot.py).

Run as a script in a process of its own, without TRITON_INTERPRET (the tests' conftest sets it, and under it
@triton.jit gives interpreted functions that cannot be compiled): ``python tests/_triton_aot.py`` prints one JSON
object per compiled variant: its facts from the compiled artefacts (shared memory from triton's metadata;
registers and spills from ``ptxas -v`` on the PTX; 128-bit global accesses and approximate square roots and
divisions counted in the PTX).

The variants are the ones the launchers produce, chosen as the test explains; each is compiled once per target.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

TARGETS = (80, 90)
# The per-block shared memory a kernel may opt in to (CUDA programming guide): A100 163 KB, H100/H200 227 KB.
SHARED_LIMIT = {80: 166912, 90: 232448}


def _signatures():
    """Pointer and scalar argument types of each kernel, as the launchers pass them (P: the params' dtype)."""
    step_ptrs = dict(p_ptrs="*i64", g_ptrs="*i64", b_ptrs="*i64", m_ptrs="*i64", numels="*i64",
                     chunk_tensor="*i32", chunk_start="*i64", ratios="*fp32", norms="*fp32", param_sq="*fp32",
                     step_ptr="*i64", sched_ptr="*fp64", lr_ptr="*fp32", scale_ptr="*fp32", found_ptr="*fp32",
                     partials="*fp32", p_cached="*fp32", first_chunk="*i32", out="*fp32")
    step_ints = dict(n_tensors="i32", sched_len="i32", first="i32", cached="i32", with_p="i32")
    lstm = dict(gates_ptr="*P", w_ptr="*P", h0_ptr="*P", c0_ptr="*fp32", out_ptr="*P", cs_ptr="*fp32",
                dout_ptr="*P", dhn_ptr="*fp32", dcn_ptr="*fp32", da_ptr="*P", dh0_ptr="*fp32", dc0_ptr="*fp32",
                a_ptr="*P", h_ptr="*P", cprev_ptr="*fp32", hout_ptr="*P", c_ptr="*fp32", act_ptr="*P",
                dh_ptr="*P", dc_ptr="*fp32", T="i32", B="i32", H="i32", n="i32")
    return {**step_ptrs, **step_ints, **lstm}


def compile_variant(spec: dict) -> dict:
    """Compile one variant: spec = {kernel: "module.name", target: 80|90, constexprs: {name: value}, dtype: P}."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from legw_fused.kernels import fused_step, lstm

    module, name = spec["kernel"].split(".")
    fn = getattr({"fused_step": fused_step, "lstm": lstm}[module], name)
    types = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
    constexprs = {k: types[v] if k in ("P_TYPE", "B_TYPE", "DTYPE") else v for k, v in spec["constexprs"].items()}
    arg_types = _signatures()
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
            continue
        kind = arg_types.get(arg, "fp32").replace("*P", "*" + spec.get("dtype", "fp32"))
        signature[arg] = kind
        if kind.startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations: 16-byte aligned, as Triton sees them
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", spec["target"], 32))
    ptx = compiled.asm["ptx"]
    facts = dict(spec, shared=compiled.metadata.shared, **_ptxas(ptx))
    facts["ld_v4"] = len(re.findall(r"\bld\.global(?:\.[a-z0-9:]+)*\.v4\.", ptx))
    facts["st_v4"] = len(re.findall(r"\bst\.global(?:\.[a-z0-9:]+)*\.v4\.", ptx))
    facts["approx"] = sorted(set(re.findall(r"\b(?:sqrt\.approx|div\.full|div\.approx)[.a-z0-9]*", ptx)))
    return facts


def _ptxas(ptx: str) -> dict:
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        out = subprocess.run([str(ptxas), "-v", f"--gpu-name={arch}", str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    # The kernel's own entry (device functions it calls, such as fp64 trig slow paths, are reported after it).
    entry = log.split("Compiling entry function", 1)[1]
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", entry)
    return dict(registers=int(re.search(r"Used (\d+) registers", entry).group(1)), spill_stores=int(spills.group(1)),
                spill_loads=int(spills.group(2)))


def _step_variants(F) -> list[dict]:
    """The fused-step kernels' variants. Not the cartesian product of their flags (thousands of compiles): every
    (params dtype, master weights) combination the launchers produce, each with the flag sets that bound the
    kernel's size: the smallest (plain SGD), SGD's largest, and LARS's largest with ratios from the norm pass and
    with given norms, so that every value of every flag appears; all of them aligned (the 128-bit path), the largest
    also unaligned. The norm pass and the ratio kernel: all their combinations."""
    specs = []
    storage = [("fp32", False), ("bf16", True), ("bf16", False), ("fp16", True), ("fp16", False)]
    flag_sets = {
        "sgd-plain": dict(LR_MODE=F.LR_FLOAT, HAS_MOMENTUM=False, NESTEROV=False, MAXIMIZE=False, LARS=False,
                          NORMS=False, CLIP=False, P_SQ=False, HAS_SCALE=False, HAS_INF=False),
        "sgd-full": dict(LR_MODE=F.LR_TENSOR, HAS_MOMENTUM=True, NESTEROV=True, MAXIMIZE=True, LARS=False,
                         NORMS=False, CLIP=False, P_SQ=False, HAS_SCALE=True, HAS_INF=True),
        "lars-ratios": dict(LR_MODE=F.LR_SCHEDULE, HAS_MOMENTUM=True, NESTEROV=False, MAXIMIZE=False, LARS=True,
                            NORMS=False, CLIP=True, P_SQ=True, HAS_SCALE=True, HAS_INF=True),
        "lars-norms": dict(LR_MODE=F.LR_SCHEDULE, HAS_MOMENTUM=True, NESTEROV=True, MAXIMIZE=False, LARS=True,
                           NORMS=True, CLIP=True, P_SQ=True, HAS_SCALE=False, HAS_INF=True),
    }
    for dtype, master in storage:
        for flags_id, flags in flag_sets.items():
            for aligned in (True, False) if flags_id == "lars-ratios" else (True,):
                specs.append(dict(kernel="fused_step._fused_step_kernel", dtype=dtype, flags=flags_id, constexprs=dict(
                    P_TYPE=dtype, B_TYPE="fp32" if master else dtype, MASTER=master, ALIGNED=aligned,
                    BLOCK=F.BLOCK, CHUNK=F.PARAM_SQ_CHUNK, **flags)))
        for aligned in (True, False):
            for scale in (True, False):
                specs.append(dict(kernel="fused_step._sum_squares_kernel", dtype=dtype, constexprs=dict(
                    P_TYPE=dtype, MASTER=master, HAS_SCALE=scale, ALIGNED=aligned, BLOCK=F.BLOCK,
                    CHUNK=F.PARAM_SQ_CHUNK)))
    for lr_mode in (F.LR_FLOAT, F.LR_TENSOR, F.LR_SCHEDULE):
        for clip in (True, False):
            specs.append(dict(kernel="fused_step._trust_ratio_kernel", constexprs=dict(
                LR_MODE=lr_mode, CLIP=clip, BLOCK_C=F.TRUST_RATIO_BLOCK, SUMS=False)))
    specs.append(dict(kernel="fused_step._trust_ratio_kernel", constexprs=dict(
        LR_MODE=F.LR_FLOAT, CLIP=False, BLOCK_C=F.TRUST_RATIO_BLOCK, SUMS=True)))  # sum_squares' call
    return specs


def _lstm_variants(K) -> list[dict]:
    """The LSTM kernels' variants: per dtype, the per-step kernels at the launchers' tile sizes, and the persistent
    ones at every BH the launchers may pick (BH = next power of two >= max(H, 16)) up to the largest that
    PERSISTENT_MAX_BH allows on either target: they must fit where allowed. (Larger ones are not compiled: at BH 128
    a compile takes minutes, and what fits differs between triton versions, so the table cannot be tight for all.)
    REVERSE only changes which step is read, not the kernels' size: compiled as False."""
    specs = []
    for dtype in ("fp32", "bf16", "fp16"):
        prec = "ieee" if dtype == "fp32" else "tf32"
        specs.append(dict(kernel="lstm._lstm_fwd_step", dtype=dtype, constexprs=dict(
            DTYPE=dtype, PREC=prec, **K.STEP_TILES)))
        specs.append(dict(kernel="lstm._lstm_bwd_step", dtype=dtype, constexprs=dict(
            DTYPE=dtype, BLOCK=K.BWD_STEP_BLOCK)))
        for direction, kernel in (("fwd", "_lstm_fwd_persistent"), ("bwd", "_lstm_bwd_persistent")):
            allowed = max(K.PERSISTENT_MAX_BH.get((target // 10, direction, dtype), 0) for target in TARGETS)
            for bh in [bh for bh in (16, 32, 64, 128) if bh <= allowed]:
                specs.append(dict(kernel=f"lstm.{kernel}", dtype=dtype, direction=direction, BH=bh, constexprs=dict(
                    REVERSE=False, DTYPE=dtype, PREC=prec, BB=K.PERSISTENT_BB, BH=bh)))
    return specs


def variants() -> list[dict]:
    """Every variant to compile, once per target (the launchers' constants as compiled for a GPU: this process runs
    without the interpreter)."""
    from legw_fused.kernels import fused_step, lstm

    specs = _step_variants(fused_step) + _lstm_variants(lstm)
    return [dict(spec, target=target) for spec in specs for target in TARGETS]


def _compile_or_report(spec: dict) -> dict:
    try:
        return compile_variant(spec)
    except Exception as e:  # reported to the test, which fails on it with the variant named
        return dict(spec, error=f"{type(e).__name__}: {str(e)[:2000]}")


def main(kernels: str) -> None:
    specs = [s for s in variants() if s["kernel"].startswith(kernels)]
    workers = max(1, min(len(os.sched_getaffinity(0)), 8))
    with ProcessPoolExecutor(workers) as pool:
        for facts in pool.map(_compile_or_report, specs, chunksize=1):
            print(json.dumps(facts), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(sys.argv[1] if len(sys.argv) > 1 else "")
