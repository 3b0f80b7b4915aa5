"""Where the trainer's rows come from: a Tensor [N, d_in], an ActivationStore or a stream.

A source serves one epoch's batches for one rank (``epoch_batches``: epoch e is a fixed,
seeded order, so a resumed run reads what an uninterrupted one would), a seeded sample for
initialisation, the rows in order for evaluation, and its number of rows, from which the
trainer sizes its steps (every rank takes its slice of every global batch).
"""
from __future__ import annotations

import itertools
import time

import torch

__all__ = ["ColumnSlice", "StoreSource", "StreamSource", "TensorSource", "data_source", "model_clock",
           "split_activations", "window_shuffled_batches"]


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


def _rank_slices(global_batches, start, steps, rank, world_size):
    """This rank's slice of global batches start .. steps - 1 of an epoch's batch sequence (the
    ones before ``start`` are read and dropped: a resumed epoch replays its reads)."""
    for t, x in enumerate(global_batches):
        if t >= steps:
            return
        if t >= start:
            local = x.shape[0] // world_size
            yield x[rank * local:(rank + 1) * local]


class StoreSource:
    """An ActivationStore, read through its shuffled ``iter_batches`` (block order seeded by
    (seed, epoch)). Under torch.distributed every rank reads every global batch and keeps its
    slice, as TensorSource does, so N ranks see the batches one process sees (reading N times
    the rows from the page cache, which costs little next to a training step). Resuming
    mid-epoch replays the epoch's reads up to the step."""

    def __init__(self, store, name: str):
        self.store = store
        self.num_rows, self.width = len(store), int(store.d_in)

    def epoch_batches(self, epoch, start, steps, seed, global_batch, rank, world_size):
        it = self.store.iter_batches(global_batch, shuffle=True, seed=seed, epoch=epoch, drop_last=True)
        return _rank_slices(it, start, steps, rank, world_size)

    def sample(self, n: int, seed: int) -> torch.Tensor:
        return next(iter(self.store.iter_batches(n, shuffle=True, seed=seed, buffer_tokens=n)))

    def sequential(self, batch_size: int):
        yield from self.store.iter_batches(batch_size, shuffle=False)


def _as_source(data, name: str):
    if isinstance(data, torch.Tensor):
        return TensorSource(data, name)
    if hasattr(data, "iter_batches") and hasattr(data, "d_in"):
        return StoreSource(data, name)
    if isinstance(data, (StreamSource, ColumnSlice, TensorSource, StoreSource)):
        return data
    raise TypeError(f"{name} must be a torch.Tensor [N, d_in], an ActivationStore, a StreamSource or a ColumnSlice, "
                    f"got {type(data).__name__}")


class ColumnSlice:
    """Columns [start, stop) of another source's rows: one SAE's share of a source that serves
    several hook points side by side (a StreamSource over all of them, say). A trainer on it
    alone reads the whole source and keeps its columns; ``fastsae.trainer.train_together``
    reads the source once for every SAE."""

    def __init__(self, source, start: int, stop: int):
        source = _as_source(source, "source")
        if not 0 <= start < stop <= source.width:
            raise ValueError(f"columns [{start}, {stop}) are not within the source's width {source.width}")
        self.source, self.start, self.stop = source, int(start), int(stop)
        self.num_rows, self.width = source.num_rows, self.stop - self.start

    def columns(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.start:self.stop]

    def epoch_batches(self, *args):
        return (self.columns(x) for x in self.source.epoch_batches(*args))

    def sample(self, n: int, seed: int) -> torch.Tensor:
        return self.columns(self.source.sample(n, seed))

    def sequential(self, batch_size: int):
        return (self.columns(x) for x in self.source.sequential(batch_size))


def data_source(data, name: str, config):
    """The source for a Tensor, an ActivationStore (or PairedStore) or a StreamSource, checked
    against the config: rows of d_in (an SAE) or d_in + d_out (a transcoder's [input | target])."""
    source = _as_source(data, name)
    if config.is_transcoder and source.width != config.d_in + config.d_out:
        raise ValueError(f"{name} have width {source.width} but a transcoder trains on [input | target] rows "
                         f"of d_in + d_out = {config.d_in} + {config.d_out}: pair its two hook points "
                         "(fastsae.store.PairedStore, or a StreamSource of both)")
    if not config.is_transcoder and source.width != config.d_in:
        raise ValueError(f"{name} have width {source.width} but config.d_in is {config.d_in}; "
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


def window_shuffled_batches(chunks, window_rows: int, batch_rows: int, seed: int, epoch: int):
    """Batches of ``batch_rows`` rows from a stream of row chunks, shuffled within windows of
    ``window_rows`` rows (window w by a permutation seeded by (seed, epoch, w)); the rows left
    over at the end of a window lead the next one; a last partial batch is dropped. At most
    one window plus one chunk is held at a time."""
    held, count, window = [], 0, 0
    rest = None

    def emit(rows):
        nonlocal window, rest
        gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + window)
        window += 1
        rows = rows[torch.randperm(rows.shape[0], generator=gen)]
        if rest is not None:
            rows = torch.cat([rest, rows])
        whole = rows.shape[0] // batch_rows * batch_rows
        rest = rows[whole:]
        return rows[:whole].split(batch_rows)

    for chunk in chunks:
        held.append(chunk)
        count += chunk.shape[0]
        while count >= window_rows:
            rows = torch.cat(held)
            held, count = [rows[window_rows:]], rows.shape[0] - window_rows
            yield from emit(rows[:window_rows])
    if count:
        yield from emit(torch.cat(held))


class StreamSource:
    """Activations straight from the model's forward, nothing written to disk: ``num_rows``
    tokens of the corpus after its first ``skip_tokens``, at one hook point or at several side
    by side (a transcoder's [input | output], as a PairedStore serves; or every SAE's of a
    ``train_together`` run, each taking a ColumnSlice), shuffled within windows of
    ``window_rows`` rows (``window_shuffled_batches``); memory is one window, whatever the
    number of tokens. Every epoch, and a resumed run, replays the corpus through the model
    (a resume re-runs it up to the step it continues from). The rows read by ``sample`` (each
    SAE's initialisation) are kept: later samples and every epoch start from them in memory.

    Under torch.distributed (world size W > 1, ``distributed=None``), rank r runs the model on
    model batches r, r + W, ...; each round's W chunks are all-gathered, so every rank sees the
    one-process stream, rows and order, while running 1/W of the forwards. ``columns`` (indices
    into the joined hook points' width) keeps only those on this rank: with
    ``--distribute-modules`` each rank keeps its own SAEs' columns. Every rank must read the
    stream in step (the same epochs, batches and samples, in the same order)."""

    def __init__(self, model, tokenizer, corpus, hook_point: str | tuple[str, ...], num_rows: int, *,
                 skip_tokens: int = 0, window_rows: int = 1 << 18, batch_size: int = 32, context_length: int = 128,
                 drop_bos: bool = False, columns=None, distributed: bool | None = None):
        from fastsae.hooks import hook_width

        if num_rows < 1 or window_rows < 1:
            raise ValueError(f"num_rows and window_rows must be >= 1, got {num_rows} and {window_rows}")
        self.hook_points = (hook_point,) if isinstance(hook_point, str) else tuple(hook_point)
        self.model, self.tokenizer, self.corpus, self.hook_point = model, tokenizer, corpus, self.hook_points[0]
        self.num_rows, self.skip_tokens, self.window_rows = int(num_rows), int(skip_tokens), int(window_rows)
        self.batch_size, self.context_length, self.drop_bos = batch_size, context_length, drop_bos
        self.full_width = sum(hook_width(model, hp) for hp in self.hook_points)
        self.columns = None if columns is None else torch.as_tensor(columns, dtype=torch.long)
        if self.columns is not None and (self.columns.dim() != 1 or self.columns.numel() == 0 or
                                         int(self.columns.min()) < 0 or int(self.columns.max()) >= self.full_width):
            raise ValueError(f"columns must be a non-empty list of indices below the hook points' width "
                             f"{self.full_width}, got {columns!r}")
        self.width = self.full_width if self.columns is None else self.columns.numel()
        rank, world_size = rank_and_world()
        self.rank, self.world_size = (rank, world_size) if distributed in (None, True) else (0, 1)
        self._kept: list[torch.Tensor] = []  # the first chunks, read by sample
        self.model_seconds, self.rows_out = 0.0, 0  # time spent waiting for the model, rows it gave

    def _model_chunks(self, skip_rounds: int = 0):
        """The activations in corpus order (this rank's columns), one chunk per round of W
        model batches, each rank running the model on its share of a round; the first
        ``skip_rounds`` rounds are tokenized but not run."""
        from fastsae.corpus import iter_token_batches
        from fastsae.hooks import ActivationCollector, model_device, run_collector_batch

        device = model_device(self.model)
        collector = ActivationCollector(self.model, list(self.hook_points), max_activations=2**62,
                                        device=device, drop_bos=self.drop_bos)
        batches = iter_token_batches(self.tokenizer, self.corpus, self.context_length, self.batch_size,
                                     skip_tokens=self.skip_tokens)
        for _ in range(skip_rounds * self.world_size):
            next(batches, None)
        with collector:
            while True:
                start, mine, ended = time.perf_counter(), None, False
                for r in range(self.world_size):  # one round: batch r of it runs on rank r
                    batch = next(batches, None)
                    ended = batch is None
                    if ended:
                        break
                    if r == self.rank:
                        run_collector_batch(collector, self.model, batch)
                        # .float(): a normal tensor (collected in inference mode, trained on here)
                        mine = collector.pop_joined(self.hook_points)[0].float()
                if self.world_size > 1:
                    mine = self._all_gathered(mine, device)
                if mine is not None and self.columns is not None:
                    mine = mine[:, self.columns.to(mine.device)]
                if mine is not None:
                    self.model_seconds += time.perf_counter() - start
                    self.rows_out += mine.shape[0]
                    yield mine
                if ended:
                    return

    def _all_gathered(self, mine, device) -> torch.Tensor:
        """Every rank's chunk of this round, joined in rank order."""
        import torch.distributed as dist

        mine = torch.zeros(0, self.full_width, device=device) if mine is None else mine
        sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([mine.shape[0]], device=device))
        rows = max(int(n) for n in sizes)
        padded = torch.zeros(rows, self.full_width, device=device)
        padded[:mine.shape[0]] = mine
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:int(n)] for part, n in zip(parts, sizes)])

    def _short_corpus(self, left: int) -> ValueError:
        return ValueError(f"the corpus ended {left} tokens short of the {self.num_rows} asked for streaming "
                          f"(after skipping {self.skip_tokens}): ask for fewer tokens")

    def chunks(self):
        """The activations in corpus order, one [n, width] chunk per round of model batches
        (the kept sample's from memory); fails if the corpus ends before num_rows tokens."""
        left = self.num_rows
        for acts in itertools.chain(self._kept, self._model_chunks(skip_rounds=len(self._kept))):
            acts = acts[:left]
            left -= acts.shape[0]
            yield acts
            if left == 0:
                return
        raise self._short_corpus(left)

    def epoch_batches(self, epoch, start, steps, seed, global_batch, rank, world_size):
        batches = window_shuffled_batches(self.chunks(), self.window_rows, global_batch, seed, epoch)
        return _rank_slices(batches, start, steps, rank, world_size)

    def sample(self, n: int, seed: int) -> torch.Tensor:
        """The first n rows of the stream. The model runs over the first n tokens once: their
        chunks are kept, for later samples of at most n rows and to start every epoch from
        memory. Under torch.distributed a sample larger than the kept one is a collective:
        every rank must ask for it."""
        n, got = min(n, self.num_rows), sum(c.shape[0] for c in self._kept)
        if got < n:
            for chunk in self._model_chunks(skip_rounds=len(self._kept)):  # the kept ones, extended
                self._kept.append(chunk)
                got += chunk.shape[0]
                if got >= n:
                    break
            else:
                raise self._short_corpus(self.num_rows - got)
        pieces, rows = [], 0
        for chunk in self._kept:  # only the chunks the n rows lie in; a fresh tensor, so callers may write to it
            pieces.append(chunk[:n - rows])
            rows += pieces[-1].shape[0]
            if rows == n:
                break
        return torch.cat(pieces)

    def sequential(self, batch_size: int):
        for chunk in self.chunks():
            yield from chunk.split(batch_size)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) under torch.distributed; (0, 1) in one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def model_clock(data) -> tuple[float, int] | None:
    """(seconds spent waiting for the model, rows it gave) of a StreamSource, or of the one a
    ColumnSlice reads; None for stored activations."""
    source = getattr(data, "source", data)
    if isinstance(source, StreamSource):
        return source.model_seconds, source.rows_out
    return None
