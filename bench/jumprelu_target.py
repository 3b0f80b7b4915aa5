"""A JumpReLU SAE trained towards a mean L0 (``target_l0``) beside a TopK SAE at k = that target,
on the same activations and rows; print validation FVU, L0 on the held-out rows, the last
training batch's L0 and the dead latents (never firing on the held-out rows) of each.

    python -m bench.jumprelu_target                          # MiniLM layer 3, targets 32 and 64
    python -m bench.jumprelu_target --widths 8 32 --budgets 172 --plain
    python -m bench.jumprelu_target --synthetic --tokens 20000 --budgets 5

``--plain`` adds the JumpReLU on the plain L0 penalty (no target), the library's default.
"""
import argparse
import time

import torch

from bench.quality_compare import (
    add_activation_arguments,
    budget_split,
    fastsae_encode_decode,
    fvu_and_dead,
    load_activations,
)
from fastsae import SAEConfig, create_sae
from fastsae.trainer import SAETrainer, split_activations


def train_and_measure(train, val, cfg, device) -> dict:
    """Validation FVU, held-out L0, the last logged training L0 and the dead fraction of one run."""
    trainer = SAETrainer(create_sae(cfg), cfg, train, device=device, log_every=10, checkpoint_minutes=None)
    trainer.train(verbose=False)
    encode_decode, active = fastsae_encode_decode(trainer, device), []

    def counting_active(x):
        reconstruction, indices, values = encode_decode(x)
        active.append(float((values > 0).sum()))
        return reconstruction, indices, values

    fvu, dead = fvu_and_dead(counting_active, val, cfg.d_sae)
    train_l0 = [r["l0"] for r in trainer.history if "l0" in r][-1]
    return {"fvu": fvu, "val_l0": sum(active) / len(val), "train_l0": train_l0, "dead": dead,
            "steps": trainer.total_steps}


def runs(target: int, plain: bool) -> list[tuple[str, dict]]:
    """(label, SAEConfig fields) of the runs compared at one target."""
    out = [(f"jumprelu target_l0 {target}", {"activation": "jumprelu", "target_l0": float(target)}),
           (f"topk k {target}", {"activation": "topk", "k": target})]
    return out + ([("jumprelu plain penalty", {"activation": "jumprelu"})] if plain else [])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_activation_arguments(p, tokens=200_000)
    p.add_argument("--widths", type=int, nargs="+", default=[8], help="expansion factors (d_sae = width * d_in)")
    p.add_argument("--budgets", type=int, nargs="+", default=[172], help="training steps of each run")
    p.add_argument("--targets", type=int, nargs="+", default=[32, 64])
    p.add_argument("--batch_size", type=int, default=4096)
    p.add_argument("--plain", action="store_true", help="also the JumpReLU on its plain L0 penalty (slow: L0 ~900)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    x = load_activations(args)
    train, val = split_activations(x, 0.1)
    print(f"{len(train)} train / {len(val)} val rows of width {x.shape[1]}, batch {args.batch_size}")
    print(f"{'run':<26} {'d_sae':>6} {'steps':>6} {'val FVU':>8} {'val L0':>7} {'train L0':>8} {'dead':>7} {'time':>6}")
    for width in args.widths:
        for budget in args.budgets:
            rows, epochs = budget_split(train, budget, args.batch_size)
            for i, target in enumerate(args.targets):
                for label, fields in runs(target, args.plain and i == 0):
                    cfg = SAEConfig(d_in=x.shape[1], expansion_factor=width, batch_size=args.batch_size,
                                    num_epochs=epochs, dtype="float32", **fields)
                    start = time.perf_counter()
                    r = train_and_measure(rows, val, cfg, args.device)
                    print(f"{label:<26} {cfg.d_sae:>6} {r['steps']:>6} {r['fvu']:>8.4f} {r['val_l0']:>7.1f} "
                          f"{r['train_l0']:>8.1f} {100 * r['dead']:>6.2f}% {time.perf_counter() - start:>5.0f}s",
                          flush=True)


if __name__ == "__main__":
    main()
