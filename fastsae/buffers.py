"""Large CPU buffers kept for reuse from one training step to the next.

glibc's malloc serves blocks over its mmap threshold (at most 32 MiB) straight from the
operating system and hands them back on free, so a tensor of that size made anew every step
has each of its pages faulted in and zeroed by the kernel again: a weight gradient at d_in
768, d_sae 24576 (72 MiB) costs 20-35 ms more so (2-core AMD EPYC). ``empty`` keeps the
storage of each large tensor it makes and hands it out again once no tensor uses it any more
(this module holds the only reference). The trainer drops the last step's gradients before
the forward, so the encoder's bf16 copy is made in one of their storages and the backward
writes the new gradients into them again; autograd keeps them as ``.grad`` without a copy.
Storages are kept only inside ``kept()``, which the trainer's step enters: elsewhere (an
evaluation over many SAEs, say) ``empty`` is torch.empty and holds nothing. The storages stay
alive between steps (at most KEEP of them, the least recently used dropped first); ``release``
frees them (the trainer does at the end of ``train()``).
"""
from __future__ import annotations

import contextlib
import math
import threading

import torch

# Blocks below glibc's largest mmap threshold come back from the heap already faulted in.
MIN_BYTES = 32 * 2**20
KEEP = 16

_kept: list[torch.UntypedStorage] = []
_lock = threading.Lock()  # one storage, one taker
_active = 0  # kept() calls entered and not yet left


@contextlib.contextmanager
def kept():
    """Within this block, ``empty`` keeps and reuses large CPU storages."""
    global _active
    with _lock:
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1


def _unused(storage: torch.UntypedStorage) -> bool:
    return torch._C._storage_Use_Count(storage._cdata) == 1  # this module's reference alone


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty(shape, dtype=dtype, device=device), within ``kept()`` on the largest unused
    kept storage that holds it in at most twice its size (CPU tensors of at least MIN_BYTES)."""
    device = torch.device(device)
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes < MIN_BYTES or not _active:
        return torch.empty(shape, dtype=dtype, device=device)
    with _lock:
        fits = [s for s in _kept if nbytes <= s.nbytes() <= 2 * nbytes and _unused(s)]
        if fits:
            storage = max(fits, key=lambda s: s.nbytes())
            # The smaller ones that would have held it go: kept, they would only add memory (a
            # bf16 copy made before any gradient existed, once the copy lives in a gradient's place).
            dropped = {id(s) for s in fits if s.nbytes() < storage.nbytes()} | {id(storage)}
            _kept[:] = [s for s in _kept if id(s) not in dropped] + [storage]  # most recently used last
            return torch.empty(0, dtype=dtype).set_(storage, 0, tuple(shape))
        out = torch.empty(shape, dtype=dtype)
        _kept.append(out.untyped_storage())
        del _kept[:-KEEP]
        return out


def zeros(shape, dtype: torch.dtype, device) -> torch.Tensor:
    return empty(shape, dtype, device).zero_()


def release() -> None:
    """Drop the kept storages (their memory is freed once no tensor uses it)."""
    with _lock:
        _kept.clear()
