"""The nanochat stand-in package (tests/stubs/nanochat), imported on demand: the stubs folder is
on sys.path only while a caller needs it, so no test finds it there by accident."""
import contextlib
import importlib
import sys
from pathlib import Path

STUBS = Path(__file__).parent / "stubs"


@contextlib.contextmanager
def stubs_on_path():
    sys.path.insert(0, str(STUBS))
    try:
        yield
    finally:
        sys.path.remove(str(STUBS))


def nanochat(module: str):
    """``nanochat.<module>`` of the stand-in."""
    with stubs_on_path():
        return importlib.import_module(f"nanochat.{module}")
