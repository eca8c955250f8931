"""Resource use of the CUDA kernels, per architecture, without a GPU: ptxas's report (registers, spills, stack, shared
memory) of every __global__ in csrc/cuda, and the sm_90 SASS of the fused step's update and norm kernels (their
vector paths must use 128-bit loads and stores).

The .cu files are compiled here to device code only (nvcc --fatbin -Xptxas -v, the build's flags and architectures),
so the check needs a CUDA build of torch and the toolkit setup.py would use; CI has both (it forces the CUDA build).
"""

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from legw_fused import _build_config as bc

ROOT = Path(__file__).resolve().parent.parent
ARCHS = (80, 90)
THREADS_PER_BLOCK = 512  # __launch_bounds__ of the fused step kernels: at most 65536 / 512 = 128 registers


def toolkit_or_skip() -> str:
    if torch.version.cuda is None:
        pytest.skip("torch is a CPU-only build: its headers cannot compile the CUDA sources")
    home, how = bc.find_cuda_toolkit()
    if home is None:
        pytest.skip(f"no CUDA toolkit (nvcc): {how}")
    return home


def cuobjdump_or_skip(home: str) -> str:
    """cuobjdump from PATH, the toolkit, or the copy triton ships."""
    candidates = [shutil.which("cuobjdump"), str(Path(home) / "bin" / "cuobjdump")]
    triton = importlib.util.find_spec("triton")
    if triton is not None and triton.origin:
        candidates.append(str(Path(triton.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    for c in candidates:
        if c and Path(c).is_file():
            return c
    pytest.skip("no cuobjdump (not on PATH, not in the toolkit, no triton) to read the SASS")


def compile_report(home: str, source: Path, out: Path) -> str:
    """ptxas -v of `source` for every architecture in ARCHS; device code only, into the fatbin `out`."""
    torch_dir = Path(torch.__file__).parent
    includes = [ROOT / "csrc", torch_dir / "include", torch_dir / "include" / "torch" / "csrc" / "api" / "include",
                Path(home) / "include", *map(Path, bc.extra_cuda_include_dirs(torch_dir))]
    gencodes = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    cmd = [str(Path(home) / "bin" / "nvcc"), "--fatbin", str(source), "-o", str(out), "-O3", "-std=c++20",
           "--expt-relaxed-constexpr", "-Xptxas", "-v", "-DLEGW_FUSED_WITH_CUDA", "-DTORCH_API_INCLUDE_EXTENSION_H",
           "-DTORCH_EXTENSION_NAME=_C", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
           "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", *gencodes,
           *[f"-I{i}" for i in includes]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout + done.stderr


def parse_ptxas(report: str) -> tuple[dict[tuple[str, int], dict[str, int]], list[str]]:
    """From ptxas -v's lines: {(mangled kernel, sm): {registers, smem, stack, spill_stores, spill_loads}}, and the
    functions (kernels and the device functions they call, e.g. libdevice's pow) that spill, as text."""
    kernels, spills, sm, entry, props = {}, [], None, None, None
    for line in report.splitlines():
        if found := re.search(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", line):
            sm, entry = int(found[2]), (found[1], int(found[2]))
            kernels[entry] = {}
        elif found := re.search(r"Function properties for (\w+)", line):
            props = found[1]
        elif found := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            frame = dict(stack=int(found[1]), spill_stores=int(found[2]), spill_loads=int(found[3]))
            if entry is not None and props == entry[0]:
                kernels[entry].update(frame)
            if frame["spill_stores"] or frame["spill_loads"]:
                spills.append(f"{props} (sm_{sm}): {line.strip()}")
        elif (found := re.search(r"Used (\d+) registers", line)) and entry is not None:
            smem = re.search(r"(\d+) bytes smem", line)
            kernels[entry].update(registers=int(found[1]), smem=int(smem[1]) if smem else 0)
    return kernels, spills


def demangled(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    home = toolkit_or_skip()
    out = tmp_path_factory.mktemp("cuda-resources")
    reports, spills, fatbins = {}, [], {}
    for source in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        fatbins[source.stem] = out / f"{source.stem}.fatbin"
        reports[source.stem], spilled = parse_ptxas(compile_report(home, source, fatbins[source.stem]))
        spills += spilled
    return home, reports, spills, fatbins


def test_no_kernel_spills_on_any_architecture(compiled):
    _, reports, spills, _ = compiled
    rows = []
    for stem, kernels in reports.items():
        names = demangled([k for k, _ in kernels])
        for (kernel, sm), r in sorted(kernels.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            rows.append(f"{stem}.cu sm_{sm} regs {r['registers']:3d} stack {r['stack']:3d} "
                        f"spill {r['spill_stores']}/{r['spill_loads']} smem {r['smem']:5d}  {names[kernel]}")
    print("\n".join(rows))  # the table, with pytest -s
    found_archs = {sm for kernels in reports.values() for _, sm in kernels}
    assert found_archs == set(ARCHS), f"ptxas reported {found_archs}"
    assert all("registers" in r and "spill_stores" in r for k in reports.values() for r in k.values()), rows
    assert not spills, "functions that spill registers:\n" + "\n".join(spills)
    for (kernel, sm), r in reports["fused_step"].items():
        assert r["registers"] <= 65536 // THREADS_PER_BLOCK, f"{kernel} on sm_{sm}: {r['registers']} registers"


def sass_functions(cuobjdump: str, fatbin: Path, sm: int) -> dict[str, str]:
    sass = subprocess.run([cuobjdump, "-sass", "-arch", f"sm_{sm}", str(fatbin)], capture_output=True, text=True,
                          check=True).stdout
    parts = re.split(r"\n\s*Function : (\w+)\n", sass)
    return dict(zip(parts[1::2], parts[2::2]))


def test_update_and_norm_kernels_use_128_bit_accesses_on_sm_90(compiled):
    home, _, _, fatbins = compiled
    functions = sass_functions(cuobjdump_or_skip(home), fatbins["fused_step"], 90)
    update = {k: v for k, v in functions.items() if "update_kernel" in k}
    norms = {k: v for k, v in functions.items() if "sum_squares_kernel" in k}
    # 3 param dtypes x momentum or not x masters or not; one per dtype
    assert len(update) == 12 and len(norms) == 3, sorted(functions)
    # Plain LDG.E.128: the packs of p (or master) and g at least. (libdevice's pow/cos tables, read by the LR code,
    # come as LDG.E.128.CONSTANT and do not count.)
    for name, body in {**update, **norms}.items():
        loads = len(re.findall(r"\bLDG\.E\.128 ", body))
        assert loads >= 2, f"{name}: {loads} plain 128-bit global loads in its SASS"
    for name, body in update.items():
        assert re.search(r"\bSTG\.E\.128 ", body), f"{name}: no 128-bit global store in its SASS"
