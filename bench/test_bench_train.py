"""One TopK SAE training step (forward, backward, Adam): fastsae's trainer vs a sparsify-style baseline.

The baseline re-implements EleutherAI sparsify's TopK step plainly (sparsify itself is used
too when importable): dense linear encoder, ReLU, ``torch.topk``, an ``embedding_bag``
decode, plain autograd, Adam, decoder renormalisation. fastsae's step is
``SAETrainer.train_step`` as training runs it: sparse autograd ops, AuxK bookkeeping,
decoder-gradient projection, clipping, Adam, on-device dead-latent tracking.

Each benchmark reports tokens/s in ``extra_info``; the fastsae one also the ratio to the
baseline (measured in the same process). Run:
``python -m pytest bench/test_bench_train.py -q`` (FASTSAE_BENCH_SIZE=full on a GPU).
"""
import time

import pytest
import torch
import torch.nn.functional as F

from bench.common import DEVICE, ON_GPU, shapes, synchronized
from fastsae import SAEConfig, create_sae, ops
from fastsae.trainer import SAETrainer

SHAPE = shapes(ci={"N": 4096, "d": 384, "m": 6144, "k": 32}, full={"N": 16384, "d": 4096, "m": 131072, "k": 64})
try:
    import sparsify  # noqa: F401
    HAVE_SPARSIFY = True
except ImportError:
    HAVE_SPARSIFY = False


class SparsifyStyleTopK(torch.nn.Module):
    """sparsify's SparseCoder forward, TopK path: encoder Linear, ReLU, topk, embedding_bag decode."""

    def __init__(self, d_in, d_sae, k, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.encoder = torch.nn.Linear(d_in, d_sae)
        with torch.no_grad():
            self.encoder.weight.copy_(torch.randn(d_sae, d_in, generator=gen) / d_in ** 0.5)
            self.encoder.bias.zero_()
        self.W_dec = torch.nn.Parameter(self.encoder.weight.detach().clone())
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in))
        self.k = k
        self.normalize()

    @torch.no_grad()
    def normalize(self):
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def forward(self, x):
        pre = F.relu(self.encoder(x - self.b_dec))
        values, indices = pre.topk(self.k, sorted=False)
        recon = F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum") + self.b_dec
        err = (recon - x).pow(2).sum()
        fvu = err / (x - x.mean(0)).pow(2).sum()
        return recon, fvu


def baseline_step_fn(x, d_sae, k):
    model = SparsifyStyleTopK(x.shape[1], d_sae, k).to(x.device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        _, fvu = model(x)
        opt.zero_grad(set_to_none=True)
        fvu.backward()
        opt.step()
        model.normalize()
        return fvu

    return step


def fastsae_step_fn(x, d_sae, k, aux=False):
    cfg = SAEConfig(d_in=x.shape[1], d_sae=d_sae, k=k, batch_size=x.shape[0], num_epochs=1000, dtype="float32")
    trainer = SAETrainer(create_sae(cfg), cfg, x, device=DEVICE, log_every=10**9)
    trainer.scale = 1.0
    trainer._aux_on = aux  # on: the AuxK selection runs too (training does so only while latents are dead)

    def step():
        with ops.input_checks(False):  # as in the training loop
            return trainer.train_step(x)["total_loss"]

    return step


def _tokens_per_s(fn, n, reps=3):
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if ON_GPU:
        torch.cuda.synchronize()
    return reps * n / (time.perf_counter() - start)


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(SHAPE["N"], SHAPE["d"], generator=gen).to(DEVICE)


@pytest.fixture(scope="module")
def baseline_tokens_per_s(batch):
    return _tokens_per_s(baseline_step_fn(batch, SHAPE["m"], SHAPE["k"]), SHAPE["N"])


def test_train_step_sparsify_style(benchmark, batch):
    benchmark.group = f"train-step N{SHAPE['N']} d{SHAPE['d']} m{SHAPE['m']} k{SHAPE['k']}"
    step = synchronized(baseline_step_fn(batch, SHAPE["m"], SHAPE["k"]))
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    benchmark.extra_info["tokens_per_s"] = SHAPE["N"] / benchmark.stats.stats.mean


@pytest.mark.skipif(not HAVE_SPARSIFY, reason="sparsify is not installed")
def test_train_step_sparsify_itself(benchmark, batch):  # pragma: no cover - needs sparsify
    from sparsify import SparseCoder, SparseCoderConfig

    benchmark.group = f"train-step N{SHAPE['N']} d{SHAPE['d']} m{SHAPE['m']} k{SHAPE['k']}"
    coder = SparseCoder(SHAPE["d"], SparseCoderConfig(num_latents=SHAPE["m"], k=SHAPE["k"]), device=DEVICE)
    opt = torch.optim.Adam(coder.parameters(), lr=1e-4)

    def step():
        out = coder(batch)
        opt.zero_grad(set_to_none=True)
        out.fvu.backward()
        opt.step()
        coder.set_decoder_norm_to_unit_norm()

    benchmark.pedantic(synchronized(step), rounds=3, warmup_rounds=1)
    benchmark.extra_info["tokens_per_s"] = SHAPE["N"] / benchmark.stats.stats.mean


@pytest.mark.parametrize("aux", [False, True], ids=["no-dead", "auxk-on"])
def test_train_step_fastsae(benchmark, batch, baseline_tokens_per_s, aux):
    benchmark.group = f"train-step N{SHAPE['N']} d{SHAPE['d']} m{SHAPE['m']} k{SHAPE['k']}"
    step = synchronized(fastsae_step_fn(batch, SHAPE["m"], SHAPE["k"], aux))
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    tokens_per_s = SHAPE["N"] / benchmark.stats.stats.mean
    benchmark.extra_info["tokens_per_s"] = tokens_per_s
    benchmark.extra_info["baseline_tokens_per_s"] = baseline_tokens_per_s
    benchmark.extra_info["speedup_vs_sparsify_style"] = tokens_per_s / baseline_tokens_per_s
    print(f"\nfastsae (aux={aux}) {tokens_per_s:,.0f} tokens/s, sparsify-style {baseline_tokens_per_s:,.0f} tokens/s, "
          f"ratio {tokens_per_s / baseline_tokens_per_s:.2f}")
