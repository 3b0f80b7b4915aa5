"""Train fastsae's TopK trainer, EleutherAI's sparsify and SAELens on the same activations; print
validation FVU and the fraction of dead latents (never firing on the validation set) of each.

    python -m bench.quality_compare                     # MiniLM layer 3, Python docs corpus, 100 steps
    python -m bench.quality_compare --budgets 100 500 2000 --widths 8 32 --device cuda
    python -m bench.quality_compare --synthetic         # a known sparse dictionary, no model
    python -m bench.quality_compare --libraries saelens # any of fastsae sparsify saelens

sparsify trains its own ``SparseCoder`` with the recipe of its ``Trainer`` (see
bench/sparsify_recipe.py) on the same rows in the same order as fastsae, with its default
optimizer (schedule-free Signum) or ``--sparsify_optimizer adam``. AuxK is off in sparsify by
default; ``--sparsify_auxk`` turns it on at fastsae's weight (1/8) and dead threshold.

SAELens (``--libraries ... saelens``) trains its ``TopKTrainingSAE`` with its own ``SAETrainer``
and all its defaults (bench/saelens_recipe.py); only d_in, d_sae, k, the batch rows and their
order and the number of steps are matched. It is evaluated as SAELens hands a run over: converted
to its inference ``TopKSAE`` (decoder norms folded in) and run through its encode and decode in
eval mode. ``--saelens_lr`` replaces its learning rate (the result line says "set lr"). Where
its defaults differ from the others' in ways that matter for quality:

* no input normalisation (``normalize_activations="none"``; fastsae scales inputs to
  E||x||^2 = d_in and folds the scale back in). SAELens's loss is the MSE summed over features,
  so the raw activation scale sets the gradient size that ``clip_grad_norm_(1.0)`` clips;
* b_dec starts at zero (fastsae: the geometric median of a sample; sparsify: the first batch's
  mean), and b_dec is subtracted from the input before encoding;
* decoder rows start at norm 0.1 (Anthropic's April 2024 heuristic) with W_enc = W_dec.T and are
  never renormalised: the pre-activations are scaled by the decoder row norms instead
  (``rescale_acts_by_decoder_norm``), and no decoder-parallel gradient is removed;
* Adam at a constant lr of 3e-4 with no warmup or decay (fastsae: schedule-free Adam at its
  automatic learning rate, with warmup);
* AuxK at coefficient 1 (fastsae: 1/8) on k_aux = d_in / 2 latents, but a latent only counts
  as dead after 1000 steps without firing, so runs shorter than 1000 steps never use AuxK.
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from bench import saelens_recipe
from bench.sparsify_recipe import INSTALL_HINT, SparsifyRun, import_sparsify
from fastsae import SAEConfig, create_sae
from fastsae.files import atomic_save_tensors
from fastsae.trainer import DEAD_FRACTION_CAP, RUN_FRACTION_CAP, SAETrainer, split_activations

LIBRARIES = ("fastsae", "sparsify", "saelens")


def minilm_activations(tokens: int, layer: int) -> torch.Tensor:
    from fastsae.corpus import default_corpus
    from fastsae.sources import load_default_model
    from fastsae.store import collect_to_store

    model, tokenizer, info = load_default_model()
    with tempfile.TemporaryDirectory() as tmp:
        store = collect_to_store(model, tokenizer, default_corpus(), f"blocks.{layer}.hook_resid_post", tmp, tokens,
                                 context_length=128, model_name=info.name)
        return store.load_all().float()


def synthetic_activations(tokens: int, d_in: int = 384, features: int = 3072, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(features, d_in, generator=gen), dim=1)
    active = torch.rand(tokens, features, generator=gen) < 20 / features
    return (active * (0.5 + torch.rand(tokens, features, generator=gen))) @ dirs


@torch.no_grad()
def fvu_and_dead(encode_decode, val: torch.Tensor, d_sae: int, batch: int = 4096):
    """Validation FVU (one denominator over all rows) and the fraction of latents never firing."""
    err, fired = 0.0, torch.zeros(d_sae, dtype=torch.bool)
    for x in val.split(batch):
        recon, indices, values = encode_decode(x)
        err += (recon.cpu().double() - x.double()).pow(2).sum().item()
        fired[indices[values > 0].cpu()] = True
    return err / (val.double() - val.double().mean(0)).pow(2).sum().item(), 1 - fired.float().mean().item()


def batch_order(num_rows: int, batch_size: int, epochs: int, seed: int):
    """The row indices of every step: a fresh seeded permutation per epoch (as fastsae's trainer)."""
    per_epoch = num_rows // batch_size
    for epoch in range(epochs):
        perm = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for step in range(per_epoch):
            yield perm[step * batch_size:(step + 1) * batch_size]


def fit_and_evaluate(run, train, val, cfg, device):
    """Step another library's run (SparsifyRun, SAELensRun) over fastsae's batch order, end its
    training as that library does, and return its (validation FVU, dead fraction)."""
    for rows in batch_order(len(train), cfg.batch_size, cfg.num_epochs, cfg.seed):
        run.step(train[rows].to(device))
    run.finish()
    return fvu_and_dead(run.encode_decode, val, cfg.d_sae)


def train_sparsify(train, val, cfg, device, optimizer="signum", auxk=False):
    try:
        import_sparsify()
    except ImportError as err:
        raise SystemExit(INSTALL_HINT) from err
    steps = (len(train) // cfg.batch_size) * cfg.num_epochs
    run = SparsifyRun(cfg.d_in, cfg.d_sae, cfg.k, device, steps, optimizer,
                      warmup_steps=min(cfg.warmup_steps, int(RUN_FRACTION_CAP * steps)),
                      auxk_alpha=cfg.aux_k_coefficient if auxk else 0.0,
                      dead_after_tokens=min(cfg.dead_tokens_threshold, int(DEAD_FRACTION_CAP * steps * cfg.batch_size)),
                      seed=cfg.seed)
    return fit_and_evaluate(run, train, val, cfg, device), steps


def train_saelens(train, val, cfg, device, lr=None):
    if not saelens_recipe.have_saelens():
        raise SystemExit(saelens_recipe.INSTALL_HINT)
    steps = (len(train) // cfg.batch_size) * cfg.num_epochs
    run = saelens_recipe.SAELensRun(cfg.d_in, cfg.d_sae, cfg.k, device, cfg.batch_size, total_steps=steps,
                                    seed=cfg.seed, lr=lr)
    return fit_and_evaluate(run, train, val, cfg, device), steps, run.lr


def fastsae_encode_decode(trainer: SAETrainer, device):
    """``fvu_and_dead``'s encode_decode for a trainer's SAE after train() (the input scale is
    folded in: it takes raw activations): (reconstruction, indices, values)."""
    sae = trainer.sae.eval()

    @torch.no_grad()
    def encode_decode(x):
        out = sae.loss(x.to(device))
        values, indices = out["code"].flat()
        return out["reconstruction"], indices, values

    return encode_decode


def train_fastsae(train, val, cfg, device):
    trainer = SAETrainer(create_sae(cfg), cfg, train, device=device, log_every=10**9)
    trainer.train(verbose=False)
    return fvu_and_dead(fastsae_encode_decode(trainer, device), val, cfg.d_sae), trainer.total_steps


def load_activations(args) -> torch.Tensor:
    """The activations to compare on; with --activations, cached there (and read back if present)."""
    if args.activations and Path(args.activations).exists():
        return load_file(args.activations)["activations"]
    x = synthetic_activations(args.tokens) if args.synthetic else minilm_activations(args.tokens, args.layer)
    if args.activations:
        atomic_save_tensors(args.activations, {"activations": x.contiguous()})
    return x


def budget_split(train: torch.Tensor, steps: int, batch_size: int) -> tuple[torch.Tensor, int]:
    """(training rows, epochs) for a run of about ``steps`` steps: one pass over the first
    steps * batch rows when the data has them, else as many epochs as it takes."""
    epochs = max(1, round(steps * batch_size / len(train)))
    return train[:min(len(train), steps * batch_size // epochs)], epochs


def run_library(library: str, train, val, cfg, args) -> tuple[str, float, float, int]:
    """(label, validation FVU, dead fraction, steps) of one library on its defaults (or the
    labelled tuned setting a flag asks for)."""
    if library == "fastsae":
        (fvu, dead), steps = train_fastsae(train, val, cfg, args.device)
        label = "fastsae" if cfg.learning_rate is None else f"fastsae (tuned lr {cfg.learning_rate:g})"
        return label, fvu, dead, steps
    if library == "sparsify":
        (fvu, dead), steps = train_sparsify(train, val, cfg, args.device, args.sparsify_optimizer, args.sparsify_auxk)
        label = "sparsify" if args.sparsify_optimizer == "signum" and not args.sparsify_auxk else \
            f"sparsify (tuned: {args.sparsify_optimizer}{', auxk' if args.sparsify_auxk else ''})"
        return label, fvu, dead, steps
    (fvu, dead), steps, lr = train_saelens(train, val, cfg, args.device, args.saelens_lr)
    return ("saelens" if args.saelens_lr is None else f"saelens (tuned lr {lr:g})"), fvu, dead, steps


def add_activation_arguments(p, tokens: int = 450_000) -> None:
    """The flags ``load_activations`` reads: which activations, and where they are cached."""
    p.add_argument("--tokens", type=int, default=tokens)
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--synthetic", action="store_true")
    p.add_argument("--activations", help="safetensors file to cache the activations in (reused if present)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_activation_arguments(p)
    p.add_argument("--widths", type=int, nargs="+", default=[8], help="expansion factors (d_sae = width * d_in)")
    p.add_argument("--budgets", type=int, nargs="+", default=[100], help="training steps of each run")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=None, help="a tuned fastsae learning rate (default: its automatic one)")
    p.add_argument("--sparsify_optimizer", choices=["signum", "adam"], default="signum")
    p.add_argument("--sparsify_auxk", action="store_true")
    p.add_argument("--saelens_lr", type=float, help="a tuned SAELens learning rate (default: its own, 3e-4)")
    p.add_argument("--libraries", nargs="+", choices=LIBRARIES, default=["fastsae", "sparsify", "saelens"],
                   help="the libraries to train, in this order")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    x = load_activations(args)
    train, val = split_activations(x, 0.1)
    print(f"{len(train)} train / {len(val)} val rows of width {x.shape[1]}, k {args.k}, batch {args.batch_size}")
    print(f"{'library':<28} {'d_sae':>6} {'steps':>6} {'val FVU':>8} {'dead':>7} {'time':>6}")
    for width in args.widths:
        for budget in args.budgets:
            rows, epochs = budget_split(train, budget, args.batch_size)
            cfg = SAEConfig(d_in=x.shape[1], expansion_factor=width, k=args.k, batch_size=args.batch_size,
                            num_epochs=epochs, learning_rate=args.lr, dtype="float32")
            for library in dict.fromkeys(args.libraries):
                start = time.perf_counter()
                label, fvu, dead, steps = run_library(library, rows, val, cfg, args)
                print(f"{label:<28} {cfg.d_sae:>6} {steps:>6} {fvu:>8.4f} {100 * dead:>6.2f}% "
                      f"{time.perf_counter() - start:>5.0f}s", flush=True)


if __name__ == "__main__":
    main()
