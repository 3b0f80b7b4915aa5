"""An on-disk activation store: sharded safetensors files plus a JSON manifest.

Layout of a store directory::

    manifest.json               what was collected, from which model and corpus, and the shard list
    shard_000000.safetensors    activations [n, d_in] + token_ids, doc_ids, positions, token_index [n]
    shard_000001.safetensors    ...

Writing streams: every shard holds exactly `shard_tokens` tokens (the last may hold fewer) and
is written to a temp file and renamed; the manifest is rewritten the same way after each shard.
Only shards listed in the manifest count, so an interrupted collection leaves a valid prefix,
and rerunning collect_to_store with the same arguments resumes after the last full shard,
giving the same files as an uninterrupted run (the corpus is replayed, the stored part skipped
without running the model).

Reading never loads the whole store: shards are memory-mapped (safetensors safe_open) and read
in blocks; blocks from all shards are shuffled with a seeded generator and mixed in a bounded
buffer, so every token is seen exactly once per epoch.
"""
from __future__ import annotations

import copy
import hashlib
import json
import operator
import os
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from fastsae.config import check_hook_point
from fastsae.files import atomic_save_tensors, atomic_write_json
from fastsae.hooks import (
    ActivationCollector,
    kept_tokens,
    model_device,
    resolve_hook_point,
    run_collector_batch,
)
from fastsae.progress import progress_bar

__all__ = ["ActivationStore", "PairedStore", "StoreMismatchError", "collect_to_store", "collect_to_stores",
           "model_fingerprint", "split_store"]

MANIFEST = "manifest.json"
FORMAT = "fastsae.activation_store"
VERSION = 1
METADATA_FIELDS = ("token_ids", "doc_ids", "positions", "token_index")


class StoreMismatchError(ValueError):
    """The store on disk was collected from another model, hook point or setting."""


def model_fingerprint(model: nn.Module) -> str:
    """A short hash identifying a model's weights: every parameter's name, shape and dtype, plus
    up to 1024 evenly strided values of each (cheap even for large models, and changes when any
    tensor is retrained)."""
    h = hashlib.sha256()
    for name, param in model.named_parameters():
        flat = param.detach().flatten()
        sample = flat[:: max(1, flat.numel() // 1024)][:1024].float().cpu()
        h.update(f"{name}:{tuple(param.shape)}:{param.dtype}|".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def _read_manifest(store_dir: Path) -> dict | None:
    path = store_dir / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fastsae activation store manifest (format={manifest.get('format')!r})")
    return manifest


def _differences(stored: dict, wanted: dict) -> list[str]:
    return [f"{key}: store has {stored.get(key)!r}, now {value!r}" for key, value in wanted.items()
            if stored.get(key) != value]


class ActivationStore:
    """Read access to a store directory written by collect_to_store.

    Pass `model`, `hook_point` and/or `d_in` to check the store was collected for them
    (StoreMismatchError otherwise). An interrupted (incomplete) store raises unless
    allow_incomplete=True.
    """

    def __init__(self, store_dir: str | os.PathLike, model: nn.Module | None = None, hook_point: str | None = None,
                 d_in: int | None = None, allow_incomplete: bool = False):
        self.store_dir = Path(store_dir)
        manifest = _read_manifest(self.store_dir)
        if manifest is None:
            raise FileNotFoundError(f"no activation store at {self.store_dir} (missing {MANIFEST})")
        self.manifest = manifest
        check_hook_point(manifest.get("hook_point"), f"{self.store_dir / MANIFEST}: hook_point")
        expected = {"hook_point": hook_point, "d_in": d_in,
                    "model_fingerprint": model_fingerprint(model) if model is not None else None}
        diffs = _differences(manifest, {k: v for k, v in expected.items() if v is not None})
        if diffs:
            raise StoreMismatchError(f"activation store {self.store_dir} does not match: " + "; ".join(diffs))
        if not manifest["complete"] and not allow_incomplete:
            raise RuntimeError(f"activation store {self.store_dir} is incomplete: collection stopped after "
                               f"{manifest['token_count']} of {manifest['max_tokens']} tokens. Rerun collect_to_store "
                               "with the same arguments to resume, or pass allow_incomplete=True.")
        self._check_shards()

    def _check_shards(self) -> None:
        """Every listed shard exists and holds the number of tokens the manifest says."""
        from safetensors import safe_open

        for shard in self.shards:
            path = self.store_dir / shard["file"]
            if not path.is_file():
                raise FileNotFoundError(f"activation store {self.store_dir}: shard {shard['file']} is missing")
            with safe_open(path, framework="pt") as f:
                shape = f.get_slice("activations").get_shape()
            if shape != [shard["num_tokens"], self.d_in]:
                raise ValueError(f"activation store {self.store_dir}: shard {shard['file']} has shape {shape}, "
                                 f"manifest says [{shard['num_tokens']}, {self.d_in}]")

    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    @property
    def d_in(self) -> int:
        return self.manifest["d_in"]

    @property
    def hook_point(self) -> str:
        return self.manifest["hook_point"]

    @property
    def num_tokens(self) -> int:
        return self.manifest["token_count"]

    def __len__(self) -> int:
        return self.num_tokens

    def select_shards(self, indices: Iterable[int]) -> ActivationStore:
        """A read-only view of the listed shards of this same directory, in the order given.

        Everything that reads the store (num_tokens, len, shards, read_shard, load_all,
        iter_batches) then sees only those shards, renumbered 0..len(indices)-1; the view's
        `manifest` is this one with `shards` and `token_count` narrowed to match. Nothing on
        disk changes. A shard may be listed once (twice would show its tokens twice per epoch).
        """
        count = len(self.shards)
        try:
            indices = [operator.index(i) for i in indices]
        except TypeError:
            raise ValueError(f"indices must be integers in [0, {count}), got {indices!r}") from None
        bad = [i for i in indices if not 0 <= i < count]
        if bad:
            raise ValueError(f"indices must be in [0, {count}) (the store has {count} shards), got {bad}")
        if not indices or len(set(indices)) != len(indices):
            raise ValueError(f"indices must list at least one shard, each once, got {indices}")
        kept = [self.shards[i] for i in indices]
        view = copy.copy(self)  # same directory, already checked: no need to reread or recheck it
        view.manifest = dict(self.manifest, shards=kept, token_count=sum(s["num_tokens"] for s in kept))
        return view

    def read_shard(self, index: int) -> dict[str, torch.Tensor]:
        """One whole shard: {"activations", "token_ids", "doc_ids", "positions", "token_index"}."""
        from safetensors.torch import load_file

        return load_file(self.store_dir / self.shards[index]["file"])

    def load_all(self) -> torch.Tensor:
        """Every activation in store order, as one [N, d_in] tensor (only for stores that fit in memory)."""
        return torch.cat([self.read_shard(i)["activations"] for i in range(len(self.shards))])

    def _blocks(self, block_tokens: int) -> list[tuple[int, int, int]]:
        return [(i, start, min(start + block_tokens, shard["num_tokens"]))
                for i, shard in enumerate(self.shards) for start in range(0, shard["num_tokens"], block_tokens)]

    def _read_blocks(self, blocks: list[tuple[int, int, int]], with_metadata: bool) -> dict[str, torch.Tensor]:
        """Read the given (shard, start, end) row ranges through memory maps, opening each shard once."""
        from safetensors import safe_open

        fields = ("activations",) + (METADATA_FIELDS if with_metadata else ())
        parts: dict[str, list[torch.Tensor]] = defaultdict(list)
        by_shard: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for shard, start, end in blocks:
            by_shard[shard].append((start, end))
        for shard, ranges in by_shard.items():
            with safe_open(self.store_dir / self.shards[shard]["file"], framework="pt") as f:
                for start, end in ranges:
                    for name in fields:
                        parts[name].append(f.get_slice(name)[start:end])
        return {name: torch.cat(chunks) for name, chunks in parts.items()}

    def iter_batches(self, batch_size: int, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                     device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1,
                     drop_last: bool = False, buffer_tokens: int = 1 << 18, block_tokens: int = 1024,
                     with_metadata: bool = False, dtype: torch.dtype | None = None) -> Iterator:
        """Batches of [batch_size, d_in] activations on `device`; one pass is one epoch.

        Every token is yielded exactly once per epoch (drop_last aside). With shuffle, blocks of
        `block_tokens` rows from all shards come in a random order seeded by (seed, epoch), and
        tokens are permuted within a buffer of about `buffer_tokens` rows, which bounds memory.
        With world_size > 1, rank r reads only every world_size-th block (the same seeded
        order on every rank), so ranks are disjoint and together cover every token.
        with_metadata=True yields (activations, {"token_ids", "doc_ids", "positions", "token_index"}).
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        device = torch.device(device)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        blocks = self._blocks(block_tokens)
        if shuffle:
            blocks = [blocks[i] for i in torch.randperm(len(blocks), generator=generator).tolist()]
        blocks = blocks[rank::world_size]

        carry: dict[str, torch.Tensor] | None = None
        for window in _windows(blocks, buffer_tokens):
            data = self._read_blocks(window, with_metadata)
            if carry is not None:
                data = {k: torch.cat([carry[k], v]) for k, v in data.items()}
            if shuffle:
                perm = torch.randperm(len(data["activations"]), generator=generator)
                data = {k: v[perm] for k, v in data.items()}
            full = len(data["activations"]) // batch_size * batch_size
            for start in range(0, full, batch_size):
                yield self._deliver(data, start, start + batch_size, device, dtype, with_metadata)
            carry = {k: v[full:] for k, v in data.items()}
        if carry is not None and len(carry["activations"]) and not drop_last:
            yield self._deliver(carry, 0, len(carry["activations"]), device, dtype, with_metadata)

    @staticmethod
    def _deliver(data, start, end, device, dtype, with_metadata):
        acts = data["activations"][start:end]
        if dtype is not None:
            acts = acts.to(dtype)
        if device.type == "cuda":
            acts = acts.pin_memory().to(device, non_blocking=True)
        elif device != acts.device:
            acts = acts.to(device)
        if not with_metadata:
            return acts
        return acts, {k: data[k][start:end] for k in METADATA_FIELDS}

    def __iter__(self):
        return self.iter_batches(batch_size=4096)


class PairedStore:
    """Two stores of one collection (the same model, corpus, settings and shards: two hook
    points collected together, e.g. by ``collect_to_stores``) read as one: every row is
    [input row | output row] of the same token, the rows a transcoder trains on. The shuffled
    order is the input store's (both stores shuffle alike: same blocks, same seed)."""

    _SAME = ("model_fingerprint", "corpus", "context_length", "batch_size", "shard_tokens", "drop_bos")

    def __init__(self, input_store: ActivationStore, output_store: ActivationStore):
        self.input, self.output = input_store, output_store
        a, b = input_store.manifest, output_store.manifest
        differ = [k for k in self._SAME if a.get(k) != b.get(k)]
        if differ:
            raise StoreMismatchError(f"stores {input_store.store_dir} and {output_store.store_dir} come from "
                                     f"different collections ({', '.join(differ)} differ); collect both hook "
                                     "points together (collect_to_stores)")
        if [s["num_tokens"] for s in a["shards"]] != [s["num_tokens"] for s in b["shards"]]:
            raise StoreMismatchError(f"stores {input_store.store_dir} and {output_store.store_dir} hold different "
                                     f"tokens ({a['token_count']} and {b['token_count']} in their shards); "
                                     "collect both hook points together to the same max_tokens")

    @property
    def manifest(self) -> dict:
        return self.input.manifest

    @property
    def shards(self) -> list[dict]:
        return self.input.shards

    @property
    def d_in(self) -> int:
        """The width of a paired row: the input's plus the output's."""
        return self.input.d_in + self.output.d_in

    @property
    def hook_point(self) -> str:
        return self.input.hook_point

    @property
    def output_hook_point(self) -> str:
        return self.output.hook_point

    @property
    def num_tokens(self) -> int:
        return self.input.num_tokens

    def __len__(self) -> int:
        return self.num_tokens

    def select_shards(self, indices: Iterable[int]) -> "PairedStore":
        indices = list(indices)
        view = copy.copy(self)
        view.input, view.output = self.input.select_shards(indices), self.output.select_shards(indices)
        return view

    def read_shard(self, index: int) -> dict[str, torch.Tensor]:
        data = self.input.read_shard(index)
        data["activations"] = torch.cat([data["activations"], self.output.read_shard(index)["activations"]], 1)
        return data

    def load_all(self) -> torch.Tensor:
        return torch.cat([self.input.load_all(), self.output.load_all()], 1)

    def iter_batches(self, batch_size: int, *args, with_metadata: bool = False, **kwargs) -> Iterator:
        """ActivationStore.iter_batches of [input | output] rows."""
        pairs = zip(self.input.iter_batches(batch_size, *args, with_metadata=with_metadata, **kwargs),
                    self.output.iter_batches(batch_size, *args, **kwargs))
        for x, y in pairs:
            if with_metadata:
                x, meta = x
                yield torch.cat([x, y], 1), meta
            else:
                yield torch.cat([x, y], 1)

    def __iter__(self):
        return self.iter_batches(batch_size=4096)


def split_store(store, val_split: float):
    """(train store view, validation tensor): the last shards, about ``val_split`` of the
    tokens, are held out (whole shards, so the store's block reader still serves the rest)."""
    shards = store.shards
    n_val, held = 0, 0
    while val_split > 0 and n_val < len(shards) - 1 and held < val_split * store.num_tokens:
        n_val += 1
        held += shards[-n_val]["num_tokens"]
    if n_val == 0:
        return store, None
    n_train = len(shards) - n_val
    return store.select_shards(range(n_train)), store.select_shards(range(n_train, len(shards))).load_all()


def _windows(blocks: list[tuple[int, int, int]], buffer_tokens: int) -> Iterator[list[tuple[int, int, int]]]:
    window, size = [], 0
    for block in blocks:
        window.append(block)
        size += block[2] - block[1]
        if size >= buffer_tokens:
            yield window
            window, size = [], 0
    if window:
        yield window


def _existing_manifest(store_dir: Path, identity: dict, overwrite: bool, clean: bool = True) -> dict | None:
    """The manifest of this same collection already in store_dir, or None to start afresh.
    With ``clean`` (one process, or rank 0), leftovers of a killed write are removed, and with
    ``overwrite`` everything the store held."""
    manifest = _read_manifest(store_dir)
    if manifest is not None and overwrite:
        if clean:
            for old in [*store_dir.glob("shard_*.safetensors"), *store_dir.glob("progress_rank*_of_*.json")]:
                old.unlink()
            (store_dir / MANIFEST).unlink()
        return None
    if clean:
        for tmp in store_dir.glob(".*.tmp"):  # leftovers of a write that was killed
            tmp.unlink()
    if manifest is not None:
        diffs = _differences(manifest, identity)
        if diffs:
            raise StoreMismatchError(f"activation store {store_dir} was collected differently: " + "; ".join(diffs)
                                     + ". Use another store_dir, or overwrite=True to replace it.")
    return manifest


def _keep_full_shards(manifest: dict) -> dict:
    """Drop a last partial shard: it is collected again, so that extending a store gives the
    same shards as collecting the larger amount in one go."""
    manifest["shards"] = [s for s in manifest["shards"] if s["num_tokens"] == manifest["shard_tokens"]]
    manifest["token_count"] = sum(s["num_tokens"] for s in manifest["shards"])
    manifest["complete"] = False
    return manifest


def _write_shard(store_dir: Path, index: int, data: dict[str, torch.Tensor]) -> dict:
    name = f"shard_{index:06d}.safetensors"
    atomic_save_tensors(store_dir / name, data, metadata={"format": FORMAT})
    return {"file": name, "num_tokens": int(data["activations"].shape[0])}


class _StoreWriter:
    """One hook point's store while a collection runs: the rows of the shard being filled and
    the commit of each full shard (shard file first, then the list that names it).

    Shard s holds tokens [s * shard_tokens, (s + 1) * shard_tokens) of the token stream. Under
    torch.distributed, rank r of W writes the shards with s % W == r, the same files one
    process writes; each rank records its shards in its own progress file, and ``finish``
    merges them into the manifest on rank 0. One process writes the manifest after each shard.
    """

    def __init__(self, store_dir: Path, identity: dict, manifest: dict | None, model_name: str, max_tokens: int,
                 shard_tokens: int, on_shard, rank: int = 0, world_size: int = 1):
        if manifest is not None:
            manifest = _keep_full_shards(manifest)
        else:
            manifest = {"format": FORMAT, "version": VERSION, "model_name": model_name, **identity, "d_in": None,
                        "token_count": 0, "shards": [], "complete": False, "corpus_exhausted": False}
        manifest["max_tokens"] = max_tokens
        self.store_dir, self.manifest, self.shard_tokens, self.on_shard = store_dir, manifest, shard_tokens, on_shard
        self.rank, self.world_size, self.max_tokens = rank, world_size, max_tokens
        # index -> shard entry of every full shard this rank owns that is on disk already
        self.written = {i: shard for i, shard in enumerate(manifest["shards"]) if i % world_size == rank}
        if world_size > 1:
            progress = _read_json_or_none(self.progress_path)
            if progress is not None and progress.get("identity") == identity:
                self.written.update({int(i): shard for i, shard in progress["shards"].items()})
                manifest["d_in"] = manifest["d_in"] or progress.get("d_in")
        self.next_shard = rank
        while self.next_shard in self.written:
            self.next_shard += world_size
        self.identity = identity
        self.buffer: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.buffered = 0

    @property
    def progress_path(self) -> Path:
        return self.store_dir / f"progress_rank{self.rank}_of_{self.world_size}.json"

    @property
    def needed_from(self) -> int:
        """The first token of the stream this rank still has to store (max_tokens: none)."""
        return min(self.max_tokens, self.next_shard * self.shard_tokens + self.buffered)

    def wants(self, seen: int, n: int) -> bool:
        """Whether the batch of stream tokens [seen, seen + n) holds rows this rank stores."""
        return seen + n > self.needed_from and self.needed_from < self.max_tokens

    def add(self, acts: torch.Tensor, meta: dict[str, torch.Tensor], seen: int, take: int) -> int:
        """Store the rows of this batch (``seen``: tokens before it; its first ``take`` rows
        count) that fall in this rank's shards and are not on disk yet; commit each full shard.
        Returns the rows added."""
        if self.manifest["d_in"] is None:
            self.manifest["d_in"] = int(acts.shape[1])
        elif self.manifest["d_in"] != acts.shape[1]:
            raise StoreMismatchError(f"activation store {self.store_dir}: d_in is {self.manifest['d_in']}, "
                                     f"the model gives {acts.shape[1]}")
        added = 0
        while True:
            shard_end = (self.next_shard + 1) * self.shard_tokens
            lo, hi = max(seen, self.needed_from), min(seen + take, shard_end)
            if lo >= hi:
                return added
            for k, v in {"activations": acts, **meta}.items():
                self.buffer[k].append(v[lo - seen:hi - seen])
            self.buffered += hi - lo
            added += hi - lo
            if self.buffered == self.shard_tokens:
                self.commit()

    def commit(self) -> None:
        index = self.next_shard
        data = {k: torch.cat(v).cpu() for k, v in self.buffer.items()}
        shard = _write_shard(self.store_dir, index, data)
        self.written[index] = shard
        self.buffer.clear()
        self.buffered = 0
        self.next_shard += self.world_size
        if self.world_size == 1:
            self.manifest["shards"] = [self.written[i] for i in sorted(self.written)]
            self.manifest["token_count"] = sum(s["num_tokens"] for s in self.manifest["shards"])
            atomic_write_json(self.store_dir / MANIFEST, self.manifest)
        else:
            atomic_write_json(self.progress_path, {"identity": self.identity, "d_in": self.manifest["d_in"],
                                                   "shards": {str(i): s for i, s in self.written.items()}})
        if self.on_shard is not None:
            self.on_shard(index, self.manifest)

    def finish(self) -> ActivationStore:
        """Commit the last, partial shard and write the complete manifest (every rank's shards)."""
        if self.buffered:
            self.commit()
        written, d_in = self.written, self.manifest["d_in"]
        if self.world_size > 1:
            import torch.distributed as dist

            parts = [None] * self.world_size
            dist.all_gather_object(parts, (written, d_in))
            written = {i: shard for part, _ in parts for i, shard in part.items()}
            d_in = next((d for _, d in parts if d is not None), None)
        if self.rank == 0:
            shards = [written[i] for i in sorted(written)]
            if sorted(written) != list(range(len(shards))):
                raise RuntimeError(f"activation store {self.store_dir}: shards {sorted(written)} are not 0..n-1")
            token_count = sum(s["num_tokens"] for s in shards)
            self.manifest.update(shards=shards, token_count=token_count, d_in=d_in, complete=True,
                                 corpus_exhausted=token_count < self.max_tokens)
            atomic_write_json(self.store_dir / MANIFEST, self.manifest)
            for progress in self.store_dir.glob("progress_rank*_of_*.json"):
                progress.unlink()
        if self.world_size > 1:
            dist.barrier()
        return ActivationStore(self.store_dir)


def _process_group() -> tuple[int, int]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed=True needs an initialised torch.distributed process group (torchrun)")
    return dist.get_rank(), dist.get_world_size()


def _read_json_or_none(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def collect_to_store(model: nn.Module, tokenizer, corpus: Iterable[str], hook_point: str,
                     store_dir: str | os.PathLike, max_tokens: int, batch_size: int = 32, context_length: int = 128,
                     **kwargs) -> ActivationStore:
    """Tokenize `corpus`, run the model, and stream activations at `hook_point` into `store_dir`.

    Stops after max_tokens tokens (padding, and BOS with drop_bos, are not counted) or when the
    corpus ends. If `store_dir` already holds part of this same collection, it resumes; a store
    from another model, hook point or setting raises StoreMismatchError (overwrite=True replaces it).
    `on_shard(index, manifest)` is called after each shard is committed. Returns the ActivationStore.
    Keyword arguments are those of ``collect_to_stores``.
    """
    return collect_to_stores(model, tokenizer, corpus, {hook_point: store_dir}, max_tokens, batch_size,
                             context_length, **kwargs)[hook_point]


def collect_to_stores(model: nn.Module, tokenizer, corpus: Iterable[str], store_dirs: dict[str, str | os.PathLike],
                      max_tokens: int, batch_size: int = 32, context_length: int = 128,
                      *, shard_tokens: int = 1 << 16, dtype: torch.dtype | None = None, drop_bos: bool = False,
                      model_name: str | None = None, overwrite: bool = False,
                      on_shard: Callable[[int, dict], None] | None = None,
                      progress: bool = True, distributed: bool = False) -> dict[str, ActivationStore]:
    """``collect_to_store`` for several hook points from one forward pass per batch:
    ``store_dirs`` maps each hook point to its own store directory (each one is a complete
    store, the same as collecting that hook point alone). The forward stops after the last
    hooked module. Each store resumes on its own: the model runs from the first token any of
    them is missing.

    ``distributed=True``: every rank of the torch.distributed process group calls this with the
    same arguments (the directories on a file system they share); rank r runs the model only
    for the shards s with s % world_size == r, so the ranks split the work and the stores equal
    a one-process collection. A run stopped under W ranks resumes under W ranks."""
    from fastsae.corpus import iter_token_batches

    if not store_dirs:
        raise ValueError("store_dirs is empty: give at least one {hook_point: directory}")
    for hook_point in store_dirs:
        resolve_hook_point(model, hook_point)  # a bad name fails before anything touches the disk
    if max_tokens <= 0 or shard_tokens <= 0:
        raise ValueError(f"max_tokens and shard_tokens must be positive, got {max_tokens}, {shard_tokens}")
    dirs = {hp: Path(d) for hp, d in store_dirs.items()}
    if len(set(dirs.values())) != len(dirs):
        raise ValueError("store_dirs: every hook point needs a directory of its own")
    dtype = dtype or next(model.parameters()).dtype
    fingerprint = model_fingerprint(model)
    model_name = model_name or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
    rank, world_size = _process_group() if distributed else (0, 1)
    identities = {hp: {
        "model_fingerprint": fingerprint, "hook_point": hp, "dtype": str(dtype).removeprefix("torch."),
        "corpus": {"name": getattr(corpus, "name", type(corpus).__name__),
                   "fingerprint": getattr(corpus, "fingerprint", None)},
        "context_length": context_length, "batch_size": batch_size, "shard_tokens": shard_tokens, "drop_bos": drop_bos,
    } for hp in dirs}
    for hook_point, store_dir in dirs.items():  # every rank checks (and fails) alike; rank 0 alone cleans
        if rank == 0:
            store_dir.mkdir(parents=True, exist_ok=True)
        _existing_manifest(store_dir, identities[hook_point], overwrite, clean=rank == 0)
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()  # no rank writes before rank 0 has cleaned up
    writers, stores = {}, {}
    for hook_point, store_dir in dirs.items():
        manifest = _read_manifest(store_dir)
        if manifest is not None and (manifest["token_count"] >= max_tokens or manifest["corpus_exhausted"]):
            # Holds at least what was asked (or all the corpus has): a store is never trimmed in place.
            if not manifest["complete"] and rank == 0:
                manifest["complete"] = True
                atomic_write_json(store_dir / MANIFEST, manifest)
            stores[hook_point] = store_dir
        else:
            writers[hook_point] = _StoreWriter(store_dir, identities[hook_point], manifest, model_name, max_tokens,
                                               shard_tokens, on_shard, rank, world_size)
    if world_size > 1:
        dist.barrier()
    stores = {hp: ActivationStore(d) for hp, d in stores.items()}
    if not writers:
        return stores

    done = min(w.needed_from for w in writers.values())  # the model runs from here
    seen = 0  # tokens of the token stream passed so far
    # Activations stay on the model's device until a shard is full: one device-to-host copy (and
    # one synchronisation) per shard, not per batch.
    collector = ActivationCollector(model, list(writers), max_activations=2**62, device=model_device(model),
                                    dtype=dtype, drop_bos=drop_bos)
    what = next(iter(writers)) if len(writers) == 1 else f"{len(writers)} hook points"
    bar = progress_bar(total=max_tokens, initial=done, unit="tok", desc=f"collect {what}",
                       disable=not progress or rank != 0)
    with collector, bar:
        for batch in iter_token_batches(tokenizer, corpus, context_length, batch_size):
            if all(w.needed_from >= max_tokens for w in writers.values()):
                break  # everything this rank stores is on disk
            keep = kept_tokens(batch.attention_mask, batch.positions, drop_bos)
            n = int(keep.sum())
            if not any(w.wants(seen, n) for w in writers.values()):  # on disk already, or another rank's
                seen += n
                continue
            run_collector_batch(collector, model, batch)
            take = min(n, max_tokens - seen)
            added = 0
            for hook_point, writer in writers.items():
                acts, meta = collector.pop(hook_point)
                if acts is None:
                    raise RuntimeError(f"hook point {hook_point!r} did not run during the forward pass: "
                                       "the model never calls that module")
                meta["token_index"] = torch.arange(seen, seen + n)
                added = max(added, writer.add(acts, meta, seen, take))
            bar.update(added * world_size)
            seen += n
    return {**stores, **{hp: w.finish() for hp, w in writers.items()}}
