"""``fastsae train`` (and ``python -m scripts.sae_train``): collect activations, train an SAE.

Writes ``{output_dir}/layer_{L}/``: ``activations/`` (the activation store; a rerun reuses or
extends it), ``best_model/``, ``final_model/``, ``checkpoints/``, ``config.json``,
``metrics.jsonl`` and ``loss_curves.png``. With no --checkpoint / --model, the embedded
all-MiniLM-L6-v2 is used. Under torchrun, rank 0 collects and every rank trains on its slice.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

HOOK_TYPES = {"resid_post": "resid_post", "resid_pre": "resid_pre", "attn": "attn_out", "mlp": "mlp_out"}


def register(sub):
    p = sub.add_parser("train", help="collect activations from a model and train an SAE on them")
    add_train_arguments(p)
    p.set_defaults(handler=train_command)


def add_train_arguments(p) -> None:
    """The seed's sae_train flags plus fastsae's."""
    from fastsae.config import ACTIVATIONS

    src = p.add_argument_group("model and data")
    src.add_argument("--checkpoint", default=None, help="nanochat checkpoint directory (e.g. base_checkpoints/d20)")
    src.add_argument("--step", type=int, default=None, help="nanochat checkpoint step (default: latest)")
    src.add_argument("--model", default=None, help="local Hugging Face model directory (instead of --checkpoint)")
    src.add_argument("--layer", type=int, required=True, help="block index to hook")
    src.add_argument("--hook_type", choices=sorted(HOOK_TYPES), default="resid_post")
    src.add_argument("--num_activations", type=int, default=1_000_000, help="tokens to collect")
    src.add_argument("--corpus", nargs="*", default=None,
                     help=".txt/.jsonl files or directories (default: Python's own documentation)")
    src.add_argument("--context_length", type=int, default=128)
    src.add_argument("--collect_batch_size", type=int, default=32, help="sequences per model forward")
    src.add_argument("--activations", default=None, help="train on this existing activation store directory")
    sae = p.add_argument_group("SAE and training")
    sae.add_argument("--activation", choices=ACTIVATIONS, default="topk")
    sae.add_argument("--k", type=int, default=64)
    sae.add_argument("--expansion_factor", type=int, default=8)
    sae.add_argument("--batch_size", type=int, default=4096)
    sae.add_argument("--num_epochs", type=int, default=10)
    sae.add_argument("--learning_rate", type=float, default=3e-4)
    sae.add_argument("--l1_coefficient", type=float, default=None, help="ReLU/Gated sparsity (default: config's)")
    sae.add_argument("--val_split", type=float, default=0.1, help="fraction of shards held out for validation")
    sae.add_argument("--seed", type=int, default=0)
    sae.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    out = p.add_argument_group("output")
    out.add_argument("--output_dir", default="sae_outputs")
    out.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    out.add_argument("--max_steps", type=int, default=None,
                     help="stop after this many steps (keeping a checkpoint; --resume continues the same run)")
    out.add_argument("--prepare_neuronpedia", action="store_true", help="also write a Neuronpedia export")
    out.add_argument("--quiet", action="store_true", help="no progress bars")


def train_command(args) -> int:
    try:
        return _train(args)
    except (ValueError, OSError, ImportError, FloatingPointError, RuntimeError) as e:
        print(f"fastsae train: error: {e}", file=sys.stderr)
        return 1


def _train(args) -> int:
    import torch

    from fastsae.config import SAEConfig
    from fastsae.models import create_sae
    from fastsae.trainer import SAETrainer, _writable_dir, resolve_device

    rank, world_size = _init_distributed()
    layer_dir = _writable_dir(Path(args.output_dir) / f"layer_{args.layer}")
    hook_point = f"blocks.{args.layer}.hook_{HOOK_TYPES[args.hook_type]}"
    device = resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    store = collect_activations(args, hook_point, layer_dir / "activations", device, rank)
    config = SAEConfig(d_in=store.d_in, activation=args.activation, k=args.k, expansion_factor=args.expansion_factor,
                       num_activations=args.num_activations, batch_size=args.batch_size, num_epochs=args.num_epochs,
                       learning_rate=args.learning_rate, hook_point=store.hook_point, seed=args.seed,
                       **({"l1_coefficient": args.l1_coefficient} if args.l1_coefficient is not None else {}))
    train, val = split_store(store, args.val_split)
    trainer = SAETrainer(create_sae(config), config, train, val, device=device, save_dir=layer_dir)
    trainer.train(verbose=not args.quiet, resume=args.resume, max_steps=args.max_steps)
    if rank == 0:
        best = layer_dir / ("best_model" if (layer_dir / "best_model").exists() else "final_model")
        fvu = f"best val FVU {trainer.best_val_fvu:.4f}" if val is not None else "no validation split"
        print(f"trained {config.activation} SAE d_in={config.d_in} d_sae={config.d_sae} on {store.hook_point} "
              f"({fvu}); saved to {best}")
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

    if args.checkpoint and args.model:
        raise ValueError("give --checkpoint (nanochat) or --model (Hugging Face directory), not both")
    if args.checkpoint:
        return sources.load_nanochat_checkpoint(args.checkpoint, step=args.step, device=device)
    if args.model:
        return sources.load_hf_model(args.model, device=device)
    return sources.load_default_model(device=device)


def collect_activations(args, hook_point: str, store_dir: Path, device, rank: int = 0):
    """The activation store to train on: --activations as given, else collected (rank 0 only;
    a rerun with the same settings reuses or extends what is on disk)."""
    import torch.distributed as dist

    from fastsae.store import ActivationStore, collect_to_store

    if args.activations:
        return ActivationStore(args.activations, hook_point=hook_point)
    if rank == 0:
        from fastsae.corpus import default_corpus, load_text_corpus

        model, tokenizer, info = load_model(args, device)
        if args.layer >= info.n_layers:
            raise ValueError(f"--layer {args.layer} is out of range: {info.name} has {info.n_layers} layers")
        corpus = load_text_corpus(args.corpus) if args.corpus else default_corpus()
        collect_to_store(model, tokenizer, corpus, hook_point, store_dir, args.num_activations,
                         batch_size=args.collect_batch_size, context_length=args.context_length,
                         shard_tokens=shard_tokens(args.num_activations), model_name=info.name,
                         progress=not args.quiet)
        del model
    if dist.is_initialized():
        dist.barrier()
    return ActivationStore(store_dir, hook_point=hook_point)


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
    try:
        from fastsae.neuronpedia import NeuronpediaUploader
    except ImportError:
        print("--prepare_neuronpedia: fastsae.neuronpedia is not available in this version; skipped", file=sys.stderr)
        return
    path = NeuronpediaUploader().prepare_sae_for_upload(trainer.raw_sae(), config, layer_dir / "neuronpedia")
    print(f"Neuronpedia export written to {path}")
