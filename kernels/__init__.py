"""Triton kernels for fastsae (installed as ``fastsae.kernels``).

Each module holds @triton.jit kernels and a plain Python launcher per primitive, with the
signatures documented in ``fastsae.torch_backend``. Nothing here knows about autograd.
Importing this package never fails: ``AVAILABLE`` says whether Triton can be used.
"""
import sys


def _installed_kernels_spec():
    """The import spec of a ``kernels`` package found outside this checkout, or None."""
    import importlib.machinery
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
    return spec if spec is not None and spec.loader is not None else None


# Imported as top-level ``kernels``: a fastsae checkout's root is on sys.path (``python -m
# pytest`` or ``python -m bench...`` run from it), so this folder shadows Hugging Face's
# ``kernels`` package, which transformers imports. Hand that name to the installed package
# when there is one (the import system returns whatever sys.modules holds at the end), and
# skip the Triton probe that package's users never read.
_handed_over = __name__ == "kernels" and _installed_kernels_spec()
if _handed_over:
    import importlib.util

    _module = importlib.util.module_from_spec(_handed_over)
    sys.modules["kernels"] = _module
    _handed_over.loader.exec_module(_module)
else:
    try:
        import triton  # noqa: F401

        AVAILABLE = True
        TRITON_VERSION = triton.__version__
    except Exception:  # pragma: no cover - platforms without Triton
        AVAILABLE = False
        TRITON_VERSION = None
