"""What the runtime records while a model runs: per-token top features and max-activating examples.

Everything recorded stays on the activations' device and nothing here reads a tensor back to
the host while the model runs: a hook appends its activation rows to a list and notes shapes
(host ints it already knows). The rows are encoded together once ``encode_rows`` of them
wait, when the trace is read, and when tracking ends (``HookTrace.flush``): a decode step's
single row would read the whole encoder for one token, where a batch reads it once for all
of its rows. The max-activating examples are merged from the kept features when first asked
for (with each flush where only the examples are kept); printouts happen on demand. The only
host reads are in the query methods (``table``, ``html``, ``max_activating``), which run after
generation.

Positions: a forward whose activation has T > 1 tokens starts a new sequence at position 0 (a
prefill, or a full-sequence forward); a forward with T == 1 continues it (a KV-cache decode
step) when it has the previous forward's batch size, or when the previous forward had one row:
nanochat's Engine prefills a prompt once and decodes ``num_samples`` rows from it. Chunked
prefill is not recognised: call ``Trace.new_sequence()`` between prompts fed one token at a time.
"""
from __future__ import annotations

import html
from dataclasses import dataclass

import torch

from fastsae.selection import group_then_descending_key

# Columns of the per-row "where" record: the forward call (step), the batch row, the position.
WHERE_FIELDS = ("step", "batch", "position")
# The max-activating record packs them into one int64 (a third of the memory traffic):
# step < 2^23, batch < 2^16, position < 2^24.
_BATCH_SHIFT, _STEP_SHIFT = 24, 40

# Activation rows a hook trace holds before encoding them in one call. A TopK SAE at d_in 1280,
# d_sae 20480, k 32 (one thread, cache flushed before each call, 2-core AMD EPYC) took 3.8 ms to
# encode one row, 13.9 ms for 32 rows and 24 ms for 64: 0.38 ms a row. 64 rows of d_in 1280
# hold 320 KiB.
ENCODE_ROWS = 64
# Rows merged into the max-activating examples per update: its temporaries take about 80
# bytes per entry (row x tracked latent) and kept example (1024 rows of 32 latents, 10
# examples: a 31 MiB peak, measured).
MERGE_ROWS = 1024


def pack_where(where: torch.Tensor) -> torch.Tensor:
    """[..., 3] (step, batch, position) -> [...] int64."""
    return (where[..., 0] << _STEP_SHIFT) | (where[..., 1] << _BATCH_SHIFT) | where[..., 2]


def unpack_where(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_where."""
    mask = (1 << _BATCH_SHIFT) - 1
    return torch.stack([packed >> _STEP_SHIFT, (packed >> _BATCH_SHIFT) & 0xFFFF, packed & mask], -1)


@dataclass
class _Chunk:
    step: int
    seq: int
    batch: int
    tokens: int                                # T
    offset: int                                # position of the chunk's first token
    activations: torch.Tensor | None = None    # [R, d_in] rows of R = B*T tokens, until encoded
    values: torch.Tensor | None = None         # [R, m] top feature values, once encoded
    indices: torch.Tensor | None = None        # [R, m] their latent indices

    @property
    def rows(self) -> int:
        return self.batch * self.tokens


def _chunk_where(chunks: list[_Chunk], device: torch.device) -> torch.Tensor:
    """[R, 3] int64 (step, batch, position) per row of the chunks, in order.

    Built from host ints with a fixed number of small CPU ops whatever the number of chunks,
    then copied to the device once (from pinned memory on a GPU, so without a synchronisation).
    """
    meta = torch.tensor([[c.step, c.rows, c.tokens, c.offset] for c in chunks], dtype=torch.long)
    step, rows, tokens, offset = meta.unbind(1)
    chunk = torch.repeat_interleave(torch.arange(len(chunks)), rows)
    local = torch.arange(sum(c.rows for c in chunks)) - (torch.cumsum(rows, 0) - rows)[chunk]
    t = tokens[chunk]
    where = torch.stack([step[chunk], local // t, offset[chunk] + local % t], 1)
    if device.type == "cuda":
        return where.pin_memory().to(device, non_blocking=True)
    return where.to(device)


class MaxExamples:
    """Top-n activations of every feature with their (step, batch, position), kept on the device.

    ``update`` merges a batch of sparse entries without a host read and without a d_sae-wide
    pass: entries are grouped by feature with two stable sorts, each entry's feature gets its
    chunk candidates (the group's first n) merged with its current record by one top-k, and
    rows are written back with index_put. Entries of the same feature compute identical rows,
    so duplicate writes agree.
    """

    def __init__(self, d_sae: int, n: int, device: torch.device):
        if n < 1:
            raise ValueError(f"max_examples must be >= 1, got {n}")
        self.d_sae, self.n = d_sae, n
        self.values = torch.full((d_sae, n), float("-inf"), device=device)
        self.where = torch.full((d_sae, n), -1, dtype=torch.long, device=device)  # packed

    def update(self, values: torch.Tensor, features: torch.Tensor, where: torch.Tensor) -> None:
        """Merge entries: values[E], features[E] (latent ids), where[E] (packed, see pack_where)."""
        if values.numel() == 0:
            return
        n = self.n
        v = values.float()
        v = torch.where(v > 0, v, 0.0)  # +0.0 for zeros, -0.0 and NaN: they must sort last
        # One sort groups entries by feature, strongest first.
        perm = torch.argsort(group_then_descending_key(features, v))
        f, v, w = features[perm], v[perm], where[perm]
        v = torch.where(v > 0, v, float("-inf"))  # a zero is no activation
        # scatter_add, not bincount: bincount reads the maximum back to the host on CUDA.
        counts = torch.zeros(self.d_sae, dtype=torch.long, device=f.device).scatter_add_(0, f, torch.ones_like(f))
        first = (torch.cumsum(counts, 0) - counts)[f]
        slot = torch.arange(n, device=f.device)
        take = (first.unsqueeze(1) + slot).clamp(max=v.numel() - 1)
        cand_v = torch.where(slot < counts[f].unsqueeze(1), v[take], float("-inf"))  # the group's first n
        top_v, pick = torch.cat([self.values[f], cand_v], 1).topk(n, dim=1)
        self.values[f] = top_v
        self.where[f] = torch.cat([self.where[f], w[take]], 1).gather(1, pick)

    def top(self, feature: int) -> list[dict]:
        """The recorded examples of one feature, strongest first (a host read)."""
        if not 0 <= feature < self.d_sae:
            raise IndexError(f"feature {feature} out of range [0, d_sae={self.d_sae})")
        values, where = self.values[feature].cpu(), self.where[feature].cpu()
        keep = torch.isfinite(values)
        return [{"value": float(v), **dict(zip(WHERE_FIELDS, w))}
                for v, w in zip(values[keep], unpack_where(where[keep]).tolist())]


class HookTrace:
    """Per-token top features at one hook point across every forward while tracking.

    ``encode`` maps activation rows [R, d_in] to their top features (values [R, m], latent ids
    [R, m], strongest first); ``record`` keeps rows until ``encode_rows`` of them wait, then
    ``flush`` encodes them in one call. With ``keep_rows`` the max-activating examples are
    merged from the kept features when first asked for (no merge while the model runs);
    without, each flush merges its rows, so that only the examples are kept."""

    def __init__(self, hook_point: str, d_sae: int, device: torch.device, encode, max_examples: int = 10,
                 keep_rows: bool = True, encode_rows: int = ENCODE_ROWS):
        self.hook_point, self.d_sae = hook_point, d_sae
        self.encode = encode
        self.keep_rows = keep_rows
        self.encode_rows = encode_rows
        self.examples = MaxExamples(d_sae, max_examples, device)
        self._chunks: list[_Chunk] = []
        self._pending: list[_Chunk] = []  # not yet encoded
        self._pending_rows = 0
        self._merged = 0                  # kept chunks merged into the examples
        self._rows: dict | None = None     # concatenation cache
        self._seq, self._next_pos, self._last_batch = -1, 0, None

    def new_sequence(self) -> None:
        self._last_batch = None

    def record(self, activations: torch.Tensor, batch: int, tokens: int, step: int) -> None:
        """Note one forward's [B*T, d_in] activation rows (device tensors; no host read)."""
        continues = tokens == 1 and self._last_batch in (batch, 1)
        if not continues:
            self._seq, self._next_pos = self._seq + 1, 0
        chunk = _Chunk(step, self._seq, batch, tokens, self._next_pos, activations)
        self._next_pos += tokens
        self._last_batch = batch
        if self.keep_rows:
            self._chunks.append(chunk)
            self._rows = None
        self._pending.append(chunk)
        self._pending_rows += chunk.rows
        if self._pending_rows >= self.encode_rows:
            self.flush()
        else:  # kept past this call: the model may write over its own tensor before the flush
            chunk.activations = activations.clone()

    def flush(self) -> None:
        """Encode the pending activation rows in one call (and merge them into the max-activating
        examples where rows are not kept)."""
        if not self._pending:
            return
        chunks, self._pending, self._pending_rows = self._pending, [], 0
        rows = [c.activations for c in chunks]
        values, indices = self.encode(rows[0] if len(rows) == 1 else torch.cat(rows))
        sizes = [c.rows for c in chunks]
        for c, v, i in zip(chunks, values.split(sizes), indices.split(sizes)):
            c.values, c.indices, c.activations = v, i, None
        if not self.keep_rows:
            self._merge(chunks)

    def _merge(self, chunks: list[_Chunk]) -> None:
        """Merge encoded chunks into the max-activating examples, MERGE_ROWS rows at a time."""
        start = 0
        while start < len(chunks):
            end, rows = start, 0
            while end < len(chunks) and (end == start or rows + chunks[end].rows <= MERGE_ROWS):
                rows += chunks[end].rows
                end += 1
            part = chunks[start:end]
            values = torch.cat([c.values for c in part])
            indices = torch.cat([c.indices for c in part])
            where = pack_where(_chunk_where(part, values.device))  # one per token, shared by its m entries
            where = where.unsqueeze(1).expand(-1, values.shape[1]).reshape(-1)
            self.examples.update(values.reshape(-1), indices.reshape(-1), where)
            start = end

    @property
    def num_rows(self) -> int:
        return sum(c.rows for c in self._chunks)

    def rows(self) -> dict[str, torch.Tensor]:
        """Every recorded token: values/indices [N, m] and step/seq/batch/position [N] (device tensors)."""
        if not self.keep_rows:
            raise RuntimeError("this trace was made with keep_rows=False: only max-activating examples are kept")
        self.flush()
        if self._rows is None:
            if not self._chunks:
                raise RuntimeError(f"nothing recorded at {self.hook_point!r} yet: run the model while tracking")
            where = _chunk_where(self._chunks, self._chunks[0].values.device)
            seq = torch.cat([torch.full((c.rows,), c.seq, dtype=torch.long, device=where.device)
                             for c in self._chunks])
            self._rows = {"values": torch.cat([c.values for c in self._chunks]),
                          "indices": torch.cat([c.indices for c in self._chunks]),
                          "step": where[:, 0], "seq": seq, "batch": where[:, 1], "position": where[:, 2]}
        return self._rows

    def dense(self) -> torch.Tensor:
        """[N, d_sae] features of every recorded token (zero where not recorded)."""
        rows = self.rows()
        out = torch.zeros(rows["values"].shape[0], self.d_sae, dtype=rows["values"].dtype,
                          device=rows["values"].device)
        return out.scatter_(1, rows["indices"], rows["values"])

    def max_activating(self, feature: int) -> list[dict]:
        self.flush()
        if self.keep_rows:
            self._merge(self._chunks[self._merged:])
            self._merged = len(self._chunks)
        return self.examples.top(feature)


class Trace:
    """Everything tracked during one ``interpretation_enabled()`` session, per hook point."""

    def __init__(self):
        self.hooks: dict[str, HookTrace] = {}
        self.tokens: list[torch.Tensor | None] = []  # input ids of each forward (step), when seen
        self.step = -1

    def start_step(self, input_ids: torch.Tensor | None) -> None:
        self.step += 1
        self.tokens.append(None if input_ids is None else input_ids.detach())

    def new_sequence(self) -> None:
        for h in self.hooks.values():
            h.new_sequence()

    def flush(self) -> None:
        """Encode every hook point's pending activation rows (reading the trace does this too)."""
        for h in self.hooks.values():
            h.flush()

    def __getitem__(self, hook_point: str) -> HookTrace:
        return self.hooks[hook_point]

    def max_activating(self, hook_point: str, feature: int) -> list[dict]:
        return self._hook(hook_point).max_activating(feature)

    def _hook(self, hook_point: str | None) -> HookTrace:
        if hook_point is None:
            if not self.hooks:
                raise RuntimeError("nothing tracked: no hook points")
            hook_point = next(iter(self.hooks))
        if hook_point not in self.hooks:
            raise KeyError(f"no trace for hook point {hook_point!r}; tracked: {list(self.hooks)}")
        return self.hooks[hook_point]

    def _token(self, step: int, batch: int, position: int, offset: int) -> int | None:
        ids = self.tokens[step] if 0 <= step < len(self.tokens) else None
        if ids is None or ids.dim() != 2:
            return None
        return int(ids[batch, position - offset]) if position - offset < ids.shape[1] else None

    def records(self, hook_point: str | None = None, top: int = 5) -> list[dict]:
        """One dict per recorded token: seq, step, batch, position, token id (or None), features
        [(latent, value), ...] strongest first, zeros left out (host read)."""
        h = self._hook(hook_point)
        rows = {k: v.cpu() for k, v in h.rows().items()}
        order = torch.argsort(rows["values"].float(), dim=1, descending=True)[:, :top]
        values, indices = rows["values"].gather(1, order), rows["indices"].gather(1, order)
        offsets = {c.step: c.offset for c in h._chunks}
        out = []
        for n in range(values.shape[0]):
            step, batch, pos = int(rows["step"][n]), int(rows["batch"][n]), int(rows["position"][n])
            feats = [(int(i), float(v)) for i, v in zip(indices[n], values[n]) if v > 0]
            out.append({"seq": int(rows["seq"][n]), "step": step, "batch": batch, "position": pos,
                        "token": self._token(step, batch, pos, offsets[step]), "features": feats})
        return out

    def table(self, tokenizer=None, hook_point: str | None = None, top: int = 5) -> str:
        """A plain-text table: one line per token with its strongest features."""
        lines = [f"{'seq':>3} {'step':>4} {'b':>2} {'pos':>4}  {'token':<16} top features (latent:value)"]
        for r in self.records(hook_point, top):
            feats = " ".join(f"{i}:{v:.3g}" for i, v in r["features"])
            lines.append(f"{r['seq']:>3} {r['step']:>4} {r['batch']:>2} {r['position']:>4}  "
                         f"{_token_text(r['token'], tokenizer)[:16]!r:<16} {feats}")
        return "\n".join(lines)

    def html(self, tokenizer=None, hook_point: str | None = None, top: int = 5) -> str:
        """The same table as an HTML string; every token string is escaped."""
        head = "<tr><th>seq</th><th>step</th><th>batch</th><th>pos</th><th>token</th><th>top features</th></tr>"
        body = []
        for r in self.records(hook_point, top):
            feats = ", ".join(f"{i}: {v:.3g}" for i, v in r["features"])
            token = html.escape(_token_text(r["token"], tokenizer))
            body.append(f"<tr><td>{r['seq']}</td><td>{r['step']}</td><td>{r['batch']}</td><td>{r['position']}</td>"
                        f"<td><code>{token}</code></td><td>{feats}</td></tr>")
        name = html.escape(self._hook(hook_point).hook_point)
        return f"<table class=\"fastsae-trace\"><caption>{name}</caption>{head}{''.join(body)}</table>"


def _token_text(token: int | None, tokenizer) -> str:
    if token is None:
        return "?"
    if tokenizer is None:
        return str(token)
    return tokenizer.decode([token])
