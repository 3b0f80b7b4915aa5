"""A sparse cache of an SAE's latents over a token corpus, built in one pass and reused by
every feature view (max-activating contexts, quantile samples, density, co-occurrence).

Per token it keeps the non-zero latents in CSR form (values, indices, row_offsets) plus the
token id, document id and position, in corpus order, so a token's context is its neighbouring
rows. A column (latent-major) index is built once on first use, so each feature view costs
O(number of tokens the feature fires on). Saved as one safetensors file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors.torch import load_file

from fastsae.files import atomic_save_tensors
from fastsae.models import BaseSAE
from fastsae.progress import progress_bar

_FIELDS = ("values", "indices", "row_offsets", "token_ids", "doc_ids", "positions")


@dataclass
class LatentCache:
    values: torch.Tensor  # [nnz] float32, non-zero activations
    indices: torch.Tensor  # [nnz] int64 latent ids
    row_offsets: torch.Tensor  # [N + 1] int64
    token_ids: torch.Tensor  # [N] int64, -1 when unknown
    doc_ids: torch.Tensor  # [N] int64, -1 when unknown
    positions: torch.Tensor  # [N] int64, position in its sequence
    d_sae: int

    def __post_init__(self):
        self._columns = None

    @property
    def num_tokens(self) -> int:
        return self.row_offsets.numel() - 1

    # ------------------------------------------------------------------ building

    @classmethod
    def from_chunks(cls, chunks: Iterable[tuple[torch.Tensor, dict]], sae: BaseSAE,
                    batch_size: int = 4096) -> "LatentCache":
        """Encode (activations [n, d_in], metadata) chunks in order; metadata may hold token_ids,
        doc_ids, positions ([n] each; missing ones become -1 / running position)."""
        parts = {f: [] for f in _FIELDS}
        rows = 0
        was_training = sae.training
        sae.eval()
        try:
            for acts, meta in chunks:
                for start in range(0, acts.shape[0], batch_size):
                    x = acts[start:start + batch_size]
                    sub = {k: v[start:start + batch_size] for k, v in meta.items() if v is not None}
                    rows = cls._append(parts, sae, x, sub, rows)
        finally:
            sae.train(was_training)
        if not parts["row_offsets"]:
            raise ValueError("no activations to cache")
        parts["row_offsets"].insert(0, torch.zeros(1, dtype=torch.long))
        return cls(**{f: torch.cat(parts[f]) for f in _FIELDS}, d_sae=sae.d_sae)

    @staticmethod
    @torch.no_grad()
    def _append(parts: dict, sae: BaseSAE, x: torch.Tensor, meta: dict, rows: int) -> int:
        n = x.shape[0]
        code = sae.encode_sparse(sae.input_part(x).to(device=sae.device, dtype=sae.dtype))
        values, indices = (t.reshape(-1).cpu() for t in code.flat())
        row = code.row_ids().cpu()
        keep = values != 0  # TopK codes pad with zeros; the cache stores only real activations
        counts = torch.bincount(row[keep], minlength=n)
        base = parts["row_offsets"][-1][-1] if parts["row_offsets"] else torch.tensor(0)
        parts["values"].append(values[keep].float())
        parts["indices"].append(indices[keep].long())
        parts["row_offsets"].append(base + counts.cumsum(0))
        parts["token_ids"].append(meta.get("token_ids", torch.full((n,), -1)).long().cpu())
        parts["doc_ids"].append(meta.get("doc_ids", torch.full((n,), -1)).long().cpu())
        parts["positions"].append(meta.get("positions", torch.arange(rows, rows + n)).long().cpu())
        return rows + n

    @classmethod
    def from_activations(cls, sae: BaseSAE, activations: torch.Tensor, token_ids=None, doc_ids=None,
                         positions=None, batch_size: int = 4096) -> "LatentCache":
        meta = {"token_ids": token_ids, "doc_ids": doc_ids, "positions": positions}
        return cls.from_chunks([(activations, {k: v for k, v in meta.items() if v is not None})], sae, batch_size)

    @classmethod
    def from_store(cls, sae: BaseSAE, store, batch_size: int = 4096) -> "LatentCache":
        """From a fastsae.store.ActivationStore, shard by shard in store order."""
        if store.d_in != sae.d_in:
            raise ValueError(f"store has d_in={store.d_in}, the SAE expects d_in={sae.d_in}")

        def chunks():
            for i in range(len(store.shards)):
                shard = store.read_shard(i)
                yield shard.pop("activations"), shard
        return cls.from_chunks(chunks(), sae, batch_size)

    @classmethod
    def from_model(cls, sae: BaseSAE, model, tokenizer, texts: Iterable[str], hook_point: str | None = None,
                   max_tokens: int = 100_000, context_length: int = 128, batch_size: int = 16) -> "LatentCache":
        """Run the model over ``texts`` and encode the activations at the SAE's hook point."""
        return cls.from_chunks(iter_activations(model, tokenizer, texts, hook_point or sae.config.hook_point,
                                                max_tokens, context_length, batch_size), sae)  # (the input)

    # ------------------------------------------------------------------ files

    def save(self, path: str | Path) -> Path:
        return atomic_save_tensors(path, {f: getattr(self, f) for f in _FIELDS},
                                   metadata={"format": "fastsae.latent_cache", "d_sae": str(self.d_sae)})

    @classmethod
    def load(cls, path: str | Path) -> "LatentCache":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "fastsae.latent_cache":
            raise ValueError(f"{path} is not a fastsae latent cache")
        tensors = load_file(str(path))
        return cls(**{f: tensors[f] for f in _FIELDS}, d_sae=int(meta["d_sae"]))

    # ------------------------------------------------------------------ feature views

    def _column_index(self):
        """Latent-major view: for latent i, rows[offsets[i]:offsets[i+1]] (ascending) and values."""
        if self._columns is None:
            order = torch.sort(self.indices, stable=True).indices
            rows = torch.repeat_interleave(torch.arange(self.num_tokens), self.row_offsets.diff())
            offsets = torch.zeros(self.d_sae + 1, dtype=torch.long)
            offsets[1:] = torch.bincount(self.indices, minlength=self.d_sae).cumsum(0)
            self._columns = (rows[order], self.values[order], offsets)
        return self._columns

    def _check(self, feature: int) -> None:
        if not 0 <= feature < self.d_sae:
            raise ValueError(f"feature must be in [0, {self.d_sae}), got {feature}")

    def feature(self, feature: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, values) where the latent is non-zero, rows ascending."""
        self._check(feature)
        rows, values, offsets = self._column_index()
        lo, hi = offsets[feature].item(), offsets[feature + 1].item()
        return rows[lo:hi], values[lo:hi]

    def counts(self) -> torch.Tensor:
        """How many tokens each latent fires on [d_sae]."""
        return torch.bincount(self.indices, minlength=self.d_sae)

    def density(self) -> torch.Tensor:
        """Firing frequency of each latent [d_sae]."""
        return self.counts().double() / max(self.num_tokens, 1)

    def max_activations(self) -> torch.Tensor:
        out = torch.zeros(self.d_sae)
        return out.scatter_reduce(0, self.indices, self.values, reduce="amax")

    def top_rows(self, feature: int, n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        """The n rows with the largest activation of the latent (descending)."""
        rows, values = self.feature(feature)
        top = torch.topk(values, min(n, values.numel()))
        return rows[top.indices], top.values

    def quantile_rows(self, feature: int, n_bins: int = 4, per_bin: int = 3,
                      seed: int = 0) -> list[tuple[float, float, torch.Tensor, torch.Tensor]]:
        """Random samples from each quantile band of the latent's non-zero activations:
        [(low, high, rows, values)], lowest band first."""
        rows, values = self.feature(feature)
        if values.numel() == 0:
            return []
        order = torch.sort(values).indices
        gen = torch.Generator().manual_seed(seed)
        bands = []
        for chunk in torch.tensor_split(order, min(n_bins, values.numel())):
            pick = chunk[torch.randperm(chunk.numel(), generator=gen)[:per_bin]]
            pick = pick[torch.sort(values[pick], descending=True).indices]
            bands.append((values[chunk[0]].item(), values[chunk[-1]].item(), rows[pick], values[pick]))
        return bands

    def cooccurrence(self, feature: int, n: int = 10, min_together: int = 3) -> list[tuple[int, int, float, float]]:
        """Latents that fire with this one far more often than chance, by lift:
        [(latent, tokens together, fraction of this latent's tokens, lift)], where lift =
        P(other fires | this fires) / P(other fires). Ranking by raw counts would list the same
        dense latents on every page; latents seen together fewer than ``min_together`` times
        are left out (their lift is noise)."""
        rows, _ = self.feature(feature)
        if rows.numel() == 0:
            return []
        starts, ends = self.row_offsets[rows], self.row_offsets[rows + 1]
        lengths = ends - starts
        flat = torch.repeat_interleave(starts - lengths.cumsum(0) + lengths, lengths) + torch.arange(int(lengths.sum()))
        together = torch.bincount(self.indices[flat], minlength=self.d_sae)
        together[feature] = 0
        fraction = together.double() / rows.numel()
        lift = torch.where(together >= min_together, fraction / self.density().double().clamp_min(1e-12), 0.0)
        top = torch.topk(lift, min(n, self.d_sae))
        return [(int(i), int(together[i]), fraction[i].item(), v.item()) for i, v in zip(top.indices, top.values)
                if v > 0]

    def values_at(self, feature: int, rows: torch.Tensor) -> torch.Tensor:
        """The latent's activation on each of ``rows`` (0 where it is silent)."""
        col_rows, col_values = self.feature(feature)
        if col_rows.numel() == 0:
            return torch.zeros(rows.numel())
        pos = torch.searchsorted(col_rows, rows).clamp_max(col_rows.numel() - 1)
        return torch.where(col_rows[pos] == rows, col_values[pos], torch.zeros(()))

    def context(self, row: int, before: int = 8, after: int = 4) -> torch.Tensor:
        """Rows of the tokens around ``row`` in the same sequence (same document, consecutive
        positions), in order."""
        def same(a: int, b: int) -> bool:
            return (self.doc_ids[a] == self.doc_ids[b] and self.positions[b] == self.positions[a] + 1).item()

        lo = row
        while lo > 0 and row - lo < before and same(lo - 1, lo):
            lo -= 1
        hi = row
        while hi + 1 < self.num_tokens and hi - row < after and same(hi, hi + 1):
            hi += 1
        return torch.arange(lo, hi + 1)


def iter_activations(model, tokenizer, texts: Iterable[str], hook_point: str | tuple[str, ...], max_tokens: int,
                     context_length: int = 128, batch_size: int = 16,
                     progress: bool = False, skip_tokens: int = 0) -> Iterator[tuple[torch.Tensor, dict]]:
    """(activations [n, d], {"token_ids", "doc_ids", "positions"}) per batch of tokenized text,
    until ``max_tokens`` real tokens (padding dropped), after the first ``skip_tokens`` tokens
    (see ``iter_token_batches``), which the model does not run on. Several hook points (a
    transcoder's input and output) give their activations side by side, [n, d_1 + d_2 ...]."""
    from fastsae.corpus import iter_token_batches
    from fastsae.hooks import ActivationCollector, run_collector_batch

    hook_points = [hook_point] if isinstance(hook_point, str) else list(hook_point)
    collector = ActivationCollector(model, hook_points, max_activations=max_tokens, dtype=torch.float32)
    with collector, progress_bar(total=max_tokens, unit="tok", disable=not progress, desc="activations") as bar:
        for batch in iter_token_batches(tokenizer, texts, context_length, batch_size, skip_tokens=skip_tokens):
            run_collector_batch(collector, model, batch)
            acts, meta = collector.pop_joined(hook_points)
            if acts is not None and acts.shape[0]:
                bar.update(acts.shape[0])
                yield acts, meta
            if collector.is_full:
                break


def collect_activations(model, tokenizer, texts: Iterable[str], hook_point: str | tuple[str, ...], max_tokens: int,
                        context_length: int = 128, batch_size: int = 16,
                        progress: bool = False, skip_tokens: int = 0) -> tuple[torch.Tensor, dict]:
    """All of ``iter_activations`` concatenated: (activations [N, d], metadata {name: [N]})."""
    chunks = list(iter_activations(model, tokenizer, texts, hook_point, max_tokens, context_length, batch_size,
                                   progress, skip_tokens))
    if not chunks:
        after = f" after the first {skip_tokens} tokens" if skip_tokens else ""
        raise ValueError(f"the texts produced no token{after}")
    acts = torch.cat([a for a, _ in chunks])
    meta = {k: torch.cat([m[k] for _, m in chunks]) for k in chunks[0][1]}
    return acts, meta
