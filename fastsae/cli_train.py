"""``fastsae train`` (and ``python -m scripts.sae_train``): collect activations, train an SAE.

Writes ``{output_dir}/layer_{L}/``: ``activations/`` (the activation store; a rerun reuses or
extends it), ``best_model/``, ``final_model/``, ``checkpoints/``, ``config.json``,
``metrics.jsonl`` and ``loss_curves.png``. With no --checkpoint / --model, the embedded
all-MiniLM-L6-v2 is used. Under torchrun, rank 0 collects and every rank trains on its slice.

Every setting is checked (and the SAE's config built) before collection starts; the layer
folder is locked for the run; a checkpoint is written every --save_every steps and every
--checkpoint_minutes, and on SIGINT / SIGTERM, so ``--resume`` loses at most that much.
"""
from __future__ import annotations

import os
import shutil
import sys
import warnings
from pathlib import Path

from fastsae.cli_args import (
    HelpFormatter,
    add_option,
    fraction,
    nonnegative_float,
    positive_float,
    positive_int,
    say,
)

# CLI hook type -> hook point kind (blocks.{L}.hook_{kind}); "attn" and "mlp" are the seed's names.
HOOK_TYPES = {"resid_pre": "resid_pre", "resid_post": "resid_post", "attn_out": "attn_out", "mlp_out": "mlp_out",
              "mlp_hidden": "mlp_hidden", "attn": "attn_out", "mlp": "mlp_out"}


def register(sub):
    p = sub.add_parser("train", help="collect activations from a model and train an SAE on them",
                       formatter_class=HelpFormatter, description=__doc__.split("\n\n")[0])
    add_train_arguments(p)
    p.set_defaults(handler=train_command)


def add_train_arguments(p) -> None:
    """The seed's sae_train flags plus fastsae's, in both spellings."""
    from fastsae.config import ACTIVATIONS, OPTIMIZERS, SAEConfig

    defaults = SAEConfig(d_in=64, expansion_factor=1)
    src = p.add_argument_group("model and data")
    add_option(src, "checkpoint", default=None, help="nanochat checkpoint directory (e.g. base_checkpoints/d20)")
    add_option(src, "step", type=positive_int, default=None, help="nanochat checkpoint step (default: latest)")
    add_option(src, "model", default=None, help="local Hugging Face model directory (instead of --checkpoint)")
    add_option(src, "layer", type=int, required=True, help="block index to hook")
    add_option(src, "hook_type", choices=list(HOOK_TYPES), default="resid_post",
               help="where in the block: resid_pre, resid_post, attn_out, mlp_out, mlp_hidden "
                    "(attn and mlp are the seed's names for attn_out and mlp_out)")
    add_option(src, "num_activations", "num_tokens", "tokens", type=positive_int, default=1_000_000,
               help="tokens to collect")
    add_option(src, "corpus", nargs="*", default=None,
               help=".txt/.jsonl files or directories (default: Python's own documentation)")
    add_option(src, "context_length", type=positive_int, default=128)
    add_option(src, "collect_batch_size", type=positive_int, default=32, help="sequences per model forward")
    add_option(src, "activations", default=None, help="train on this existing activation store directory")
    sae = p.add_argument_group("SAE and training")
    add_option(sae, "activation", choices=ACTIVATIONS, default="topk")
    add_option(sae, "k", type=positive_int, default=64, help="active latents per token (topk, batchtopk)")
    add_option(sae, "expansion_factor", "width", type=positive_int, default=8, help="d_sae = expansion_factor * d_in")
    add_option(sae, "batch_size", type=positive_int, default=4096, help="rows per optimisation step")
    add_option(sae, "num_epochs", type=positive_int, default=10)
    add_option(sae, "learning_rate", "lr", type=positive_float, default=None,
               help="default: automatic, from the width, the batch and the run's length (README, 'Learning rate')")
    add_option(sae, "optimizer", choices=OPTIMIZERS, default=defaults.optimizer)
    add_option(sae, "l1_coefficient", type=nonnegative_float, default=None,
               help=f"ReLU/Gated sparsity (default: {defaults.l1_coefficient})")
    add_option(sae, "val_split", type=fraction, default=0.1, help="fraction of shards held out for validation")
    add_option(sae, "seed", type=int, default=0)
    add_option(sae, "device", default=None, help="default: cuda if available, else cpu")
    out = p.add_argument_group("output")
    add_option(out, "output_dir", default="sae_outputs")
    add_option(out, "resume", action="store_true", help="continue from the latest checkpoint")
    add_option(out, "max_steps", type=positive_int, default=None,
               help="stop after this many steps (keeping a checkpoint; --resume continues the same run)")
    add_option(out, "save_every", type=positive_int, default=defaults.save_every, help="checkpoint every N steps")
    add_option(out, "checkpoint_minutes", type=positive_float, default=5.0,
               help="also checkpoint every this many minutes of training")
    add_option(out, "prepare_neuronpedia", action="store_true", help="also write a Neuronpedia export")
    add_option(out, "quiet", action="store_true", help="no progress bars or status lines")


def train_command(args) -> int:
    from fastsae.files import DirectoryInUseError
    from fastsae.progress import set_quiet

    set_quiet(args.quiet)
    layer_dir = Path(args.output_dir) / f"layer_{args.layer}"
    created = [d for d in (Path(args.output_dir), layer_dir) if not d.exists()]
    try:
        return _train(args, layer_dir)
    except KeyboardInterrupt as e:
        print(f"fastsae train: {e or 'interrupted'}; the checkpoint is saved: rerun with --resume to continue",
              file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError, FloatingPointError, RuntimeError, DirectoryInUseError) as e:
        _remove_if_empty(reversed(created))
        print(f"fastsae train: error: {e}", file=sys.stderr)
        return 1


def _remove_if_empty(dirs) -> None:
    """A failed run leaves no empty folders behind (the lock file does not count)."""
    for d in dirs:
        if d.is_dir() and all(p.name == ".lock" for p in d.iterdir()):
            shutil.rmtree(d, ignore_errors=True)


def _train(args, layer_dir: Path) -> int:
    import torch

    from fastsae.files import DirectoryLock
    from fastsae.trainer import _writable_dir, resolve_device

    rank, world_size = _init_distributed()
    if args.checkpoint and args.model:
        raise ValueError("give --checkpoint (nanochat) or --model (Hugging Face directory), not both")
    if args.activations and (args.checkpoint or args.model or args.corpus):
        raise ValueError("--activations trains on a store already collected: it takes no --checkpoint, --model "
                         "or --corpus")
    layer_dir = _writable_dir(layer_dir)
    with warnings.catch_warnings(record=True) as caught:  # one plain line, not a pointer into this file
        warnings.simplefilter("always")
        device = resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for w in caught:
        print(f"fastsae train: note: {w.message}", file=sys.stderr)
    if rank != 0:  # one lock per run: rank 0 holds it for every rank
        return _train_locked(args, layer_dir, device, rank)
    with DirectoryLock(layer_dir, "fastsae train"):
        return _train_locked(args, layer_dir, device, rank)


def _train_locked(args, layer_dir: Path, device, rank: int) -> int:
    from fastsae.models import create_sae
    from fastsae.trainer import SAETrainer

    hook_point = f"blocks.{args.layer}.hook_{HOOK_TYPES[args.hook_type]}"
    store, config, model_meta = collect_activations(args, hook_point, layer_dir / "activations", device, rank)
    train, val = split_store(store, args.val_split)
    trainer = SAETrainer(create_sae(config), config, train, val, device=device, save_dir=layer_dir,
                         checkpoint_minutes=args.checkpoint_minutes, metadata=model_meta)
    trainer.train(verbose=not args.quiet, resume=args.resume, max_steps=args.max_steps)
    if rank == 0:
        if trainer.resumed_step is not None and trainer.resumed_step >= trainer.total_steps:
            print(f"this run was already complete (step {trainer.total_steps} of {trainer.total_steps}); "
                  "nothing was trained")
        best = layer_dir / ("best_model" if (layer_dir / "best_model").exists() else "final_model")
        fvu = f"best val FVU {trainer.best_val_fvu:.4f}" if val is not None else "no validation split"
        if trainer.step < trainer.total_steps:
            print(f"stopped at step {trainer.step} of {trainer.total_steps} (--max_steps); checkpoint "
                  f"{trainer.last_checkpoint}; rerun with --resume to continue")
        else:
            print(f"trained {config.activation} SAE d_in={config.d_in} d_sae={config.d_sae} on "
                  f"{store.hook_point} ({fvu}); saved to {best}")
            if args.prepare_neuronpedia:
                _prepare_neuronpedia(trainer, config, layer_dir)
    return 0


def _init_distributed() -> tuple[int, int]:
    """Join the process group torchrun describes (WORLD_SIZE > 1); (rank, world_size)."""
    import torch
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def load_model(args, device):
    """(model, tokenizer, ModelInfo) from --checkpoint, --model or the embedded default."""
    from fastsae import sources

    if args.checkpoint:
        return sources.load_nanochat_checkpoint(args.checkpoint, step=args.step, device=device)
    if args.model:
        return sources.load_hf_model(args.model, device=device)
    return sources.load_default_model(device=device)


def sae_config(args, d_in: int, hook_point: str):
    """The SAEConfig the flags describe (a bad combination, e.g. k > d_sae, fails here)."""
    from fastsae.config import SAEConfig

    extra = {"l1_coefficient": args.l1_coefficient} if args.l1_coefficient is not None else {}
    return SAEConfig(d_in=d_in, activation=args.activation, k=args.k, expansion_factor=args.expansion_factor,
                     num_activations=args.num_activations, batch_size=args.batch_size, num_epochs=args.num_epochs,
                     learning_rate=args.learning_rate, optimizer=args.optimizer, hook_point=hook_point, seed=args.seed,
                     save_every=args.save_every, **extra)


def collect_activations(args, hook_point: str, store_dir: Path, device, rank: int = 0):
    """(store, config, model metadata): --activations as given, else collected (rank 0 only; a
    rerun with the same settings reuses or extends what is on disk). The config is built, and
    so every setting checked, before the collection starts."""
    import torch.distributed as dist

    from fastsae.store import ActivationStore, collect_to_store

    if args.activations:
        store = ActivationStore(args.activations, hook_point=hook_point)
        config = sae_config(args, store.d_in, store.hook_point)
        say(args, f"activations: {store.store_dir} ({store.num_tokens} tokens of {store.manifest['model_name']} "
                   f"at {store.hook_point})")
        return store, config, _model_metadata(store)
    config = None
    if rank == 0:
        from fastsae.corpus import default_corpus, load_text_corpus
        from fastsae.hooks import hook_width

        corpus = load_text_corpus(args.corpus) if args.corpus else default_corpus()
        model, tokenizer, info = load_model(args, device)
        if not 0 <= args.layer < info.n_layers:
            raise ValueError(f"--layer {args.layer} is out of range: {info.name} has {info.n_layers} layers "
                             f"(0 to {info.n_layers - 1})")
        config = sae_config(args, hook_width(model, hook_point), hook_point)
        say(args, f"model: {info.name} ({info.n_layers} layers, d_model {info.d_model}) on {device}; "
                   f"SAE: {config.activation} d_in {config.d_in} d_sae {config.d_sae}")
        collect_to_store(model, tokenizer, corpus, hook_point, store_dir, args.num_activations,
                         batch_size=args.collect_batch_size, context_length=args.context_length,
                         shard_tokens=shard_tokens(args.num_activations), model_name=info.name,
                         progress=not args.quiet)
        del model
    if dist.is_initialized():
        dist.barrier()
    store = ActivationStore(store_dir, hook_point=hook_point)
    config = config or sae_config(args, store.d_in, hook_point)
    return store, config, _model_metadata(store)


def _model_metadata(store) -> dict:
    """What every saved SAE's cfg.json records about where its activations came from."""
    manifest = store.manifest
    return {"model_name": manifest.get("model_name"), "context_size": manifest.get("context_length"),
            "num_tokens_collected": store.num_tokens, "corpus": manifest.get("corpus")}


def shard_tokens(num_activations: int) -> int:
    """About 20 shards (multiples of the store's 1024-row blocks, at most 65536 rows), so that
    whole shards can be held out for validation even from a small collection."""
    return int(min(1 << 16, max(1024, num_activations // 20 // 1024 * 1024)))


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


def _prepare_neuronpedia(trainer, config, layer_dir: Path) -> None:
    from fastsae.neuronpedia import NeuronpediaUploader

    path = NeuronpediaUploader().prepare_sae_for_upload(trainer.raw_sae(), config, layer_dir / "neuronpedia")
    print(f"Neuronpedia export written to {path}")
