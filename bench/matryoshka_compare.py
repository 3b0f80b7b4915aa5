"""Matryoshka BatchTopK, fastsae against SAELens on the same activations and batch order, both
on their defaults; plain BatchTopK (fastsae) alongside. Prints, on held-out rows, the FVU of
each dictionary prefix, L0 and the fraction of dead latents (never firing on those rows), and
the loss recovered on text past the collected tokens (with --loss_batches; MiniLM only).

    python -m bench.matryoshka_compare --activations /tmp/minilm_l3_360k.safetensors
    python -m bench.matryoshka_compare --steps 500 --width 8

Both libraries get the same prefix widths (fastsae's default: 1/16, 1/8, 1/4, 1/2 and all of
d_sae), k, d_sae and rows. fastsae trains with its defaults (schedule-free Adam at its automatic
learning rate, AuxK 1/8, inputs scaled to E||x||^2 = d_in); SAELens with its trainer's defaults
(bench/saelens_recipe.py: Adam 3e-4, no input scaling, its BatchTopK threshold) and is evaluated
as SAELens hands a run over, as the JumpReLU SAE it saves. Every SAE is evaluated at inference:
one threshold per latent, so L0 varies per token. The loss recovered runs the same fastsae code
for both: SAELens's saved SAE is read back by fastsae.load_sae (a JumpReLU SAE, the same encode).
"""
import argparse
import functools
import itertools
import tempfile
import time

import torch

from bench import saelens_recipe
from bench.quality_compare import add_activation_arguments, batch_order, budget_split, load_activations
from fastsae import SAEConfig, create_sae, load_sae, reference
from fastsae.trainer import SAETrainer, split_activations


@torch.no_grad()
def prefix_metrics(dense_code, decoder, bias, val, sizes, batch=4096):
    """(FVU of each prefix, mean L0, dead fraction) of an encoder's dense codes on val."""
    err = torch.zeros(len(sizes), dtype=torch.float64)
    fired, l0 = torch.zeros(decoder.shape[0], dtype=torch.bool), 0.0
    for x in val.split(batch):
        codes = dense_code(x)
        prefixes = reference.matryoshka_decode(codes, decoder, bias, sizes)
        err += (prefixes.double() - x.double()[:, None]).pow(2).sum((0, 2))
        fired |= (codes > 0).any(0)
        l0 += float((codes > 0).sum())
    total = (val.double() - val.double().mean(0)).pow(2).sum()
    return (err / total).tolist(), l0 / len(val), 1 - fired.float().mean().item()


def train_fastsae(activation, rows, val, cfg):
    config = SAEConfig(**{**cfg.to_dict(), "activation": activation,
                          "matryoshka_sizes": cfg.matryoshka_sizes if activation == "matryoshka_batchtopk" else None})
    trainer = SAETrainer(create_sae(config), config, rows, device="cpu")
    trainer.train(verbose=False)
    sae = trainer.raw_sae().eval()
    return prefix_metrics(lambda x: sae.encode(x), sae.W_dec, sae.b_dec, val, cfg.matryoshka_sizes), sae


def train_saelens(rows, val, cfg):
    if not saelens_recipe.have_saelens():
        raise SystemExit(saelens_recipe.INSTALL_HINT)
    steps = (len(rows) // cfg.batch_size) * cfg.num_epochs
    run = saelens_recipe.SAELensMatryoshkaRun(cfg.d_in, cfg.d_sae, cfg.k, "cpu", cfg.batch_size, total_steps=steps,
                                              seed=cfg.seed, widths=cfg.matryoshka_sizes)
    for batch in batch_order(len(rows), cfg.batch_size, cfg.num_epochs, cfg.seed):
        run.step(rows[batch])
    run.finish()
    sae = run.inference_sae
    metrics = prefix_metrics(run.dense_codes, sae.W_dec.detach(), sae.b_dec.detach(), val, cfg.matryoshka_sizes)
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_model(tmp)  # the inference SAE SAELens saved, read back by fastsae
        return metrics, load_sae(tmp).eval()


@functools.lru_cache(maxsize=1)
def _minilm():
    from fastsae.sources import load_default_model

    return load_default_model()


def loss_recovered_on_fresh_text(sae, args, skip_tokens: int) -> float:
    """The fraction of MiniLM's loss recovered with the SAE at the hook point, on
    --loss_batches batches of 32 sequences after the first skip_tokens tokens of the corpus."""
    from fastsae.corpus import default_corpus, iter_token_batches
    from fastsae.evaluator import loss_recovered

    model, tokenizer, _ = _minilm()  # loaded once for the three runs
    batches = itertools.islice(iter_token_batches(tokenizer, default_corpus(), 128, 32, skip_tokens=skip_tokens),
                               args.loss_batches)
    return loss_recovered(model, sae, f"blocks.{args.layer}.hook_resid_post", batches)["fraction_recovered"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The default corpus holds about 406k tokens: 360k leave the rest for the loss recovered.
    add_activation_arguments(p, tokens=360_000)
    p.add_argument("--width", type=int, default=8, help="expansion factor (d_sae = width * d_in)")
    p.add_argument("--steps", type=int, default=178)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=4096)
    p.add_argument("--loss_batches", type=int, default=8,
                   help="batches of 32 x 128 tokens for the loss recovered, past --tokens (0: none)")
    args = p.parse_args(argv)

    x = load_activations(args)
    train, val = split_activations(x, 0.1)
    rows, epochs = budget_split(train, args.steps, args.batch_size)
    cfg = SAEConfig(d_in=x.shape[1], expansion_factor=args.width, k=args.k, batch_size=args.batch_size,
                    num_epochs=epochs, dtype="float32", activation="matryoshka_batchtopk")
    steps = (len(rows) // cfg.batch_size) * epochs
    print(f"{len(rows)} train rows ({steps} steps) / {len(val)} val rows of width {x.shape[1]}, d_sae {cfg.d_sae}, "
          f"k {cfg.k}; prefixes {list(cfg.matryoshka_sizes)}")
    print(f"{'run':<34} {'prefix FVUs':<44} {'L0':>6} {'dead':>7} {'loss rec':>9} {'time':>6}")
    runs = [("fastsae matryoshka_batchtopk", lambda: train_fastsae("matryoshka_batchtopk", rows, val, cfg)),
            ("fastsae batchtopk (not nested)", lambda: train_fastsae("batchtopk", rows, val, cfg)),
            ("saelens matryoshka_batchtopk", lambda: train_saelens(rows, val, cfg))]
    for label, run in runs:
        start = time.perf_counter()
        (fvus, l0, dead), sae = run()
        took = time.perf_counter() - start
        use_model = args.loss_batches > 0 and not args.synthetic
        recovered = loss_recovered_on_fresh_text(sae, args, len(x)) if use_model else float("nan")
        print(f"{label:<34} {' '.join(f'{f:.4f}' for f in fvus):<44} {l0:>6.1f} {100 * dead:>6.2f}% "
              f"{recovered:>9.4f} {took:>5.0f}s", flush=True)


if __name__ == "__main__":
    main()
