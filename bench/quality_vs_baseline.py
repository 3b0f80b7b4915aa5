"""Train fastsae's TopK trainer and a sparsify-style baseline on the same activations; print
validation FVU and the fraction of dead latents (never firing on the validation set) of each.

    python -m bench.quality_vs_baseline                     # MiniLM layer 3, Python docs corpus
    python -m bench.quality_vs_baseline --tokens 200000 --epochs 4 --device cuda
    python -m bench.quality_vs_baseline --synthetic         # a known sparse dictionary, no model

The baseline is the plain step of bench/test_bench_train.py (dense encoder, ReLU, topk,
embedding_bag decode, Adam at the same learning rate, same batches, inputs scaled to
E||x||^2 = d_in, b_dec at the data mean, no AuxK).
"""
import argparse
import tempfile
import time

import torch

from bench.test_bench_train import SparsifyStyleTopK
from fastsae import SAEConfig, create_sae
from fastsae.normalize import estimate_norm_scale
from fastsae.trainer import SAETrainer, split_activations


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
    err, fired = 0.0, torch.zeros(d_sae, dtype=torch.bool)
    for x in val.split(batch):
        recon, indices, values = encode_decode(x)
        err += (recon - x).pow(2).sum().item()
        fired[indices[values > 0].cpu()] = True
    return err / (val - val.mean(0)).pow(2).sum().item(), 1 - fired.float().mean().item()


def train_baseline(train, val, cfg, device, steps):
    scale = estimate_norm_scale(train[:8192])
    model = SparsifyStyleTopK(cfg.d_in, cfg.d_sae, cfg.k, seed=cfg.seed).to(device)
    with torch.no_grad():
        model.b_dec.copy_((train[:8192] * scale).mean(0))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    gen = torch.Generator().manual_seed(cfg.seed)
    per_epoch = len(train) // cfg.batch_size
    for step in range(steps):
        if step % per_epoch == 0:
            perm = torch.randperm(len(train), generator=gen)
        rows = perm[(step % per_epoch) * cfg.batch_size:(step % per_epoch + 1) * cfg.batch_size]
        _, fvu = model(train[rows].to(device) * scale)
        opt.zero_grad(set_to_none=True)
        fvu.backward()
        opt.step()
        model.normalize()

    def encode_decode(x):
        x = x.to(device) * scale
        pre = torch.relu(model.encoder(x - model.b_dec))
        values, indices = pre.topk(cfg.k)
        recon = torch.nn.functional.embedding_bag(indices, model.W_dec, per_sample_weights=values, mode="sum")
        return ((recon + model.b_dec) / scale).cpu(), indices, values

    return fvu_and_dead(encode_decode, val, cfg.d_sae)


def train_fastsae(train, val, cfg, device):
    trainer = SAETrainer(create_sae(cfg), cfg, train, device=device, log_every=10**9)
    trainer.train(verbose=False)
    sae = trainer.sae  # scale folded in: takes raw activations

    def encode_decode(x):
        out = sae.loss(x.to(device))
        values, indices = out["code"].flat()
        return out["reconstruction"].cpu(), indices, values

    sae.eval()
    return fvu_and_dead(encode_decode, val, cfg.d_sae), trainer.total_steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--synthetic", action="store_true")
    p.add_argument("--expansion_factor", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    x = synthetic_activations(args.tokens) if args.synthetic else minilm_activations(args.tokens, args.layer)
    train, val = split_activations(x, 0.1)
    cfg = SAEConfig(d_in=x.shape[1], expansion_factor=args.expansion_factor, k=args.k, batch_size=args.batch_size,
                    num_epochs=args.epochs, learning_rate=args.lr, warmup_steps=100, dtype="float32")
    print(f"{len(train)} train / {len(val)} val rows, d_in={cfg.d_in}, d_sae={cfg.d_sae}, k={cfg.k}, "
          f"{args.epochs} epochs of batch {cfg.batch_size}")
    start = time.perf_counter()
    (fvu, dead), steps = train_fastsae(train, val, cfg, args.device)
    print(f"fastsae          val FVU {fvu:.4f}  dead {100 * dead:5.1f}%  ({time.perf_counter() - start:.0f}s)")
    start = time.perf_counter()
    fvu, dead = train_baseline(train, val, cfg, args.device, steps)
    print(f"sparsify-style   val FVU {fvu:.4f}  dead {100 * dead:5.1f}%  ({time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    main()
