"""Transcoders on the default model's MLP, fastsae against EleutherAI's sparsify on the same
activations and batch order, both on their defaults: plain and skip transcoders. Prints, on
held-out tokens, the FVU of the MLP output, L0, dead latents (never firing on those tokens)
and the loss recovered with the prediction spliced in place of the MLP.

    python -m bench.transcoder_compare --activations /tmp/minilm_l3_mlp_360k.safetensors
    python -m bench.transcoder_compare --steps 500 --width 8 --layer 3

The rows are [MLP input | MLP output] of one block of all-MiniLM-L6-v2 (the block's
``hook_mlp_in`` and ``hook_mlp_out``), collected from the same forward passes. Both libraries
get the same k, d_sae and rows in the same order. fastsae trains with its defaults (TopK,
schedule-free Adam at its automatic learning rate, AuxK 1/8, input and target scaled to
E||.||^2 = d); sparsify its SparseCoder with ``transcode=True`` (``skip_connection`` for the
skip row) on the recipe of its Trainer (bench/sparsify_recipe.py: schedule-free Signum, W_dec
from zero, no AuxK by default). SAELens 6 has transcoder classes for inference but none it can
train, so it is not in the table. Both results are measured by the same code: sparsify's
coder is loaded into a fastsae transcoder (its encode rule is the same TopK of the ReLU
pre-activations) and run through SAEEvaluator and loss_recovered.
"""
import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from bench.quality_compare import batch_order, budget_split
from bench.sparsify_recipe import INSTALL_HINT, SparsifyRun, import_sparsify
from fastsae import SAEConfig, create_sae
from fastsae.corpus import default_corpus, iter_token_batches
from fastsae.evaluator import SAEEvaluator, loss_recovered
from fastsae.files import atomic_save_tensors
from fastsae.trainer import RUN_FRACTION_CAP, SAETrainer, split_activations

LOSS_BATCHES = 8  # batches of 32 sequences of 128 tokens, from past the tokens collected


def mlp_activations(tokens: int, layer: int, model, tokenizer) -> torch.Tensor:
    """[tokens, 2 d]: the MLP input and output of one block, from the same forward passes."""
    from fastsae.store import PairedStore, collect_to_stores

    points = (f"blocks.{layer}.hook_mlp_in", f"blocks.{layer}.hook_mlp_out")
    with tempfile.TemporaryDirectory() as tmp:
        stores = collect_to_stores(model, tokenizer, default_corpus(), {p: Path(tmp) / p for p in points}, tokens,
                                   context_length=128)
        return PairedStore(*(stores[p] for p in points)).load_all().float()


def load_rows(args, model, tokenizer) -> torch.Tensor:
    if args.activations and Path(args.activations).exists():
        return load_file(args.activations)["activations"]
    rows = mlp_activations(args.tokens, args.layer, model, tokenizer)
    if args.activations:
        atomic_save_tensors(args.activations, {"activations": rows.contiguous()})
    return rows


def train_fastsae(rows, cfg):
    trainer = SAETrainer(create_sae(cfg), cfg, rows, device="cpu", log_every=10**9)
    trainer.train(verbose=False)
    return trainer.sae.eval()  # the scales are folded in: it takes raw rows


def train_sparsify(rows, cfg):
    try:
        import_sparsify()
    except ImportError as err:
        raise SystemExit(INSTALL_HINT) from err
    steps = (len(rows) // cfg.batch_size) * cfg.num_epochs
    run = SparsifyRun(cfg.d_in, cfg.d_sae, cfg.k, "cpu", steps, "signum",
                      warmup_steps=min(cfg.warmup_steps, int(RUN_FRACTION_CAP * steps)), seed=cfg.seed,
                      transcode=True, skip_connection=cfg.architecture == "skip_transcoder")
    d = cfg.d_in
    for batch in batch_order(len(rows), cfg.batch_size, cfg.num_epochs, cfg.seed):
        run.step(rows[batch, :d], rows[batch, d:])
    run.finish()
    return as_fastsae(run.coder, cfg)


@torch.no_grad()
def as_fastsae(coder, cfg):
    """sparsify's trained coder as a fastsae transcoder of the same config (same encode rule)."""
    sae = create_sae(SAEConfig(**{**cfg.to_dict(), "learning_rate": None})).eval()
    sae.enc_weight.copy_(coder.encoder.weight)
    sae.b_enc.copy_(coder.encoder.bias)
    sae.W_dec.copy_(coder.W_dec)
    sae.b_dec.copy_(coder.b_dec)
    if coder.W_skip is not None:
        sae.W_skip.copy_(coder.W_skip)
    return sae


def measure(sae, val, model, tokenizer, skip_tokens):
    metrics = SAEEvaluator(sae).evaluate(val)
    batches = itertools.islice(iter_token_batches(tokenizer, default_corpus(), 128, 32, skip_tokens=skip_tokens),
                               LOSS_BATCHES)
    recovered = loss_recovered(model, sae, None, batches)["fraction_recovered"]
    return metrics.fvu, metrics.l0_mean, metrics.dead_latent_fraction, recovered


def main(argv=None):
    from fastsae.sources import load_default_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The default corpus holds about 406k tokens: 360k leave the rest for the loss recovered.
    p.add_argument("--tokens", type=int, default=360_000)
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--activations", help="safetensors file to cache the paired rows in (reused if present)")
    p.add_argument("--width", type=int, default=8, help="expansion factor (d_sae = width * d_in)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=4096)
    args = p.parse_args(argv)

    model, tokenizer, info = load_default_model()
    x = load_rows(args, model, tokenizer)
    d = x.shape[1] // 2
    train, val = split_activations(x, 0.1)
    rows, epochs = budget_split(train, args.steps, args.batch_size)
    hook, out = f"blocks.{args.layer}.hook_mlp_in", f"blocks.{args.layer}.hook_mlp_out"
    print(f"{info.name} {hook} -> {out}: {len(rows)} train rows ({len(rows) // args.batch_size * epochs} steps) / "
          f"{len(val)} val rows, d {d}, d_sae {d * args.width}, k {args.k}; loss recovered on {LOSS_BATCHES} x 32 "
          f"sequences after the first {len(x)} tokens")
    print(f"{'run':<34} {'val FVU':>8} {'L0':>6} {'dead':>7} {'loss rec':>9} {'time':>6}")
    for architecture in ("transcoder", "skip_transcoder"):
        cfg = SAEConfig(d_in=d, expansion_factor=args.width, k=args.k, batch_size=args.batch_size, num_epochs=epochs,
                        dtype="float32", architecture=architecture, hook_point=hook, output_hook_point=out)
        for library, train_fn in (("fastsae", train_fastsae), ("sparsify", train_sparsify)):
            start = time.perf_counter()
            sae = train_fn(rows, cfg)
            took = time.perf_counter() - start
            fvu, l0, dead, recovered = measure(sae, val, model, tokenizer, len(x))
            print(f"{library + ' ' + architecture:<34} {fvu:>8.4f} {l0:>6.1f} {100 * dead:>6.2f}% {recovered:>9.4f} "
                  f"{took:>5.0f}s", flush=True)


if __name__ == "__main__":
    main()
