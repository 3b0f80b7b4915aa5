"""``fastsae train`` (and ``python -m scripts.sae_train``): collect activations, train an SAE.

Writes ``{output_dir}/layer_{L}/`` per block of --layer / --layers (``{output_dir}/{hook point}/``
per --hook_points match): ``activations/`` (the activation store; a rerun reuses or extends it),
``best_model/``, ``final_model/``, ``checkpoints/``, ``config.json``, ``metrics.jsonl`` and
``loss_curves.png``. Every hook point is collected from the same forward passes, then the SAEs
are trained one after another. With no --checkpoint / --model, the embedded all-MiniLM-L6-v2 is
used. Under torchrun every rank runs the model for its share of the store's shards, then
trains on its slice of every batch.

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
HOOK_TYPES = {"resid_pre": "resid_pre", "resid_post": "resid_post", "attn_out": "attn_out", "mlp_in": "mlp_in",
              "mlp_out": "mlp_out", "mlp_hidden": "mlp_hidden", "attn": "attn_out", "mlp": "mlp_out"}


# --stream keeps its validation rows in memory: at most this many.
STREAM_VAL_ROWS = 1 << 16


def layer_list(text: str):
    """argparse type of --layers: "all", or block indices and ranges ("0,2,4", "0-3,8")."""
    import argparse

    if text == "all":
        return "all"
    layers = []
    try:
        for part in text.split(","):
            first, _, last = part.partition("-")
            layers.extend(range(int(first), int(last or first) + 1))
    except ValueError:
        layers = []
    if not layers or min(layers) < 0 or len(set(layers)) != len(layers):
        raise argparse.ArgumentTypeError(f"expected block indices (0,2,4), ranges (0-3) or 'all', each block once, "
                                         f"got {text!r}")
    return sorted(layers)


def size_list(text: str) -> list[int]:
    """argparse type of --matryoshka_sizes: positive widths, "256,1024,4096"."""
    import argparse

    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive widths (256,1024,4096), got {text!r}")
    return sizes


def register(sub):
    p = sub.add_parser("train", help="collect activations from a model and train an SAE on them",
                       formatter_class=HelpFormatter, description=__doc__.split("\n\n")[0])
    add_train_arguments(p)
    p.set_defaults(handler=train_command)


def add_train_arguments(p) -> None:
    """The seed's sae_train flags plus fastsae's, in both spellings."""
    from fastsae.config import ACTIVATIONS, ARCHITECTURES, OPTIMIZERS, SAEConfig

    defaults = SAEConfig(d_in=64, expansion_factor=1)
    src = p.add_argument_group("model and data")
    add_option(src, "checkpoint", default=None, help="nanochat checkpoint directory (e.g. base_checkpoints/d20)")
    add_option(src, "step", type=positive_int, default=None, help="nanochat checkpoint step (default: latest)")
    add_option(src, "model", default=None, help="local Hugging Face model directory (instead of --checkpoint)")
    add_option(src, "layer", type=int, default=None, help="block index to hook")
    add_option(src, "layers", type=layer_list, default=None,
               help="several blocks, collected from one forward pass: 0,2,4, a range 0-3, or all")
    add_option(src, "hook_points", nargs="+", default=None,
               help="hook point names or globs (e.g. 'blocks.*.hook_mlp_out'), one SAE each, instead of "
                    "--layer / --hook_type")
    add_option(src, "hook_type", choices=list(HOOK_TYPES), default=None,
               help="where in the block: resid_pre, resid_post, attn_out, mlp_in, mlp_out, mlp_hidden (attn and "
                    "mlp are the seed's names for attn_out and mlp_out) (default: resid_post; mlp_in for a "
                    "transcoder)")
    add_option(src, "output_hook_type", choices=list(HOOK_TYPES), default="mlp_out",
               help="a transcoder's target in the same block (with --hook_type its input)")
    add_option(src, "num_activations", "num_tokens", "tokens", type=positive_int, default=1_000_000,
               help="tokens to collect")
    add_option(src, "corpus", nargs="*", default=None,
               help=".txt/.jsonl files or directories (default: Python's own documentation)")
    add_option(src, "context_length", type=positive_int, default=128)
    add_option(src, "collect_batch_size", type=positive_int, default=32, help="sequences per model forward")
    add_option(src, "activations", default=None, help="train on this existing activation store directory")
    add_option(src, "target_activations", default=None,
               help="with --activations, for a transcoder: the store of its target, collected with the input")
    add_option(src, "stream", action="store_true",
               help="train straight from the model's forward, no activation store on disk (several hook points "
                    "train together from each forward; every epoch and a resume re-run the model)")
    add_option(src, "stream_window", type=positive_int, default=1 << 18,
               help="--stream: rows shuffled together (its memory: this many rows of every hook point's floats)")
    sae = p.add_argument_group("SAE and training")
    add_option(sae, "architecture", choices=ARCHITECTURES, default="sae",
               help="sae reconstructs its hook point; transcoder predicts --output_hook_type from --hook_type; "
                    "skip_transcoder adds a learned linear skip")
    add_option(sae, "activation", choices=ACTIVATIONS, default="topk")
    add_option(sae, "k", type=positive_int, default=64,
               help="active latents per token (topk; on average for batchtopk, matryoshka_batchtopk)")
    add_option(sae, "matryoshka_sizes", type=size_list, default=None,
               help="matryoshka_batchtopk: the nested prefixes' widths, e.g. 256,1024,4096 (d_sae is added "
                    "last; default 1/16, 1/8, 1/4, 1/2 and all of d_sae)")
    add_option(sae, "expansion_factor", "width", type=positive_int, default=8, help="d_sae = expansion_factor * d_in")
    add_option(sae, "batch_size", type=positive_int, default=4096, help="rows per optimisation step")
    add_option(sae, "num_epochs", type=positive_int, default=10)
    add_option(sae, "learning_rate", "lr", type=positive_float, default=None,
               help="default: automatic, from the width, the batch and the run's length (README, 'Learning rate')")
    add_option(sae, "optimizer", choices=OPTIMIZERS, default=defaults.optimizer)
    add_option(sae, "l1_coefficient", type=nonnegative_float, default=None,
               help=f"ReLU/Gated sparsity (default: {defaults.l1_coefficient})")
    add_option(sae, "target_l0", type=positive_float, default=None,
               help="jumprelu: the mean active latents per token to train towards (default: the plain L0 "
                    "penalty, which sets no L0)")
    add_option(sae, "val_split", type=fraction, default=0.1, help="fraction of shards held out for validation")
    add_option(sae, "seed", type=int, default=0)
    add_option(sae, "distribute_modules", action="store_true",
               help="under torchrun: each rank trains its own SAEs (hook point i on rank i mod world size) "
                    "instead of every rank training each SAE on its slice of the batch")
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
    created: list[Path] = []  # folders this run made, removed again if it fails before using them
    try:
        return _train(args, created)
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


def _check_arguments(args) -> None:
    if args.checkpoint and args.model:
        raise ValueError("give --checkpoint (nanochat) or --model (Hugging Face directory), not both")
    if sum(x is not None for x in (args.layer, args.layers, args.hook_points)) != 1:
        raise ValueError("give one of --layer, --layers or --hook_points")
    if args.activations and (args.checkpoint or args.model or args.corpus):
        raise ValueError("--activations trains on a store already collected: it takes no --checkpoint, --model "
                         "or --corpus")
    if args.matryoshka_sizes is not None and args.activation != "matryoshka_batchtopk":
        raise ValueError(f"--matryoshka_sizes is for --activation matryoshka_batchtopk, not {args.activation}")
    if args.target_l0 is not None and args.activation != "jumprelu":
        raise ValueError(f"--target_l0 is for --activation jumprelu, not {args.activation} (--k sets the L0 of "
                         "the TopK kinds)")
    if args.stream and args.activations:
        raise ValueError("--stream trains from the model's forward: it takes no --activations")
    if args.activations and args.layer is None:
        raise ValueError("--activations holds one hook point: give it with --layer (and --hook_type)")
    transcoder = args.architecture != "sae"
    if transcoder and args.activations and not args.target_activations:
        raise ValueError("a transcoder trains on two stores: give --target_activations (its target's store) "
                         "with --activations")
    if args.target_activations and not (transcoder and args.activations):
        raise ValueError("--target_activations is for a transcoder (--architecture transcoder) with --activations")
    if transcoder and HOOK_TYPES[_hook_type(args)] == HOOK_TYPES[args.output_hook_type]:
        raise ValueError(f"--output_hook_type must differ from --hook_type ({_hook_type(args)}): a transcoder "
                         "predicts another activation")


def _hook_type(args) -> str:
    return args.hook_type or ("mlp_in" if args.architecture != "sae" else "resid_post")


def _block_hook_point(args, layer: int) -> str:
    return f"blocks.{layer}.hook_{HOOK_TYPES[_hook_type(args)]}"


def output_hook_point(args, hook_point: str) -> str | None:
    """A transcoder's target: --output_hook_type in the block of its input; None for an SAE."""
    import re

    if args.architecture == "sae":
        return None
    match = re.match(r"blocks\.(\d+)\.hook_\w+$", hook_point)
    if match is None:
        raise ValueError(f"a transcoder's input must be a block hook point (blocks.L.hook_...), got {hook_point!r}: "
                         "its target is --output_hook_type in the same block")
    return f"blocks.{match.group(1)}.hook_{HOOK_TYPES[args.output_hook_type]}"


def hook_point_folders(args, model=None, n_layers: int | None = None) -> dict[str, Path]:
    """{hook point: output folder} of the run: layer_{L} for --layer / --layers, the hook point's
    own name for --hook_points (globs matched against the model's block hook points first, then
    its module paths)."""
    from fnmatch import fnmatchcase

    from fastsae.hooks import hook_point_map, resolve_hook_point

    out = Path(args.output_dir)
    if args.hook_points is None:
        layers = [args.layer] if args.layer is not None else args.layers
        option = "--layer" if args.layer is not None else "--layers"
        if layers == "all":
            layers = list(range(n_layers))
        for layer in layers:
            if n_layers is not None and not 0 <= layer < n_layers:
                raise ValueError(f"{option} {layer} is out of range: the model has {n_layers} layers "
                                 f"(0 to {n_layers - 1})")
        return {_block_hook_point(args, layer): out / f"layer_{layer}" for layer in layers}
    names = list(hook_point_map(model))
    modules = [name for name, _ in model.named_modules() if name]
    found: list[str] = []
    for pattern in args.hook_points:
        if any(c in pattern for c in "*?["):
            matches = [n for n in names if fnmatchcase(n, pattern)] or [n for n in modules if fnmatchcase(n, pattern)]
            if not matches:
                raise ValueError(f"--hook_points {pattern!r} matches no hook point of this model (block hook points "
                                 f"look like {names[0] if names else 'a module path'})")
        else:
            resolve_hook_point(model, pattern)  # an unknown name fails here, with the valid ones
            matches = [pattern]
        found.extend(m for m in matches if m not in found)
    return {hp: out / hp for hp in found}


def _train(args, created: list[Path]) -> int:
    import torch

    from fastsae.trainer import _writable_dir, resolve_device

    _check_arguments(args)
    if not Path(args.output_dir).exists():
        created.append(Path(args.output_dir))
    _writable_dir(args.output_dir)  # before the model loads: a typo costs no minutes
    rank, world_size = _init_distributed()
    with warnings.catch_warnings(record=True) as caught:  # one plain line, not a pointer into this file
        warnings.simplefilter("always")
        device = resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for w in caught:
        print(f"fastsae train: note: {w.message}", file=sys.stderr)
    if args.activations:
        code = _train_on_stores(args, hook_point_folders(args), None, device, rank, world_size, created)
    else:
        model, tokenizer, info = load_model(args, device)  # on every rank: each collects its share
        folders = hook_point_folders(args, model, info.n_layers)
        code = _train_on_stores(args, folders, (model, tokenizer, info), device, rank, world_size, created)
    _leave_process_group(world_size)
    return code


def _train_on_stores(args, folders: dict[str, Path], loaded, device, rank: int, world_size: int,
                     created: list[Path]) -> int:
    """Lock the folders, collect every hook point in one pass (or stream one), train each SAE."""
    from contextlib import ExitStack

    from fastsae.files import DirectoryLock
    from fastsae.store import split_store
    from fastsae.trainer import _writable_dir

    for d in (Path(args.output_dir), *folders.values()):
        if not d.exists() and d not in created:
            created.append(d)
    with ExitStack() as locks:
        for folder in folders.values():
            _writable_dir(folder)
            if rank == 0:  # one lock per run: rank 0 holds it for every rank
                locks.enter_context(DirectoryLock(folder, "fastsae train"))
        # --distribute-modules: SAE i is rank i % W's; the others train the other SAEs
        owned = [hp for i, hp in enumerate(folders) if not args.distribute_modules or i % world_size == rank]
        if args.stream:
            if args.distribute_modules and world_size > len(folders):
                raise ValueError(f"--stream --distribute_modules needs at least one SAE per rank: {len(folders)} "
                                 f"hook point(s) for {world_size} ranks")
            runs = stream_activations(args, list(folders), owned, loaded, device)
        else:
            runs = {hp: (*split_store(store, args.val_split), config, meta)
                    for hp, (store, config, meta) in collect_activations(args, folders, loaded, device, rank).items()}
        mine = {hp: runs[hp] for hp in owned}
        reports = (0 if args.distribute_modules else rank) == 0

        def trainer_of(hp):
            train, val, config, meta = mine[hp]
            return _trainer(args, folders[hp], train, val, config, meta, device, not args.distribute_modules)

        if args.stream and len(mine) > 1:  # one forward pass feeds every SAE, trained in lockstep
            from fastsae.trainer import train_together

            trainers = {hp: trainer_of(hp) for hp in mine}
            train_together(list(trainers.values()), verbose=not args.quiet, resume=args.resume,
                           max_steps=args.max_steps)
            for hp, trainer in trainers.items():
                if reports:
                    _report(args, folders[hp], hp, trainer, mine[hp][1] is not None)
        else:  # one after another, one SAE in memory at a time
            for hp in mine:
                trainer = trainer_of(hp)
                trainer.train(verbose=not args.quiet, resume=args.resume, max_steps=args.max_steps)
                if reports:
                    _report(args, folders[hp], hp, trainer, mine[hp][1] is not None)
        if world_size > 1:
            import torch.distributed as dist

            # Every rank finished before rank 0 frees the folder locks it holds for all, and
            # before any rank leaves the process group (_leave_process_group).
            dist.barrier()
    return 0


def stream_activations(args, hook_points: list[str], owned: list[str], loaded, device) -> dict:
    """{hook point: (training rows, validation rows, config, model metadata)} of the SAEs this
    rank trains (``owned``), for --stream: one stream serves every hook point (and each
    transcoder's target) side by side, and each SAE takes its columns of it (a ColumnSlice);
    under torchrun the ranks share the model's forwards and keep only their SAEs' columns. The
    first --val_split of the tokens (at most STREAM_VAL_ROWS) are held out in memory, the rest
    stream from the model."""
    from fastsae.corpus import default_corpus, load_text_corpus
    from fastsae.data import ColumnSlice, StreamSource
    from fastsae.trainer import sample_rows_needed

    model, tokenizer, info = loaded
    corpus = load_text_corpus(args.corpus) if args.corpus else default_corpus()
    targets, configs = model_configs(args, model, hook_points)  # every setting checked before the model runs
    points = [p for hp in hook_points for p in (hp, targets[hp]) if p is not None]
    spans, start = {}, 0  # each SAE's columns in the joined hook points
    for hp, config in configs.items():
        spans[hp] = (start, start + config.d_in + (config.d_out if config.is_transcoder else 0))
        start = spans[hp][1]
    kept = None if owned == hook_points else [c for hp in owned for c in range(*spans[hp])]
    settings = dict(window_rows=args.stream_window, batch_size=args.collect_batch_size,
                    context_length=args.context_length, columns=kept)
    held = min(int(args.num_activations * args.val_split), STREAM_VAL_ROWS)
    val = StreamSource(model, tokenizer, corpus, points, held, **settings).sample(held, 0) if held else None
    train = StreamSource(model, tokenizer, corpus, points, args.num_activations - held, skip_tokens=held, **settings)
    # On every rank at once: the SAEs' samples are then kept rows, read from memory.
    train.sample(max(sample_rows_needed(c) for c in configs.values()), 0)
    say(args, f"model: {info.name} ({info.n_layers} layers, d_model {info.d_model}) on {device}; streaming "
               f"{train.num_rows} tokens at {len(points)} hook point(s) through windows of {args.stream_window} rows, "
               f"{held} held out; {len(configs)} SAE(s): {args.activation}, d_sae "
               + ", ".join(str(c.d_sae) for c in configs.values()))
    meta = {"model_name": info.name, "context_size": args.context_length, "num_tokens_collected": args.num_activations,
            "corpus": {"name": getattr(corpus, "name", None), "fingerprint": getattr(corpus, "fingerprint", None)}}
    runs, start = {}, 0
    for hp in owned:  # this rank's columns, in its SAEs' order
        a, b = start, start + spans[hp][1] - spans[hp][0]
        runs[hp] = (ColumnSlice(train, a, b), None if val is None else val[:, a:b], configs[hp], meta)
        start = b
    return runs


def _trainer(args, folder: Path, train, val, config, model_meta: dict, device, data_parallel: bool):
    from fastsae.models import create_sae
    from fastsae.trainer import SAETrainer

    return SAETrainer(create_sae(config), config, train, val, device=device, save_dir=folder,
                      checkpoint_minutes=args.checkpoint_minutes, metadata=model_meta, data_parallel=data_parallel)


def _report(args, folder: Path, hook_point: str, trainer, validated: bool) -> None:
    """What a run did, on rank 0 (and the Neuronpedia export when asked)."""
    config = trainer.config
    if trainer.resumed_step is not None and trainer.resumed_step >= trainer.total_steps:
        print(f"{hook_point}: this run was already complete (step {trainer.total_steps} of "
              f"{trainer.total_steps}); nothing was trained")
    best = folder / ("best_model" if (folder / "best_model").exists() else "final_model")
    fvu = f"best val FVU {trainer.best_val_fvu:.4f}" if validated else "no validation split"
    if trainer.step < trainer.total_steps:
        print(f"stopped at step {trainer.step} of {trainer.total_steps} (--max_steps); checkpoint "
              f"{trainer.last_checkpoint}; rerun with --resume to continue")
    else:
        what = "SAE" if not config.is_transcoder else config.architecture.replace("_", " ")
        where = hook_point if not config.is_transcoder else f"{hook_point} -> {config.output_hook_point}"
        print(f"trained {config.activation} {what} d_in={config.d_in} d_sae={config.d_sae} on "
              f"{where} ({fvu}); saved to {best}")
        if args.prepare_neuronpedia:
            _prepare_neuronpedia(trainer, config, folder)


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


def _leave_process_group(world_size: int) -> None:
    """Leave the process group once every rank has finished (the barrier at the end of
    ``_train_on_stores``). A rank that exits while another still works (rank 0 writing its
    reports) tears gloo down under it, which can abort one of them."""
    if world_size > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def load_model(args, device):
    """(model, tokenizer, ModelInfo) from --checkpoint, --model or the embedded default."""
    from fastsae import sources

    if args.checkpoint:
        return sources.load_nanochat_checkpoint(args.checkpoint, step=args.step, device=device)
    if args.model:
        return sources.load_hf_model(args.model, device=device)
    return sources.load_default_model(device=device)


def sae_config(args, d_in: int, hook_point: str, output_hook_point: str | None = None, d_out: int | None = None):
    """The SAEConfig the flags describe (a bad combination, e.g. k > d_sae, fails here)."""
    from fastsae.config import SAEConfig

    extra = {name: getattr(args, name) for name in ("l1_coefficient", "target_l0") if getattr(args, name) is not None}
    if args.matryoshka_sizes is not None:
        extra["matryoshka_sizes"] = args.matryoshka_sizes
    if args.architecture != "sae":
        extra.update(architecture=args.architecture, output_hook_point=output_hook_point, d_out=d_out)
    return SAEConfig(d_in=d_in, activation=args.activation, k=args.k, expansion_factor=args.expansion_factor,
                     num_activations=args.num_activations, batch_size=args.batch_size, num_epochs=args.num_epochs,
                     learning_rate=args.learning_rate, optimizer=args.optimizer, hook_point=hook_point, seed=args.seed,
                     save_every=args.save_every, **extra)


def model_configs(args, model, hook_points) -> tuple[dict, dict]:
    """({hook point: its transcoder's target or None}, {hook point: SAEConfig}) for the model's
    widths at those hook points (a bad setting fails here)."""
    from fastsae.hooks import hook_width

    targets = {hp: output_hook_point(args, hp) for hp in hook_points}
    configs = {hp: sae_config(args, hook_width(model, hp), hp, targets[hp],
                              targets[hp] and hook_width(model, targets[hp])) for hp in hook_points}
    return targets, configs


def collect_activations(args, folders: dict[str, Path], loaded, device, rank: int = 0) -> dict:
    """{hook point: (store, config, model metadata)} (a transcoder's store is the PairedStore of
    its input and target): --activations as given, else collected into
    each folder's activations/, every hook point from the same forward passes, under torchrun
    by every rank for its share of the shards (a rerun with the same settings reuses or extends
    what is on disk). Every config is built, and so every setting checked, before the
    collection starts."""
    import torch.distributed as dist

    from fastsae.pipeline import shard_tokens
    from fastsae.store import ActivationStore, PairedStore, collect_to_stores

    if args.activations:
        (hook_point,) = folders
        store = ActivationStore(args.activations, hook_point=hook_point)
        say(args, f"activations: {store.store_dir} ({store.num_tokens} tokens of {store.manifest['model_name']} "
                   f"at {store.hook_point})")
        if args.architecture == "sae":
            return {hook_point: (store, sae_config(args, store.d_in, store.hook_point), _model_metadata(store))}
        target = ActivationStore(args.target_activations, hook_point=output_hook_point(args, hook_point))
        config = sae_config(args, store.d_in, hook_point, target.hook_point, target.d_in)
        return {hook_point: (PairedStore(store, target), config, _model_metadata(store))}
    from fastsae.corpus import default_corpus, load_text_corpus

    model, tokenizer, info = loaded
    targets, configs = model_configs(args, model, folders)
    store_dirs = {hp: folder / "activations" for hp, folder in folders.items()}
    # A transcoder's target is collected beside its input, in the same forward passes.
    store_dirs.update({targets[hp]: folder / "target_activations" for hp, folder in folders.items() if targets[hp]})
    corpus = load_text_corpus(args.corpus) if args.corpus else default_corpus()
    widths = sorted({(c.d_in, c.d_sae) for c in configs.values()})
    if rank == 0:
        say(args, f"model: {info.name} ({info.n_layers} layers, d_model {info.d_model}) on {device}; "
                   f"{len(configs)} SAE{'s' if len(configs) > 1 else ''}: {args.activation} "
                   + ", ".join(f"d_in {d} d_sae {m}" for d, m in widths))
    collect_to_stores(model, tokenizer, corpus, store_dirs, args.num_activations,
                      batch_size=args.collect_batch_size, context_length=args.context_length,
                      shard_tokens=shard_tokens(args.num_activations), model_name=info.name,
                      progress=not args.quiet, distributed=dist.is_initialized())
    del model
    runs = {}
    for hp in folders:
        store = ActivationStore(store_dirs[hp], hook_point=hp)
        data = store if targets[hp] is None else PairedStore(store, ActivationStore(store_dirs[targets[hp]]))
        runs[hp] = (data, configs[hp], _model_metadata(store))
    return runs


def _model_metadata(store) -> dict:
    """What every saved SAE's cfg.json records about where its activations came from."""
    manifest = store.manifest
    return {"model_name": manifest.get("model_name"), "context_size": manifest.get("context_length"),
            "num_tokens_collected": store.num_tokens, "corpus": manifest.get("corpus")}


def _prepare_neuronpedia(trainer, config, layer_dir: Path) -> None:
    from fastsae.neuronpedia import NeuronpediaUploader

    path = NeuronpediaUploader().prepare_sae_for_upload(trainer.raw_sae(), config, layer_dir / "neuronpedia")
    print(f"Neuronpedia export written to {path}")
