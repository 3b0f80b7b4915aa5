"""Triton kernels for fastsae (installed as ``fastsae.kernels``).

Each module holds @triton.jit kernels and a plain Python launcher per primitive, with the
signatures documented in ``fastsae.torch_backend``. Nothing here knows about autograd.
Importing this package never fails: ``AVAILABLE`` says whether Triton can be used.
"""
try:
    import triton  # noqa: F401

    AVAILABLE = True
    TRITON_VERSION = triton.__version__
except Exception:  # pragma: no cover - platforms without Triton
    AVAILABLE = False
    TRITON_VERSION = None
