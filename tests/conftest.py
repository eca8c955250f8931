import os

import torch

# Without a GPU, Triton kernels run on CPU tensors in the interpreter (set before triton or legw_fused load).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from _helpers import require_backend  # noqa: E402

# The backends that run on CPU tensors here; each test taking `backend` runs once per backend.
CPU_BACKENDS = ["torch", "cpp", "triton"]

@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return require_backend(request.param)
