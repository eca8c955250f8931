"""Build legw_fused: the Python package, its Triton kernels and the C++/CUDA extension legw_fused._C.

Install with ``pip install --no-build-isolation .`` (build isolation would build against another torch than the one
the extension will be loaded into).

Whether CUDA sources are compiled is decided by the torch build and the CUDA toolkit, never by a visible GPU:
- torch is a CUDA build and a toolkit (nvcc) is found  -> CppExtension + CUDA sources (CUDAExtension);
- otherwise                                             -> C++ CPU ops only.
Environment overrides:
- LEGW_FUSED_SKIP_CUDA_BUILD=1   never compile CUDA sources;
- LEGW_FUSED_FORCE_CUDA_BUILD=1  compile them or fail with the reason (CI uses this);
- CUDA_HOME / CUDA_PATH          the toolkit folder (the one holding bin/nvcc and include/);
- TORCH_CUDA_ARCH_LIST           target architectures; default below when no GPU is visible.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"  # sm_80 SASS runs on every Ampere; PTX lets newer GPUs JIT the Hopper code.


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _is_toolkit(folder: str | os.PathLike | None) -> bool:
    return bool(folder) and (Path(folder) / "bin" / "nvcc").is_file() and \
        (Path(folder) / "include" / "cuda_runtime.h").is_file()


def find_cuda_toolkit() -> tuple[str | None, str]:
    """The CUDA toolkit folder, and how it was found (or why none was).

    torch guesses the toolkit as the parent of the ``nvcc`` on PATH, which is wrong when that nvcc is a link or
    wrapper script outside the toolkit (as on our CI machines); so also ask nvcc itself where it lives.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            if _is_toolkit(os.environ[var]):
                return os.environ[var], f"${var}"
            return None, f"${var}={os.environ[var]} is not a CUDA toolkit (no bin/nvcc or include/cuda_runtime.h)"
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        if _is_toolkit(real.parent.parent):
            return str(real.parent.parent), f"nvcc at {nvcc}"
        try:  # `nvcc --dryrun` prints the toolkit root as "#$ TOP=<root>/bin/.." whatever wraps it
            out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True, timeout=60)
            for line in (out.stdout + out.stderr).splitlines():
                if "TOP=" in line:
                    top = os.path.normpath(line.split("TOP=", 1)[1].strip().strip('"'))
                    if _is_toolkit(top):
                        return top, f"nvcc at {nvcc} (TOP={top})"
        except (OSError, subprocess.SubprocessError):
            pass
    if _is_toolkit("/usr/local/cuda"):
        return "/usr/local/cuda", "/usr/local/cuda"
    return None, "no nvcc on PATH and no CUDA_HOME / CUDA_PATH / /usr/local/cuda toolkit"


def cuda_decision(torch_cuda_version: str | None) -> tuple[bool, str | None, str]:
    """(build CUDA sources?, toolkit folder, reason)."""
    if _flag("LEGW_FUSED_SKIP_CUDA_BUILD"):
        return False, None, "LEGW_FUSED_SKIP_CUDA_BUILD=1"
    force = _flag("LEGW_FUSED_FORCE_CUDA_BUILD")
    if torch_cuda_version is None:
        reason = "the installed torch is a CPU-only build (torch.version.cuda is None)"
    else:
        home, how = find_cuda_toolkit()
        if home is not None:
            return True, home, f"torch CUDA {torch_cuda_version}, toolkit {home} (found via {how})"
        reason = f"torch is a CUDA {torch_cuda_version} build but no CUDA toolkit was found: {how}"
    if force:
        sys.exit(f"legw_fused: LEGW_FUSED_FORCE_CUDA_BUILD=1 but the CUDA sources cannot be built: {reason}.\n"
                 f"Install a CUDA build of torch and a matching toolkit, or set CUDA_HOME to the toolkit folder.")
    return False, None, reason


def extra_cuda_include_dirs(torch_dir: Path) -> list[str]:
    """Headers torch includes that a minimal toolkit may lack (cusparse.h), taken from the nvidia-* wheels."""
    site = torch_dir.parent
    return sorted({str(Path(h).parent) for h in glob.glob(str(site / "nvidia" / "*" / "include" / "cusparse.h"))})


def build_extensions():
    try:
        import torch
    except ImportError:
        sys.exit("legw_fused: torch must be installed before building (pip install torch), and the build must see "
                 "it: use `pip install --no-build-isolation .`")

    with_cuda, cuda_home, reason = cuda_decision(torch.version.cuda)
    if with_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME when first imported; set it before that import.
        os.environ["CUDA_HOME"] = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    print(f"legw_fused: CUDA sources {'ON' if with_cuda else 'OFF'}: {reason}", flush=True)

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    cxx_flags = ["-O3", "-fopenmp"]
    kwargs = dict(name="legw_fused._C", include_dirs=[str(ROOT / "csrc")], extra_link_args=["-fopenmp"])
    if with_cuda:
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
        kwargs["include_dirs"] += extra_cuda_include_dirs(Path(torch.__file__).parent)
        ext = CUDAExtension(sources=sources, define_macros=[("LEGW_FUSED_WITH_CUDA", None)],
                            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]}, **kwargs)
    else:
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = build_extensions()

setup(
    name="legw_fused",
    version="0.1.0",
    description="LEGW large-batch training for PyTorch: the LR schedule fused into SGD/LARS steps, and a fast LSTM",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["legw_fused", "legw_fused.kernels"],
    package_dir={"legw_fused": "legw_fused", "legw_fused.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.11", "numpy", "tqdm"],
    extras_require={"triton": ["triton>=3.6"], "test": ["pytest"]},
    entry_points={"console_scripts": ["legw-fused = legw_fused.cli:main"]},
    zip_safe=False,
)
