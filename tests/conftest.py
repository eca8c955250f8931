import pytest
from _helpers import require_backend

# The backends that run on CPU tensors; each test taking `backend` runs once per backend.
CPU_BACKENDS = ["torch", "cpp"]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return require_backend(request.param)
