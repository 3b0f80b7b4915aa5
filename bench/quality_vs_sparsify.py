"""Train fastsae's TopK trainer and EleutherAI's sparsify on the same activations; print
validation FVU and the fraction of dead latents (never firing on the validation set) of each.

    python -m bench.quality_vs_sparsify                     # MiniLM layer 3, Python docs corpus
    python -m bench.quality_vs_sparsify --tokens 200000 --epochs 4 --device cuda
    python -m bench.quality_vs_sparsify --synthetic         # a known sparse dictionary, no model

sparsify trains its own ``SparseCoder`` with the recipe of its ``Trainer`` (see
bench/sparsify_recipe.py) on the same rows in the same order as fastsae, with its default
optimizer (schedule-free Signum) or ``--sparsify_optimizer adam``. AuxK is off in sparsify by
default; ``--sparsify_auxk`` turns it on at fastsae's weight (1/32) and dead threshold.
"""
import argparse
import tempfile
import time

import torch

from bench.sparsify_recipe import INSTALL_HINT, SparsifyRun, import_sparsify
from fastsae import SAEConfig, create_sae
from fastsae.trainer import RUN_FRACTION_CAP, SAETrainer, split_activations


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


def train_sparsify(train, val, cfg, device, optimizer="signum", auxk=False):
    try:
        import_sparsify(device)
    except ImportError as err:
        raise SystemExit(INSTALL_HINT) from err
    steps = (len(train) // cfg.batch_size) * cfg.num_epochs
    run = SparsifyRun(cfg.d_in, cfg.d_sae, cfg.k, device, steps, optimizer,
                      warmup_steps=min(cfg.warmup_steps, int(RUN_FRACTION_CAP * steps)),
                      auxk_alpha=cfg.aux_k_coefficient if auxk else 0.0,
                      dead_after_tokens=min(cfg.dead_tokens_threshold, int(RUN_FRACTION_CAP * steps * cfg.batch_size)),
                      seed=cfg.seed)
    for rows in batch_order(len(train), cfg.batch_size, cfg.num_epochs, cfg.seed):
        run.step(train[rows].to(device))
    run.finish()
    return fvu_and_dead(run.encode_decode, val, cfg.d_sae), steps


def train_fastsae(train, val, cfg, device):
    trainer = SAETrainer(create_sae(cfg), cfg, train, device=device, log_every=10**9)
    trainer.train(verbose=False)
    sae = trainer.sae.eval()  # the input scale is folded in: it takes raw activations

    @torch.no_grad()
    def encode_decode(x):
        out = sae.loss(x.to(device))
        values, indices = out["code"].flat()
        return out["reconstruction"], indices, values

    return fvu_and_dead(encode_decode, val, cfg.d_sae), trainer.total_steps


def load_activations(args) -> torch.Tensor:
    if args.activations:
        from safetensors.torch import load_file, save_file
        try:
            return load_file(args.activations)["activations"]
        except FileNotFoundError:
            x = synthetic_activations(args.tokens) if args.synthetic else minilm_activations(args.tokens, args.layer)
            save_file({"activations": x.contiguous()}, args.activations)
            return x
    return synthetic_activations(args.tokens) if args.synthetic else minilm_activations(args.tokens, args.layer)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--synthetic", action="store_true")
    p.add_argument("--activations", help="safetensors file to cache the activations in (reused if present)")
    p.add_argument("--expansion_factor", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-3,
                   help="fastsae's Adam learning rate (the config default, 3e-4, suits long runs on wide models; "
                        "at a few hundred steps on d_in 384, 3e-3 trains faster with under 1%% dead latents)")
    p.add_argument("--sparsify_optimizer", choices=["signum", "adam"], default="signum")
    p.add_argument("--sparsify_auxk", action="store_true")
    p.add_argument("--skip", choices=["fastsae", "sparsify"], help="train only the other one")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    x = load_activations(args)
    train, val = split_activations(x, 0.1)
    cfg = SAEConfig(d_in=x.shape[1], expansion_factor=args.expansion_factor, k=args.k, batch_size=args.batch_size,
                    num_epochs=args.epochs, learning_rate=args.lr, dtype="float32")
    print(f"{len(train)} train / {len(val)} val rows, d_in={cfg.d_in}, d_sae={cfg.d_sae}, k={cfg.k}, "
          f"{args.epochs} epochs of batch {cfg.batch_size}; fastsae lr {cfg.learning_rate:g}")
    if args.skip != "fastsae":
        start = time.perf_counter()
        (fvu, dead), steps = train_fastsae(train, val, cfg, args.device)
        print(f"fastsae                val FVU {fvu:.4f}  dead {100 * dead:5.1f}%  {steps} steps "
              f"({time.perf_counter() - start:.0f}s)")
    if args.skip != "sparsify":
        start = time.perf_counter()
        (fvu, dead), steps = train_sparsify(train, val, cfg, args.device, args.sparsify_optimizer, args.sparsify_auxk)
        label = f"sparsify ({args.sparsify_optimizer}{', auxk' if args.sparsify_auxk else ''})"
        print(f"{label:<22} val FVU {fvu:.4f}  dead {100 * dead:5.1f}%  {steps} steps "
              f"({time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    main()
