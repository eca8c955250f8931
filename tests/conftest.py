import os

import torch

# Without a GPU, Triton kernels run on CPU tensors in the interpreter (set before triton or legw_fused load).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _use_this_checkouts_subpackages():
    """legw_fused.kernels and legw_fused.bench live in kernels/ and bench/ (setup.py's package_dir). An editable
    install of another checkout maps those two names to *its* folders, so that with PYTHONPATH=<this checkout> the
    package came from here but its Triton kernels from there. Bind them to this checkout's folders."""
    import importlib.util
    import sys
    from pathlib import Path

    import legw_fused

    root = Path(__file__).resolve().parent.parent
    if Path(legw_fused.__file__).resolve().parent != root / "legw_fused":
        return  # an installed package is under test: its own subpackages are right
    for name in ("kernels", "bench"):
        spec = importlib.util.spec_from_file_location(f"legw_fused.{name}", root / name / "__init__.py",
                                                      submodule_search_locations=[str(root / name)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        setattr(legw_fused, name, module)


_use_this_checkouts_subpackages()

import pytest  # noqa: E402
from _helpers import require_backend  # noqa: E402

# The backends that run on CPU tensors here; each test taking `backend` runs once per backend.
CPU_BACKENDS = ["torch", "cpp", "triton"]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return require_backend(request.param)
