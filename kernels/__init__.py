"""Triton kernels for fastsae (installed as ``fastsae.kernels``).

Each module holds @triton.jit kernels and a plain Python launcher per primitive, with the
signatures documented in ``fastsae.torch_backend``. Nothing here knows about autograd.
Importing this package never fails: ``AVAILABLE`` says whether Triton can be used.
"""
import sys

if __name__ == "kernels":
    # Imported as top-level ``kernels``: a fastsae checkout's root is on sys.path (``python -m
    # pytest`` or ``python -m bench...`` run from it), so this folder shadows Hugging Face's
    # ``kernels`` package, which transformers imports. Hand that name to the installed package
    # when there is one; the import system returns whatever sys.modules holds at the end.
    import importlib.machinery
    import importlib.util
    import os

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)

try:
    import triton  # noqa: F401

    AVAILABLE = True
    TRITON_VERSION = triton.__version__
except Exception:  # pragma: no cover - platforms without Triton
    AVAILABLE = False
    TRITON_VERSION = None
