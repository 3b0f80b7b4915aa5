"""Hook points on real models, and the activation collector built on them.

A hook point is a name for a place in a model where activations are read (or, for the runtime,
edited). Two kinds of name resolve:

- canonical block names `blocks.{i}.hook_{kind}`, with kind one of resid_pre, resid_post,
  attn_out, mlp_in, mlp_out, mlp_hidden (mlp_in: the MLP's input, after the block's norm; a
  transcoder's usual input, with mlp_out its target). They name nanochat modules (`model.transformer.h[i]` and its
  `.attn`, `.mlp`, `.mlp.c_fc`) and, through a small map, the same places in Hugging Face
  GPT-2 (`transformer.h`), Llama-style (`model.layers`) and BERT (`encoder.layer`) models;
- any module path, dotted with integer indexes (`model.layers.3`, `encoder.layer.2.output`).

`resolve_hook_point(model, name)` returns `(module, kind)`: kind "output" means read the
module's output with a forward hook, "pre" means read its first input with a forward pre-hook.
"""
from __future__ import annotations

import copy
import difflib
import os
import re
from typing import Any, Iterable, Mapping, NamedTuple

import torch
from torch import nn

from fastsae.files import atomic_save_tensors
from fastsae.progress import progress_bar

__all__ = [
    "HOOK_KINDS",
    "ActivationCollector",
    "TokenBatch",
    "add_hook",
    "collect_activations_from_dataloader",
    "find_blocks",
    "forward_tokens",
    "hook_point_map",
    "hook_width",
    "list_hook_points",
    "model_device",
    "resolve_hook_point",
]

HOOK_KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_in", "mlp_out", "mlp_hidden")

# Where a family keeps its list of transformer blocks, tried in order.
_BLOCK_LISTS = ("transformer.h", "model.layers", "encoder.layer", "bert.encoder.layer",
                "model.decoder.layers", "gpt_neox.layers", "layers")

# Sub-module (path inside a block, hook kind) per canonical kind, first match wins.
# nanochat and HF GPT-2 share .attn/.mlp/.mlp.c_fc; Llama has .self_attn and a gated MLP whose
# hidden layer is the input of down_proj; BERT is post-LN, so its attention and MLP outputs
# are the dense projections before the residual add and LayerNorm.
_BLOCK_PARTS: dict[str, tuple[tuple[str, str], ...]] = {
    "resid_pre": (("", "pre"),),
    "resid_post": (("", "output"),),
    "attn_out": (("attn", "output"), ("self_attn", "output"), ("attention.output.dense", "output")),
    "mlp_in": (("mlp", "pre"), ("intermediate", "pre")),
    "mlp_out": (("mlp", "output"), ("output.dense", "output")),
    "mlp_hidden": (("mlp.c_fc", "output"), ("mlp.down_proj", "pre"), ("intermediate", "output")),
}

_CANONICAL = re.compile(r"^blocks\.(-?\d+)\.hook_(\w+)$")


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    if not path:
        return root
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The (path, ModuleList) of the model's transformer blocks, or None if no known family matches."""
    for path in _BLOCK_LISTS:
        blocks = _submodule(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return path, blocks
    return None


def hook_point_map(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Canonical hook point name -> (module path, kind) for every block of the model."""
    found = find_blocks(model)
    if found is None:
        return {}
    blocks_path, blocks = found
    mapping = {}
    for kind in HOOK_KINDS:
        for sub, hook_kind in _BLOCK_PARTS[kind]:
            if _submodule(blocks[0], sub) is not None:
                for i in range(len(blocks)):
                    mapping[f"blocks.{i}.hook_{kind}"] = (f"{blocks_path}.{i}" + (f".{sub}" if sub else ""), hook_kind)
                break
    return dict(sorted(mapping.items(), key=lambda kv: (int(kv[0].split(".")[1]), kv[0])))


def list_hook_points(model: nn.Module) -> list[str]:
    """Every valid hook point: canonical block names first, then every module path."""
    return list(hook_point_map(model)) + [name for name, _ in model.named_modules() if name]


def _unknown(model: nn.Module, name: str) -> ValueError:
    close = difflib.get_close_matches(name, list_hook_points(model), n=5, cutoff=0.5)
    hint = f"; close valid names: {', '.join(close)}" if close else ""
    return ValueError(f"unknown hook point {name!r} for {type(model).__name__}{hint} (see list_hook_points(model))")


def resolve_hook_point(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module a hook point names and how to read it: (module, "output" | "pre").

    Raises ValueError for an unknown name (listing close valid ones) or a block index out of range.
    """
    match = _CANONICAL.match(name)
    if match:
        layer, kind = int(match.group(1)), match.group(2)
        if kind not in HOOK_KINDS:
            raise _unknown(model, name)
        found = find_blocks(model)
        if found is None:
            raise ValueError(f"hook point {name!r}: {type(model).__name__} has no known block list "
                             f"(tried {', '.join(_BLOCK_LISTS)}); use a module path instead")
        if not 0 <= layer < len(found[1]):
            raise ValueError(f"hook point {name!r}: layer {layer} out of range, model has {len(found[1])} "
                             f"blocks (valid layers 0..{len(found[1]) - 1})")
        mapping = hook_point_map(model)
        if name not in mapping:
            raise ValueError(f"hook point {name!r}: this model's blocks have no {kind} module")
        path, hook_kind = mapping[name]
        return model.get_submodule(path), hook_kind
    module = _submodule(model, name)
    if module is None or module is model:
        raise _unknown(model, name)
    return module, "output"


def _split(value: Any):
    """(activation tensor, rebuild) for a module output or input: a Tensor, a tuple/list whose
    first element holds it (Hugging Face blocks return (hidden, ...)), or a model output with
    ``last_hidden_state``. ``rebuild(new)`` puts a replacement back in the same structure."""
    if isinstance(value, torch.Tensor):
        return value, lambda new: new
    if isinstance(value, (tuple, list)) and value:
        inner, rebuild = _split(value[0])
        return inner, lambda new: type(value)([rebuild(new), *value[1:]])
    if isinstance(getattr(value, "last_hidden_state", None), torch.Tensor):
        def rebuild_output(new):
            out = copy.copy(value)
            out.last_hidden_state = new
            return out
        return value.last_hidden_state, rebuild_output
    raise TypeError(f"hooked module produced {type(value).__name__}; expected a Tensor or a tuple starting with one")


def add_hook(module: nn.Module, kind: str, fn, prepend: bool = False) -> torch.utils.hooks.RemovableHandle:
    """Hook ``fn(x) -> new x | None`` on a resolved hook point: the module's output ("output")
    or first input ("pre"). Returning a tensor replaces the activation; None leaves it."""
    if kind == "pre":
        def pre_hook(_module, args, kwargs):
            if args:
                x, rebuild = _split(args[0])
                new = fn(x)
                return None if new is None else ((rebuild(new), *args[1:]), kwargs)
            key = next(iter(kwargs))  # e.g. hidden_states=... for Hugging Face layers
            x, rebuild = _split(kwargs[key])
            new = fn(x)
            return None if new is None else (args, {**kwargs, key: rebuild(new)})
        return module.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=prepend)

    def hook(_module, _args, output):
        x, rebuild = _split(output)
        new = fn(x)
        return None if new is None else rebuild(new)
    return module.register_forward_hook(hook, prepend=prepend)


class TokenBatch(NamedTuple):
    """A batch of tokenized text: every field is (B, T); padding has attention_mask 0 and doc_id -1."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    doc_ids: torch.Tensor
    positions: torch.Tensor


def kept_tokens(attention_mask: torch.Tensor, positions: torch.Tensor, drop_bos: bool) -> torch.Tensor:
    """Boolean (B, T): real tokens, without the first position of each sequence when drop_bos."""
    keep = attention_mask.bool()
    return keep & (positions != 0) if drop_bos else keep


class _StopForward(Exception):
    """Raised from a hook once every hook point has its activations: the rest of the forward is waste."""


_META_FIELDS = ("token_ids", "doc_ids", "positions")


class ActivationCollector:
    """Context manager that records activations at hook points while the model runs.

    Usage::

        with ActivationCollector(model, ["blocks.3.hook_resid_post"]) as c:
            c.set_batch(input_ids, attention_mask)   # optional: padding dropped, metadata kept
            model(input_ids)
        acts = c.get_activations()                   # {hook_point: Tensor[N, d]}

    Activations are detached, cast to `dtype` (default: as produced), capped at
    `max_activations` tokens per hook point and moved to `device`. Moving off a GPU never
    synchronises per step: tokens are selected with indices computed on the CPU and copied with
    non_blocking=True into pinned host memory; the wait happens once, in get_activations().
    With `set_batch(...)`, padding (attention_mask 0) and, with drop_bos=True, position-0 tokens
    are dropped and each kept token keeps its token id, document id and position.
    Without it, every token is kept and metadata is -1 (ids) / the position in the sequence.
    """

    def __init__(self, model: nn.Module, hook_points: str | Iterable[str], max_activations: int = 10_000_000,
                 device: str | torch.device = "cpu", save_path: str | os.PathLike | None = None,
                 dtype: torch.dtype | None = None, drop_bos: bool = False):
        self.model = model
        self.hook_points = [hook_points] if isinstance(hook_points, str) else list(hook_points)
        if not self.hook_points:
            raise ValueError("hook_points is empty: give at least one hook point name")
        if max_activations <= 0:
            raise ValueError(f"max_activations must be positive, got {max_activations}")
        self._targets = {hp: resolve_hook_point(model, hp) for hp in self.hook_points}  # fail early
        self.max_activations = int(max_activations)
        self.device = torch.device(device)
        self.save_path = save_path
        self.dtype = dtype
        self.drop_bos = drop_bos
        self.stop_when_done = False  # set by collection loops that discard the model output
        self._handles: list = []
        self._batch: TokenBatch | None = None
        self._fired: set[str] = set()
        self._pending_copies = False
        self.clear()

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> "ActivationCollector":
        for hp, (module, kind) in self._targets.items():
            self._handles.append(add_hook(module, kind, lambda x, hp=hp: self._record(hp, x)))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.save_path is not None and exc_type is None:
            self.save_activations(self.save_path)

    def clear(self) -> None:
        """Forget everything collected so far (hooks stay registered)."""
        self._chunks: dict[str, list[torch.Tensor]] = {hp: [] for hp in self.hook_points}
        self._meta: dict[str, dict[str, list[torch.Tensor]]] = {hp: {f: [] for f in _META_FIELDS}
                                                                 for hp in self.hook_points}
        self.counts: dict[str, int] = {hp: 0 for hp in self.hook_points}

    def set_batch(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                  doc_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> None:
        """Describe the (B, T) batch of the next forward call: which tokens are padding, and their metadata."""
        self._fired.clear()
        if input_ids is None:
            self._batch = None
            return
        input_ids = input_ids.detach().cpu()
        shape = input_ids.shape
        mask = torch.ones(shape, dtype=torch.bool) if attention_mask is None else attention_mask.detach().cpu().bool()
        docs = torch.full(shape, -1, dtype=torch.long) if doc_ids is None else doc_ids.detach().cpu().long()
        pos = torch.arange(shape[-1]).expand(shape) if positions is None else positions.detach().cpu().long()
        self._batch = TokenBatch(input_ids.long(), mask, docs, pos)

    @property
    def is_full(self) -> bool:
        return all(n >= self.max_activations for n in self.counts.values())

    # -- recording -----------------------------------------------------------------------------
    def _keep_index(self, x: torch.Tensor) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """CPU indices (into x flattened to tokens) of tokens to keep, and their metadata."""
        b = self._batch
        tokens_shape = x.shape[:-1]
        if b is not None and tuple(tokens_shape) == tuple(b.input_ids.shape):
            index = kept_tokens(b.attention_mask, b.positions, self.drop_bos).flatten().nonzero().squeeze(1)
            meta = {"token_ids": b.input_ids.flatten()[index], "doc_ids": b.doc_ids.flatten()[index],
                    "positions": b.positions.flatten()[index]}
            return index, meta
        # No batch description (or a KV-cache decode step with fewer positions): keep every token.
        n = tokens_shape.numel()
        seq = tokens_shape[-1] if len(tokens_shape) > 1 else 1
        meta = {"token_ids": torch.full((n,), -1, dtype=torch.long), "doc_ids": torch.full((n,), -1, dtype=torch.long),
                "positions": torch.arange(seq).repeat(n // seq) if seq else torch.zeros(0, dtype=torch.long)}
        return None, meta

    def _to_device(self, x: torch.Tensor, owned: bool) -> torch.Tensor:
        if x.device == self.device:
            return x if owned else x.clone()  # never keep a view of the model's own tensors
        if x.is_cuda and self.device.type == "cpu":
            host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            host.copy_(x, non_blocking=True)  # waited for once, in get_activations()
            self._pending_copies = True
            return host
        return x.to(self.device, non_blocking=True)

    def _record(self, hook_point: str, x: torch.Tensor) -> None:
        room = self.max_activations - self.counts[hook_point]
        if room > 0:
            index, meta = self._keep_index(x)
            flat = x.detach().reshape(-1, x.shape[-1])
            owned = index is not None or (self.dtype is not None and self.dtype != flat.dtype)
            if index is not None:
                index = index[:room]
                if flat.is_cuda:  # a copy from pageable memory would synchronise the stream
                    index = index.pin_memory()
                flat = flat.index_select(0, index.to(flat.device, non_blocking=True))
            else:
                flat = flat[:room]
            if self.dtype is not None:
                flat = flat.to(self.dtype)
            self._chunks[hook_point].append(self._to_device(flat, owned))
            for field in _META_FIELDS:
                self._meta[hook_point][field].append(meta[field][: flat.shape[0]])
            self.counts[hook_point] += flat.shape[0]
        self._fired.add(hook_point)
        if self.stop_when_done and len(self._fired) == len(self.hook_points):
            raise _StopForward

    # -- results -------------------------------------------------------------------------------
    def _select(self, hook_point: str | None) -> list[str]:
        if hook_point is None:
            return self.hook_points
        if hook_point not in self._chunks:
            raise KeyError(f"hook point {hook_point!r} is not collected here; collected: {self.hook_points}")
        return [hook_point]

    def _concat(self, chunks: list[torch.Tensor]) -> torch.Tensor:
        if self._pending_copies:
            torch.cuda.synchronize()  # the non_blocking device-to-host copies must have landed
            self._pending_copies = False
        return torch.cat(chunks) if chunks else torch.empty(0)

    def get_activations(self, hook_point: str | None = None) -> dict[str, torch.Tensor]:
        """{hook_point: Tensor[N, d]} on `device`; one hook point if named, else all."""
        out = {}
        for hp in self._select(hook_point):
            chunks = self._chunks[hp]
            out[hp] = self._concat(chunks)
            self._chunks[hp] = [out[hp]] if chunks else []  # concatenate once, keep the result
        return out

    def get_metadata(self, hook_point: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """{hook_point: {"token_ids", "doc_ids", "positions": LongTensor[N]}} aligned with get_activations."""
        out = {}
        for hp in self._select(hook_point):
            out[hp] = {f: torch.cat(v) if v else torch.zeros(0, dtype=torch.long) for f, v in self._meta[hp].items()}
        return out

    def pop(self, hook_point: str) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Take what was collected at one hook point since the last pop (for streaming to disk)."""
        acts = self.get_activations(hook_point)[hook_point] if self._chunks[hook_point] else None
        meta = self.get_metadata(hook_point)[hook_point]
        self._chunks[hook_point] = []
        self._meta[hook_point] = {f: [] for f in _META_FIELDS}
        return acts, meta

    def pop_joined(self, hook_points) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """``pop`` of several hook points of the same tokens, their activations side by side
        ([n, d_1 + d_2 ...], e.g. a transcoder's [input | output]); the first one's metadata."""
        popped = [self.pop(hp) for hp in hook_points]
        acts, meta = popped[0]
        if acts is not None and len(popped) > 1:
            acts = torch.cat([a for a, _ in popped], 1)
        return acts, meta

    def save_activations(self, path: str | os.PathLike) -> None:
        """Write activations and metadata to one safetensors file, atomically (temp file + rename)."""
        tensors = {}
        for hp, acts in self.get_activations().items():
            tensors[hp] = acts.cpu()
            for field, values in self.get_metadata(hp)[hp].items():
                tensors[f"{hp}/{field}"] = values
        atomic_save_tensors(path, tensors, metadata={"format": "fastsae.activations",
                                                          "hook_points": ",".join(self.hook_points)})

    @staticmethod
    def load_activations(path: str | os.PathLike, hook_points: str | Iterable[str] | None = None,
                         with_metadata: bool = False):
        """{hook_point: Tensor[N, d]} from save_activations(); with_metadata=True also returns the metadata dict."""
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt") as f:
            stored = [k for k in f.keys() if "/" not in k]
            wanted = stored if hook_points is None else ([hook_points] if isinstance(hook_points, str)
                                                         else list(hook_points))
            missing = [hp for hp in wanted if hp not in stored]
            if missing:
                raise KeyError(f"{path} has no activations for {missing}; it holds {stored}")
            acts = {hp: f.get_tensor(hp) for hp in wanted}
            meta = {hp: {fld: f.get_tensor(f"{hp}/{fld}") for fld in _META_FIELDS if f"{hp}/{fld}" in f.keys()}
                    for hp in wanted}
        return (acts, meta) if with_metadata else acts


def forward_tokens(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """One forward pass: Hugging Face models get the attention mask, nanochat's GPT(idx) does not
    need one (it is causal and padding sits at the end of each row)."""
    if getattr(model, "main_input_name", None) == "input_ids":
        return model(input_ids=input_ids, attention_mask=attention_mask)
    return model(input_ids)


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _unpack_batch(batch: Any) -> TokenBatch | tuple:
    """A dataloader item as (input_ids, attention_mask, doc_ids, positions), missing parts None."""
    if isinstance(batch, TokenBatch):
        return batch
    if isinstance(batch, torch.Tensor):
        return batch, None, None, None
    if isinstance(batch, Mapping):
        return (batch["input_ids"], batch.get("attention_mask"), batch.get("doc_ids"), batch.get("positions"))
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], None, None, None  # (inputs, targets) pairs
    raise TypeError(f"dataloader item of type {type(batch).__name__}: expected a Tensor of token ids, "
                    "an (inputs, targets) pair, a dict with 'input_ids', or a TokenBatch")


def run_collector_batch(collector: ActivationCollector, model: nn.Module, batch: Any) -> None:
    """Describe the batch to the collector and run the model far enough to fill every hook point."""
    input_ids, attention_mask, doc_ids, positions = _unpack_batch(batch)
    collector.set_batch(input_ids, attention_mask, doc_ids, positions)
    device = model_device(model)
    mask = attention_mask.to(device) if attention_mask is not None else None
    collector.stop_when_done = True
    try:
        with torch.inference_mode():
            forward_tokens(model, input_ids.to(device), mask)
    except _StopForward:
        pass
    finally:
        collector.stop_when_done = False


def hook_width(model: nn.Module, hook_point: str) -> int:
    """The width of the activations at ``hook_point`` (d_model, or the MLP width for
    mlp_hidden), from a forward pass over two tokens, so settings that depend on it can be
    checked before a long collection starts."""
    with ActivationCollector(model, [hook_point], max_activations=2) as collector:
        run_collector_batch(collector, model, torch.ones(1, 2, dtype=torch.long))
        acts = collector.get_activations(hook_point)[hook_point]
    return int(acts.shape[-1])


def collect_activations_from_dataloader(model: nn.Module, dataloader: Iterable, hook_points: str | Iterable[str],
                                        max_activations: int = 10_000_000, device: str | torch.device = "cpu",
                                        save_path: str | os.PathLike | None = None, verbose: bool = True,
                                        dtype: torch.dtype | None = None,
                                        drop_bos: bool = False) -> dict[str, torch.Tensor]:
    """Run the model over a dataloader until every hook point has max_activations tokens (or data ends).

    Items may be token-id tensors, (inputs, targets) pairs, dicts with input_ids/attention_mask
    (and optional doc_ids/positions), or TokenBatch. Returns {hook_point: Tensor[N, d]}.
    """
    collector = ActivationCollector(model, hook_points, max_activations, device, save_path, dtype, drop_bos)
    with collector, progress_bar(total=max_activations, unit="tok", disable=not verbose, desc="collect") as bar:
        for batch in dataloader:
            run_collector_batch(collector, model, batch)
            bar.update(min(collector.counts.values()) - bar.n)
            if collector.is_full:
                break
    return collector.get_activations()
