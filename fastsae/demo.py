"""The main job in one call: collect, train, evaluate, visualise, export.

On the embedded default (all-MiniLM-L6-v2 and the offline corpus of Python's own docs) the
default run fits in a few minutes on two CPU cores. Rerunning reuses the cached activations.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastsae.config import SAEConfig
from fastsae.files import atomic_write_json


@dataclass
class DemoSettings:
    output_dir: str = "fastsae_demo"
    layer: int = 3
    k: int = 32
    expansion_factor: int = 8
    max_tokens: int = 150_000
    num_epochs: int = 4
    batch_size: int = 1024
    learning_rate: float | None = None  # automatic (trainer.auto_learning_rate)
    context_length: int = 128
    model: str | None = None  # a local Hugging Face model directory
    checkpoint: str | None = None  # a nanochat checkpoint directory
    device: str = "cpu"
    eval_documents: int = 64
    dashboard_features: int = 64
    features: str = "spread"  # which features the dashboard and export show (feature_viz.showcase_features)
    seed: int = 0


def load_source(settings: DemoSettings):
    """(model, tokenizer, info) for the chosen source: nanochat, Hugging Face, or the default."""
    from fastsae import sources

    if settings.checkpoint:
        return sources.load_nanochat_checkpoint(settings.checkpoint, device=settings.device)
    if settings.model:
        return sources.load_hf_model(settings.model, device=settings.device)
    return sources.load_default_model(device=settings.device)


def collect(settings: DemoSettings, model, tokenizer, info, hook_point: str):
    """Activations at the hook, streamed to (or resumed from) the store under output_dir."""
    from fastsae.corpus import default_corpus
    from fastsae.store import collect_to_store

    return collect_to_store(model, tokenizer, default_corpus(), hook_point, Path(settings.output_dir) / "activations",
                            settings.max_tokens, batch_size=32, context_length=settings.context_length,
                            dtype=torch.float32, model_name=info.name)


def demo_config(settings: DemoSettings, d_in: int, hook_point: str) -> SAEConfig:
    return SAEConfig(d_in=d_in, expansion_factor=settings.expansion_factor, k=settings.k, activation="topk",
                     dtype="float32", hook_point=hook_point, batch_size=settings.batch_size,
                     num_activations=settings.max_tokens,
                     num_epochs=settings.num_epochs, learning_rate=settings.learning_rate, seed=settings.seed)


def train(settings: DemoSettings, activations: torch.Tensor, config: SAEConfig):
    from fastsae.trainer import train_sae_from_activations

    save_dir = Path(settings.output_dir) / "sae" / f"layer_{settings.layer}"
    sae, trainer = train_sae_from_activations(activations, config, val_split=0.05, device=settings.device,
                                              save_dir=save_dir, verbose=True)
    return sae, config, trainer, save_dir


def evaluation_documents(settings: DemoSettings, tokenizer):
    """Token batches for the downstream (spliced-in) test: the corpus's last documents."""
    from fastsae.corpus import Corpus, default_corpus, iter_token_batches

    docs = list(default_corpus())[-settings.eval_documents:]
    return list(iter_token_batches(tokenizer, Corpus("eval", lambda: iter(docs), "eval"), settings.context_length, 16))


def evaluate(settings, model, tokenizer, sae, config, activations, hook_point):
    from fastsae.evaluator import SAEEvaluator, loss_recovered

    metrics = SAEEvaluator(sae, config).evaluate(activations, batch_size=4096)
    metrics.loss_recovered = loss_recovered(model, sae, hook_point, evaluation_documents(settings, tokenizer))
    return metrics


def run_demo(settings: DemoSettings | None = None) -> dict:
    """Run every stage and return the summary (also written to output_dir/metrics.json)."""
    from fastsae.feature_viz import showcase_features, write_dashboard
    from fastsae.latent_cache import LatentCache
    from fastsae.neuronpedia import NeuronpediaUploader

    settings = settings or DemoSettings()
    out = Path(settings.output_dir)
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    model, tokenizer, info = load_source(settings)
    if not 0 <= settings.layer < info.n_layers:
        raise ValueError(f"layer must be in [0, {info.n_layers}) for {info.name}, got {settings.layer}")
    hook_point = f"blocks.{settings.layer}.hook_resid_post"
    config = demo_config(settings, info.d_model, hook_point)  # a bad k or width fails before collecting
    store = collect(settings, model, tokenizer, info, hook_point)
    activations = store.load_all().float()
    sae, config, trainer, save_dir = train(settings, activations, config)
    metrics = evaluate(settings, model, tokenizer, sae, config, activations, hook_point)

    cache = LatentCache.from_store(sae, store)
    shown = showcase_features(cache, settings.dashboard_features, settings.features)
    dashboard = write_dashboard(cache, out / "dashboard", sae=sae, tokenizer=tokenizer, features=shown,
                                model_name=info.name, progress=True)
    export = NeuronpediaUploader(model_name=info.name, model_version=f"layer{settings.layer}").prepare_sae_for_upload(
        sae, config, out / "neuronpedia", cache=cache, tokenizer=tokenizer, features=shown)

    summary = {
        "model": info.name, "hook_point": hook_point, "tokens": int(activations.shape[0]),
        "d_in": config.d_in, "d_sae": config.d_sae, "k": config.k,
        "fvu": metrics.fvu, "explained_variance": metrics.explained_variance, "l0": metrics.l0_mean,
        "dead_fraction": metrics.dead_latent_fraction,
        "loss_recovered": (metrics.loss_recovered or {}).get("fraction_recovered"),
        "train_steps": trainer.step, "seconds": round(time.perf_counter() - started, 1),
        "sae_dir": str(save_dir / "best_model"), "dashboard": str(dashboard), "neuronpedia": str(export),
    }
    atomic_write_json(out / "metrics.json", {"summary": summary, "metrics": metrics.to_dict()})
    return summary


def summary_table(summary: dict) -> str:
    rows = [("model", summary["model"]), ("hook point", summary["hook_point"]),
            ("tokens", f"{summary['tokens']:,}"), ("SAE", f"d_sae={summary['d_sae']}, k={summary['k']}"),
            ("FVU", f"{summary['fvu']:.4f}"), ("L0", f"{summary['l0']:.1f}"),
            ("dead latents", f"{100 * summary['dead_fraction']:.2f}%"),
            ("loss recovered", "n/a" if summary["loss_recovered"] is None else f"{summary['loss_recovered']:.3f}"),
            ("time", f"{summary['seconds']} s"), ("SAE", summary["sae_dir"]),
            ("Neuronpedia export", summary["neuronpedia"]), ("dashboard", summary["dashboard"])]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
