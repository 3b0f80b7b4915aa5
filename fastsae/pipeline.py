"""Several SAEs from one model and corpus: every hook point collected from the same forward
passes into its own store, then one SAE trained on each (what ``fastsae train --layers`` runs).

Layout of ``output_dir``: one folder per hook point, named after it, holding ``activations/``
(the store; a transcoder's target in ``target_activations/``, collected in the same passes) and
the trainer's outputs (``best_model/``, ``checkpoints/``, ``metrics.jsonl``, ...).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterable

from torch import nn

from fastsae.config import SAEConfig
from fastsae.hooks import hook_width
from fastsae.models import create_sae
from fastsae.store import PairedStore, collect_to_stores, split_store
from fastsae.trainer import SAETrainer

__all__ = ["shard_tokens", "train_saes"]


def _checked_configs(model: nn.Module, configs: dict[str, SAEConfig]) -> dict[str, SAEConfig]:
    """Each config with its key as hook point, checked against the model's width there. A config
    naming another hook point than its key (other than SAEConfig's default) is refused."""
    if not configs:
        raise ValueError("configs is empty: give at least one {hook_point: SAEConfig}")
    default = SAEConfig.__dataclass_fields__["hook_point"].default
    checked = {}
    for hook_point, config in configs.items():
        if config.hook_point not in (None, default, hook_point):
            raise ValueError(f"configs[{hook_point!r}].hook_point is {config.hook_point!r}: leave it unset or give "
                             f"the same hook point")
        width = hook_width(model, hook_point)
        if config.d_in != width:
            raise ValueError(f"configs[{hook_point!r}].d_in is {config.d_in}, but the model's activation there has "
                             f"width {width}")
        out_width = hook_width(model, config.output_hook_point) if config.is_transcoder else config.d_out
        if config.d_out != out_width:
            raise ValueError(f"configs[{hook_point!r}].d_out is {config.d_out}, but the model's activation at "
                             f"{config.output_hook_point!r} has width {out_width}")
        checked[hook_point] = dataclasses.replace(config, hook_point=hook_point)
    return checked


def train_saes(model: nn.Module, tokenizer, corpus: Iterable[str], configs: dict[str, SAEConfig],
               output_dir: str | os.PathLike, num_tokens: int | None = None, *, device="cpu", val_split: float = 0.1,
               batch_size: int = 32, context_length: int = 128, resume: bool = False, verbose: bool = True,
               **trainer_kwargs) -> dict[str, tuple[nn.Module, SAETrainer]]:
    """Collect ``num_tokens`` tokens (default: the largest ``num_activations`` of the configs) at
    every hook point of ``configs`` from one forward pass per batch of ``batch_size`` sequences,
    then train one SAE per hook point on its store, the last shards (about ``val_split`` of the
    tokens) held out. Returns {hook point: (trained SAE, its trainer)}. A rerun reuses the
    stores; ``resume=True`` continues each training run from its last checkpoint."""
    configs = _checked_configs(model, configs)
    num_tokens = num_tokens or max(c.num_activations for c in configs.values())
    root = Path(output_dir)
    store_dirs = {hp: root / hp / "activations" for hp in configs}
    store_dirs.update({c.output_hook_point: root / hp / "target_activations" for hp, c in configs.items()
                       if c.is_transcoder})
    stores = collect_to_stores(model, tokenizer, corpus, store_dirs, num_tokens, batch_size, context_length,
                               shard_tokens=shard_tokens(num_tokens), progress=verbose)
    trained = {}
    for hook_point, config in configs.items():
        data = stores[hook_point]
        if config.is_transcoder:
            data = PairedStore(data, stores[config.output_hook_point])
        train, val = split_store(data, val_split)
        trainer = SAETrainer(create_sae(config), config, train, val, device=device, save_dir=root / hook_point,
                             **trainer_kwargs)
        trainer.train(verbose=verbose, resume=resume)
        trained[hook_point] = (trainer.sae, trainer)
    return trained


def shard_tokens(num_tokens: int) -> int:
    """About 20 shards (multiples of the store's 1024-row blocks, at most 65536 rows), so that
    whole shards can be held out for validation even from a small collection."""
    return int(min(1 << 16, max(1024, num_tokens // 20 // 1024 * 1024)))
