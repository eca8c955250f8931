"""Build legw_fused: the Python package, its Triton kernels and the C++/CUDA extension legw_fused._C.

Install with ``pip install --no-build-isolation .`` (build isolation would build against another torch than the one
the extension will be loaded into). What gets compiled is decided in legw_fused/_build_config.py:
- torch is a CUDA build and a toolkit (nvcc) is found  -> C++ CPU ops + CUDA sources;
- otherwise                                             -> C++ CPU ops only.
Environment overrides:
- LEGW_FUSED_SKIP_CUDA_BUILD=1   never compile CUDA sources;
- LEGW_FUSED_FORCE_CUDA_BUILD=1  compile them or fail with the reason (CI uses this);
- CUDA_HOME / CUDA_PATH          the toolkit folder (the one holding bin/nvcc and include/);
- TORCH_CUDA_ARCH_LIST           target architectures; DEFAULT_ARCH_LIST when no GPU is visible.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _load_build_config():
    # Loaded by path: importing the package itself would import torch and look for the not yet built extension.
    spec = importlib.util.spec_from_file_location("_legw_build_config", ROOT / "legw_fused" / "_build_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cfg = _load_build_config()


def build_extensions():
    try:
        import torch
    except ImportError:
        sys.exit("legw_fused: torch must be installed before building (pip install torch), and the build must see "
                 "it: use `pip install --no-build-isolation .`")

    try:
        with_cuda, cuda_home, reason = cfg.cuda_decision(torch.version.cuda)
    except cfg.BuildConfigError as exc:
        sys.exit(f"legw_fused: {exc}")
    if with_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME when first imported; set it before that import.
        os.environ["CUDA_HOME"] = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = cfg.DEFAULT_ARCH_LIST
    print(f"legw_fused: CUDA sources {'ON' if with_cuda else 'OFF'}: {reason}", flush=True)

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    # -fno-trapping-math: no code here reads floating-point exception flags; without it GCC keeps the LSTM's
    # polynomial exp (a float->int conversion, a division) in scalar code ("control flow in loop").
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
    kwargs = dict(name="legw_fused._C", include_dirs=[str(ROOT / "csrc")], extra_link_args=["-fopenmp"])
    if with_cuda:
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
        kwargs["include_dirs"] += cfg.extra_cuda_include_dirs(Path(torch.__file__).parent)
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
    packages=["legw_fused", "legw_fused.train", "legw_fused.kernels", "legw_fused.bench"],
    package_dir={"legw_fused": "legw_fused", "legw_fused.kernels": "kernels", "legw_fused.bench": "bench"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.11", "numpy", "tqdm", "matplotlib"],
    extras_require={"triton": ["triton>=3.6"], "test": ["pytest"]},
    entry_points={"console_scripts": ["legw-fused = legw_fused.cli:main"]},
    zip_safe=False,
)
