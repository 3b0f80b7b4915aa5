"""Backend "auto": each primitive timed on the real inputs, the faster backend kept.

As ``cudnn.benchmark`` does for convolutions: the first call of a primitive (``topk_encode``,
``gather``, ``scatter_add``, ... of ``fastsae.torch_backend``'s set) for a shape class runs it
on every candidate backend ("triton" and "torch"; both compute the same answer, tested against
``fastsae.reference``), times each, and keeps the faster for that class. A shape class is the
primitive's name with each tensor's dtype and each size rounded up to a power of two, so a
batch of 4000 rows and one of 4096 share a choice. Choices are kept in memory and in a JSON
file, ``$FASTSAE_CACHE_DIR/backends.json`` (default ``~/.cache/fastsae``), under the device's
name and the fastsae, torch and triton versions, so a later process on the same GPU skips the
timing; a different GPU or version times again. ``fastsae info`` lists the file's choices.

Timing: one warm-up call (Triton compiles there), then the median of ``REPEATS`` calls, with
the device synchronised around each; a candidate that cannot run the call (Triton on CPU
tensors without its interpreter) is left out. Forward and backward primitives are timed separately,
so an op may run its forward on one backend and its backward on the other.
"""
from __future__ import annotations

import functools
import json
import os
import statistics
import threading
import time
import types
from pathlib import Path

import torch

from fastsae.files import atomic_write_json

CANDIDATES = ("triton", "torch")
REPEATS = 5
CACHE_FILE = "backends.json"

_lock = threading.Lock()
_memory: dict[str, dict[str, dict]] = {}  # device key -> {shape class: {"backend", "ms"}}


def cache_path() -> Path:
    root = os.environ.get("FASTSAE_CACHE_DIR") or Path.home() / ".cache" / "fastsae"
    return Path(root) / CACHE_FILE


@functools.lru_cache(maxsize=None)
def device_key(device: torch.device) -> str:
    """The device's name and the versions whose kernels and timings a choice depends on (once
    per device: every primitive call under "auto" looks it up)."""
    from fastsae import __version__, kernels

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        import platform

        name = f"{device.type} {platform.processor() or platform.machine()}"
    return f"{name} | fastsae {__version__} | torch {torch.__version__} | triton {kernels.TRITON_VERSION}"


def _bucket(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def shape_class(primitive: str, args) -> str:
    """``primitive`` with each tensor argument's dtype and power-of-two-rounded shape and each
    integer argument rounded likewise (None and booleans as they are)."""
    parts = [primitive]
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append(f"{str(a.dtype).removeprefix('torch.')}[{','.join(str(_bucket(s)) for s in a.shape)}]")
        elif isinstance(a, bool) or a is None:
            parts.append(str(a))
        elif isinstance(a, int):
            parts.append(str(_bucket(a)))
        else:
            parts.append(type(a).__name__)
    return " ".join(parts)


def _read_file() -> dict:
    try:
        data = json.loads(cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cached_choices(device: torch.device) -> dict[str, dict]:
    """{shape class: {"backend", "ms"}} this device has on disk and in memory."""
    key = device_key(device)
    return {**(_read_file().get(key) or {}), **_memory.get(key, {})}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device):
    """(median milliseconds of REPEATS calls after one warm-up, the last result)."""
    fn()
    times = []
    for _ in range(REPEATS):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), out


def _record(key: str, cls: str, entry: dict) -> None:
    """Remember a choice, and add it to the file (read again first: another process may have
    written choices of its own since)."""
    _memory.setdefault(key, {})[cls] = entry
    data = _read_file()
    data.setdefault(key, {})[cls] = entry
    try:
        atomic_write_json(cache_path(), data)
    except OSError:  # a read-only home still gets the choice, for this process
        pass


def choose(primitive: str, args, kwargs, device: torch.device, implementations: dict):
    """(backend name, result): the cached choice's result, or each candidate timed on these
    arguments and the faster one's result."""
    key, cls = device_key(device), shape_class(primitive, list(args) + list(kwargs.values()))
    with _lock:
        if key not in _memory:
            _memory[key] = dict(_read_file().get(key) or {})
        entry = _memory[key].get(cls)
    if entry is not None and entry["backend"] in implementations:
        name = entry["backend"]
        return name, getattr(implementations[name], primitive)(*args, **kwargs)
    timed, failed = {}, None
    for name, p in implementations.items():
        try:
            timed[name] = _time(lambda p=p: getattr(p, primitive)(*args, **kwargs), device)
        except (RuntimeError, ValueError) as e:  # e.g. Triton given CPU tensors without its interpreter
            failed = e
    if not timed:
        raise failed
    name = min(timed, key=lambda n: timed[n][0])
    with _lock:
        _record(key, cls, {"backend": name, "ms": {n: round(ms, 4) for n, (ms, _) in timed.items()}})
    return name, timed[name][1]


def auto_primitives(implementations: dict, names) -> types.SimpleNamespace:
    """A primitive set of the primitives ``names``, each picking its backend by ``choose``."""

    def picker(primitive):
        def call(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            device = tensors[0].device if tensors else torch.device("cpu")
            return choose(primitive, args, kwargs, device, implementations)[1]
        call.__name__ = primitive
        return call

    return types.SimpleNamespace(**{n: picker(n) for n in names})
