"""Triton kernels of legw_fused and their launchers (installed as ``legw_fused.kernels``).

Each module holds one feature's ``@triton.jit`` kernels (named ``_<feature>_kernel``) and the launcher that picks
grid and block sizes. On CPU tensors they run under ``TRITON_INTERPRET=1``, which is how they are tested without a GPU.
"""
