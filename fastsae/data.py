"""Where the trainer's rows come from: a Tensor [N, d_in] or an ActivationStore.

A source serves one epoch's batches for one rank (``epoch_batches``: epoch e is a fixed,
seeded order, so a resumed run reads what an uninterrupted one would), a seeded sample for
initialisation, the rows in order for evaluation, and how many rows the unluckiest rank gets
per epoch (``min_rank_rows``), from which the trainer sizes its steps.
"""
from __future__ import annotations

import math

import torch

__all__ = ["StoreSource", "TensorSource", "data_source", "split_activations"]


class TensorSource:
    """Rows of a Tensor [N, d_in]. Epoch e is a permutation seeded by (seed, e); batch t of it
    is rows [t*B, (t+1)*B) of the permutation, rank r reading the r-th slice."""

    def __init__(self, x: torch.Tensor, name: str):
        if x.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor [N, d_in], got shape {tuple(x.shape)}")
        self.x = x
        self.num_rows, self.width = x.shape
        self._perm_epoch, self._perm = None, None

    def _permutation(self, epoch: int, seed: int) -> torch.Tensor:
        if self._perm_epoch != (seed, epoch):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.num_rows, generator=gen), (seed, epoch)
        return self._perm

    def epoch_batches(self, epoch, start, steps, seed, global_batch, rank, world_size):
        perm, local = self._permutation(epoch, seed), global_batch // world_size
        for t in range(start, steps):
            begin = t * global_batch + rank * local
            yield self.x[perm[begin:begin + local].to(self.x.device)]

    def sample(self, n: int, seed: int) -> torch.Tensor:
        idx = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(seed))[:n]
        return self.x[idx.sort().values.to(self.x.device)]

    def sequential(self, batch_size: int):
        yield from self.x.split(batch_size)

    def min_rank_rows(self, world_size: int, global_batch: int) -> int:
        return self.num_rows


class StoreSource:
    """An ActivationStore, read through its own shuffled, rank-sliced ``iter_batches`` (block
    order seeded by (seed, epoch)); resuming mid-epoch replays the epoch's reads up to the step."""

    def __init__(self, store, name: str):
        self.store = store
        self.num_rows, self.width = len(store), int(store.d_in)

    def epoch_batches(self, epoch, start, steps, seed, global_batch, rank, world_size):
        it = self.store.iter_batches(global_batch // world_size, shuffle=True, seed=seed, epoch=epoch, rank=rank,
                                     world_size=world_size, drop_last=True)
        for t, x in enumerate(it):
            if t >= steps:
                return
            if t >= start:
                yield x

    def sample(self, n: int, seed: int) -> torch.Tensor:
        return next(iter(self.store.iter_batches(n, shuffle=True, seed=seed, buffer_tokens=n)))

    def sequential(self, batch_size: int):
        yield from self.store.iter_batches(batch_size, shuffle=False)

    def min_rank_rows(self, world_size: int, global_batch: int) -> int:
        """Rows the unluckiest rank gets per epoch: ranks read whole blocks (1024 rows; one short
        block per shard), so every rank can take the same number of steps."""
        if world_size == 1:
            return self.num_rows
        blocks = sum(math.ceil(s["num_tokens"] / 1024) for s in self.store.shards)
        return max(0, (blocks // world_size - len(self.store.shards)) * 1024) * world_size


def data_source(data, name: str, d_in: int):
    """The source for a Tensor [N, d_in] or an ActivationStore, checked against d_in."""
    if isinstance(data, torch.Tensor):
        source = TensorSource(data, name)
    elif hasattr(data, "iter_batches") and hasattr(data, "d_in"):
        source = StoreSource(data, name)
    else:
        raise TypeError(f"{name} must be a torch.Tensor [N, d_in] or an ActivationStore, got {type(data).__name__}")
    if source.width != d_in:
        raise ValueError(f"{name} have width {source.width} but config.d_in is {d_in}; "
                         "they must come from the hook point the SAE is configured for")
    if source.num_rows == 0:
        raise ValueError(f"{name} is empty")
    return source


def split_activations(activations: torch.Tensor, val_split: float, seed: int = 0):
    """(train, val) rows of a tensor, split at random (seeded); val is None when val_split is 0."""
    if not 0 <= val_split < 1:
        raise ValueError(f"val_split must be in [0, 1), got {val_split}")
    n_val = int(len(activations) * val_split)
    if n_val == 0:
        return activations, None
    perm = torch.randperm(len(activations), generator=torch.Generator().manual_seed(seed))
    return activations[perm[n_val:].to(activations.device)], activations[perm[:n_val].to(activations.device)]
