"""``fastsae eval``: evaluate SAEs on real activations of their model, with the downstream loss
recovered, and optionally write feature dashboards and a Neuronpedia export.

The model is a nanochat checkpoint (``--checkpoint``), a local Hugging Face model (``--model``)
or, with neither, the embedded all-MiniLM-L6-v2. Text is ``--texts`` files or the default
corpus (Python's own documentation). With ``--store``, the activations come from an activation
store directory instead, and a model is loaded only if given (for the loss recovered).
Results go to ``{output_dir}/layer_{L}/``.
"""
from __future__ import annotations

import argparse
import itertools
import re
import sys
from pathlib import Path

from fastsae.cli_args import HelpFormatter, add_option, nonnegative_int, positive_int, say

_opt = add_option  # both spellings, so the seed's scripts (underscores) share these parsers


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Where activations come from: model, text, how many tokens."""
    _opt(parser, "checkpoint", default=None, help="nanochat checkpoint directory (e.g. base_checkpoints/d20)")
    _opt(parser, "step", type=positive_int, default=None, help="nanochat checkpoint step (default: latest)")
    _opt(parser, "model", default=None, help="local Hugging Face model directory (default: embedded MiniLM)")
    _opt(parser, "texts", nargs="*", default=None, help=".txt/.jsonl files (default: Python's documentation)")
    _opt(parser, "layer", type=int, default=None,
         help="--sae_dir: only this layer's SAE; --sae_path: apply it at this layer")
    _opt(parser, "hook_point", default=None, help="override the SAE's hook point")
    _opt(parser, "num_tokens", "num_activations", "tokens", type=positive_int, default=20_000,
         help="tokens of activations to use")
    _opt(parser, "skip_tokens", type=nonnegative_int, default=None,
         help="tokens of the text to skip first (default: the tokens the SAE was trained on, when it was "
              "trained on this text, so the evaluation is held out)")
    _opt(parser, "context_length", type=positive_int, default=128)
    _opt(parser, "batch_size", type=positive_int, default=16, help="sequences per forward pass")
    _opt(parser, "device", default=None, help="default: cuda if available")
    _opt(parser, "output_dir", default="sae_eval", help="where results are written")
    _opt(parser, "quiet", action="store_true", help="no progress bars")


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate SAEs on real model activations (metrics, loss recovered, dashboards)",
                       formatter_class=HelpFormatter)
    add_arguments(p)
    p.set_defaults(handler=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    _opt(group, "sae_path", help="one SAE (directory or .pt)")
    _opt(group, "sae_dir", help="a directory of SAEs (layer_*/...)")
    add_source_arguments(p)
    _opt(p, "store_dir", "store", default=None,
                   help="evaluate on the activations in this activation store directory (the first --num_tokens, "
                        "in store order) instead of running the model; a model (--checkpoint / --model) is then "
                        "only loaded if given, for the loss recovered and the dashboards' token text")
    _opt(p, "generate_dashboards", action="store_true", help="also write HTML feature dashboards")
    _opt(p, "max_features", type=positive_int, default=256, help="dashboard pages for this many features")
    add_showcase_option(p)
    _opt(p, "neuronpedia", action="store_true", help="also write a Neuronpedia export")
    _opt(p, "loss_batches", type=nonnegative_int, default=4, help="batches for the loss-recovered test (0 to skip)")


# ----------------------------------------------------------------------------- shared steps

def device_of(args) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_source(args):
    """(model, tokenizer, name) from --checkpoint, --model or the embedded default."""
    from fastsae import sources

    if args.checkpoint and args.model:
        raise ValueError("give --checkpoint or --model, not both")
    if args.checkpoint:
        model, tok, info = sources.load_nanochat_checkpoint(args.checkpoint, args.step, device_of(args))
    elif args.model:
        model, tok, info = sources.load_hf_model(args.model, device_of(args))
    else:
        model, tok, info = sources.load_default_model(device_of(args))
    say(args, f"model: {info.name} ({info.n_layers} layers, d_model {info.d_model}) on {device_of(args)}")
    return model, tok, info.name


def load_texts(args):
    from fastsae.corpus import default_corpus, load_text_corpus

    return load_text_corpus(args.texts) if args.texts else default_corpus()


def with_layer(hook_point: str, layer: int | None) -> str:
    return hook_point if layer is None else re.sub(r"^blocks\.\d+\.", f"blocks.{layer}.", hook_point)


def load_selected_saes(args) -> dict:
    """{hook_point: sae} from --sae_path or --sae_dir, filtered / re-pointed by --layer and --hook_point."""
    from fastsae.config import check_hook_point
    from fastsae.io import load_sae, load_saes

    if args.sae_path:
        sae = load_sae(args.sae_path, device_of(args))
        hook_point = args.hook_point or with_layer(sae.config.hook_point, args.layer)
        sae.config.hook_point = check_hook_point(hook_point, "--hook_point")
        if sae.config.is_transcoder:  # --layer moves its output with it
            sae.config.output_hook_point = with_layer(sae.config.output_hook_point, args.layer)
        return {sae.config.hook_point: sae}
    saes = load_saes(args.sae_dir, device_of(args))
    if args.layer is not None:
        saes = {h: s for h, s in saes.items() if h.startswith(f"blocks.{args.layer}.")}
    if not saes:
        where = f" for layer {args.layer}" if args.layer is not None else ""
        raise ValueError(f"no SAE found in {args.sae_dir}{where}")
    return saes


def out_dir(args, hook_point: str, together=()) -> Path:
    """{output_dir}/layer_{L}, or the hook point's own name where another hook point evaluated
    ``together`` with it is at the same block (as ``fastsae train --hook_points`` names them)."""
    layer = re.match(r"blocks\.(\d+)\.", hook_point)
    shared = layer is not None and any(h != hook_point and h.startswith(layer.group(0)) for h in together)
    name = f"layer_{layer.group(1)}" if layer and not shared else re.sub(r"[^\w.-]", "_", hook_point)
    return Path(args.output_dir) / name


def activations_for(args, model, tokenizer, hook_point: str, sae=None, texts=None):
    """Activations of the text (default: load_texts) at the hook point, past what the SAE was
    trained on (see held_out_skip)."""
    from fastsae.latent_cache import collect_activations

    texts = texts if texts is not None else load_texts(args)
    skip, where = held_out_skip(args, texts, sae)
    say(args, f"text: {texts.name}, {where}")
    if sae is not None and sae.config.is_transcoder:  # [input | target] rows, as the transcoder trained on
        hook_point = (hook_point, sae.config.output_hook_point)
    return collect_activations(model, tokenizer, texts, hook_point, args.num_tokens, args.context_length,
                               args.batch_size, progress=True, skip_tokens=skip)


def held_out_skip(args, texts, sae) -> tuple[int, str]:
    """(tokens to skip, a phrase saying which tokens are evaluated). An SAE trained by fastsae
    records its corpus and how many tokens it was trained on; on that same corpus, they are
    skipped unless --skip_tokens says otherwise."""
    if args.skip_tokens is not None:
        return args.skip_tokens, f"from token {args.skip_tokens} (--skip_tokens)"
    meta = getattr(sae, "metadata", None) or {}
    trained_on, count = meta.get("corpus") or {}, meta.get("num_tokens_collected")
    if not trained_on or count is None:
        return 0, "from its start (the SAE records no training text)"
    if trained_on.get("fingerprint") != getattr(texts, "fingerprint", None):
        return 0, f"from its start (the SAE was trained on another text, {trained_on.get('name')})"
    return int(count), f"held out: past the first {count} tokens, which the SAE was trained on"


def open_store(args, saes: dict):
    """(store, SAEs to evaluate on it) for --store. A store holds one hook point: --sae_dir keeps
    the SAEs at that hook point, and any other SAE is an error rather than a meaningless FVU."""
    from fastsae.store import ActivationStore

    # An interrupted collection is still a valid prefix of tokens; evaluating on it is fine.
    store = ActivationStore(args.store_dir, allow_incomplete=True)
    if args.sae_dir:
        found = sorted(saes)
        saes = {h: s for h, s in saes.items() if h == store.hook_point}
        if not saes:
            raise ValueError(f"--store {args.store_dir} holds activations at hook point {store.hook_point!r}; "
                             f"no SAE in {args.sae_dir} is at it (found {found})")
    for hook_point, sae in saes.items():
        if sae.config.is_transcoder:
            raise ValueError(f"--store holds one hook point; the transcoder at {hook_point!r} also needs "
                             f"{sae.config.output_hook_point!r}: evaluate it from the model (--checkpoint or --model)")
        if hook_point != store.hook_point:
            raise ValueError(f"--store {args.store_dir} holds activations at hook point {store.hook_point!r}, "
                             f"but the SAE is at {hook_point!r} (--hook_point or --layer re-point the SAE)")
        if sae.d_in != store.d_in:
            raise ValueError(f"--store {args.store_dir} has d_in={store.d_in}, but the SAE expects d_in={sae.d_in}")
    if not store.manifest["complete"]:
        print(f"note: --store {args.store_dir} is incomplete ({store.num_tokens} of "
              f"{store.manifest['max_tokens']} tokens collected); using what it holds", file=sys.stderr)
    return store, saes


def store_activations(store, num_tokens: int):
    """(activations, metadata) of the store's first num_tokens tokens in store order, read
    through the store's block reader so that only the shards holding them are read."""
    if num_tokens <= 0:
        raise ValueError(f"--num_tokens must be positive, got {num_tokens}")
    acts, meta = next(store.iter_batches(num_tokens, shuffle=False, with_metadata=True, buffer_tokens=num_tokens))
    return acts, {k: meta[k] for k in ("token_ids", "doc_ids", "positions")}


def add_showcase_option(p) -> None:
    from fastsae.feature_viz import SHOWCASE_MODES

    _opt(p, "features", dest="showcase", choices=SHOWCASE_MODES, default="spread",
         help="which features get pages: spread over density bands, most readable first (the densest 5%% "
              "skipped); sparse; dense (most frequent first); all")


# ----------------------------------------------------------------------------- the command

def evaluate_one(args, sae, hook_point, model, tokenizer, model_name, store=None, together=()) -> dict:
    """Metrics of one SAE on the store's activations when a store is given, else on the model's;
    the loss recovered (and readable tokens in dashboards) need the model, which --store may lack."""
    from fastsae.corpus import iter_token_batches
    from fastsae.evaluator import SAEEvaluator, loss_recovered
    from fastsae.files import atomic_write_json

    texts = load_texts(args) if store is None or model is not None else None  # read once, used twice
    if store is not None:
        acts, meta = store_activations(store, args.num_tokens)
    else:
        acts, meta = activations_for(args, model, tokenizer, hook_point, sae, texts)
    metrics = SAEEvaluator(sae).evaluate(acts)
    notes = []
    if args.loss_batches > 0 and model is None:
        notes.append("loss recovered: skipped, it runs the model (give --checkpoint or --model with --store)")
    elif args.loss_batches > 0:
        skip, _ = held_out_skip(args, texts, sae)
        batches = itertools.islice(iter_token_batches(tokenizer, texts, args.context_length,
                                                      args.batch_size, skip_tokens=skip), args.loss_batches)
        metrics.loss_recovered = loss_recovered(model, sae, hook_point, batches)
    out = out_dir(args, hook_point, together)
    result = {"hook_point": hook_point, "model": model_name, **metrics.to_dict()}
    if store is not None:
        result["store"] = str(store.store_dir)
    atomic_write_json(out / "eval_metrics.json", result)
    print("\n".join([f"== {hook_point} ({model_name}, {metrics.num_tokens} tokens)", str(metrics), *notes]))
    if args.generate_dashboards or args.neuronpedia:
        if model is None:
            print("no model given: feature pages show token ids, not text, and no output-token effects")
        write_views(args, sae, acts, meta, model, tokenizer, out, top_n=args.max_features, metrics=result,
                    model_name=model_name)
    return result


def write_views(args, sae, acts, meta, model, tokenizer, out: Path, top_n: int | None, metrics=None,
                features: list[int] | None = None, model_name: str = "model") -> None:
    """Dashboard (and Neuronpedia export when asked) from one latent cache."""
    from fastsae.feature_viz import showcase_features, unembedding, write_dashboard
    from fastsae.latent_cache import LatentCache

    cache = LatentCache.from_activations(sae, acts, **meta)
    cache.save(out / "latent_cache.safetensors")  # LatentCache.load() gives every view back without the model
    if features is None:
        features = showcase_features(cache, top_n or 0, "all" if top_n is None else args.showcase)
    W_U = unembedding(model)
    metrics = metrics or {}
    summary = {k: metrics[k] for k in ("mse_loss", "fvu", "l0_mean", "dead_latent_fraction") if k in metrics}
    if metrics.get("loss_recovered"):
        summary["loss recovered"] = metrics["loss_recovered"]["fraction_recovered"]
    index = write_dashboard(cache, out / "dashboard", sae, tokenizer, W_U, features, summary=summary,
                            progress=True, model_name=model_name)
    print(f"dashboard: {index} ({len(features)} features)")
    if getattr(args, "neuronpedia", False):
        from fastsae.neuronpedia import NeuronpediaUploader

        export = NeuronpediaUploader(model_name=model_name, model_version="").prepare_sae_for_upload(
            sae, sae.config, out / "neuronpedia", metadata={"evaluation": metrics}, cache=cache,
            tokenizer=tokenizer, W_U=W_U, features=features)
        print(f"neuronpedia export: {export}")


def run(args) -> int:
    from fastsae.progress import set_quiet
    from fastsae.store import model_fingerprint

    set_quiet(args.quiet)
    try:
        saes = load_selected_saes(args)
        store = None
        if args.store_dir:
            store, saes = open_store(args, saes)
        if store is None:
            model, tokenizer, model_name = load_source(args)
        elif args.checkpoint or args.model:
            model, tokenizer, model_name = load_source(args)
            if model_fingerprint(model) != store.manifest["model_fingerprint"]:
                print(f"note: --store {args.store_dir} was collected from another model "
                      f"({store.manifest['model_name']}); the loss recovered is measured on {model_name}",
                      file=sys.stderr)
        else:  # the activations are on disk: no model to load
            model, tokenizer, model_name = None, None, store.manifest["model_name"]
        for hook_point, sae in saes.items():
            evaluate_one(args, sae, hook_point, model, tokenizer, model_name, store, together=list(saes))
    except (ValueError, OSError, ImportError, RuntimeError) as e:
        print(f"fastsae eval: error: {e}", file=sys.stderr)
        return 2
    return 0
