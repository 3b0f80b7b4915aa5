"""One TopK SAE training step (forward, backward, optimizer): fastsae's trainer vs EleutherAI sparsify and SAELens.

sparsify (``pip install eai-sparsify``, a bench-only dependency; its benches skip without it)
runs its own SparseCoder step as its Trainer does (bench/sparsify_recipe.py), with Adam (the
same optimizer family as fastsae) and with its default schedule-free Signum. fastsae's step is
``SAETrainer.train_step`` as training runs it: sparse autograd ops, decoder-gradient
projection, clipping, schedule-free Adam (its default), on-device dead-latent tracking.
"auxk-on" runs both with 10% of the latents marked dead, so the AuxK selection and its decode
run too.

SAELens (``pip install sae-lens``, bench-only as well) runs its own TopKTrainingSAE through its own
SAETrainer with its defaults (bench/saelens_recipe.py): dense TopK activations and decode, MSE
(+ AuxK), clipping, Adam lr 3e-4. Its "auxk-on" marks the latents dead again before every step:
they fire in the first step and would otherwise be alive, and its AuxK skipped, from then on.

Each benchmark reports tokens/s in ``extra_info``; fastsae's also its speed-up over sparsify's
Adam step and SAELens's step, from the medians of PAIRED_ROUNDS rounds that alternate one step of
each library (a machine whose speed drifts slows them alike). Run:
``python -m pytest bench/test_bench_train.py -q`` (FASTSAE_BENCH_SIZE=full on a GPU).
"""
import statistics

import pytest
import torch

from bench.common import DEVICE, alternated_times, peak_memory, shapes, synchronized
from bench.saelens_recipe import SAELensRun, have_saelens
from bench.sparsify_recipe import SparsifyRun, have_sparsify
from fastsae import SAEConfig, create_sae, ops
from fastsae.trainer import SAETrainer

SHAPE = shapes(ci={"N": 4096, "d": 384, "m": 6144, "k": 32}, full={"N": 16384, "d": 4096, "m": 131072, "k": 64})
HAVE_SPARSIFY = have_sparsify()
HAVE_SAELENS = have_saelens()
DEAD_EVERY = 10  # "auxk-on": every 10th latent starts dead
PAIRED_ROUNDS = 5  # rounds of alternated steps behind the speed-ups
GROUP = f"train-step N{SHAPE['N']} d{SHAPE['d']} m{SHAPE['m']} k{SHAPE['k']}"
needs_sparsify = pytest.mark.skipif(not HAVE_SPARSIFY, reason="sparsify is not installed (pip install eai-sparsify)")
needs_saelens = pytest.mark.skipif(not HAVE_SAELENS, reason="SAELens is not installed (pip install sae-lens)")


def sparsify_step_fn(x, d_sae, k, optimizer="adam", aux=False):
    run = SparsifyRun(x.shape[1], d_sae, k, x.device, total_steps=10**6, optimizer=optimizer, warmup_steps=0,
                      auxk_alpha=1 / 32 if aux else 0.0, dead_after_tokens=10**12)

    def step():
        if aux:  # every step: a marked latent that fires counts as alive again, and AuxK would stop
            run.since_fired[::DEAD_EVERY] = 10**13
        return run.step(x)

    return step


def saelens_step_fn(x, d_sae, k, aux=False):
    run = SAELensRun(x.shape[1], d_sae, k, x.device, batch_size=x.shape[0])

    def step():
        if aux:  # every step: SAELens's trainer revives a dead latent as soon as it fires
            run.mark_dead(slice(None, None, DEAD_EVERY))
        return run.step(x)

    return step


def fastsae_step_fn(x, d_sae, k, aux=False):
    cfg = SAEConfig(d_in=x.shape[1], d_sae=d_sae, k=k, batch_size=x.shape[0], num_epochs=1000, dtype="float32")
    trainer = SAETrainer(create_sae(cfg), cfg, x, device=DEVICE, log_every=10**9)
    trainer.scale = 1.0
    def step():
        if aux:  # every step, as for the other libraries: AuxK runs as training runs it while latents are dead
            trainer.tokens_since_fired[::DEAD_EVERY] = 10**13
            trainer._num_dead = int(trainer.dead_mask().sum())
        with ops.input_checks(False):  # as in the training loop
            return trainer.train_step(x)["total_loss"]

    return step


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(SHAPE["N"], SHAPE["d"], generator=gen).to(DEVICE)


def _run_step(benchmark, step) -> float:
    """Time one library's step; record its tokens/s and peak memory."""
    benchmark.group = GROUP
    step = synchronized(step)
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    benchmark.extra_info["peak_bytes"] = peak_memory(step)
    tokens_per_s = SHAPE["N"] / benchmark.stats.stats.mean
    benchmark.extra_info["tokens_per_s"] = tokens_per_s
    return tokens_per_s


def _paired_speedups(fastsae_step, batch, aux) -> dict[str, tuple[float, float]]:
    """{library: (its tokens/s, fastsae's speed-up over it)} from the medians of steps
    alternated round by round with fastsae's, for each other library installed."""
    steps = {"fastsae": synchronized(fastsae_step)}
    if HAVE_SPARSIFY:
        steps["sparsify_adam"] = synchronized(sparsify_step_fn(batch, SHAPE["m"], SHAPE["k"], "adam", aux))
    if HAVE_SAELENS:
        steps["saelens"] = synchronized(saelens_step_fn(batch, SHAPE["m"], SHAPE["k"], aux))
    if len(steps) == 1:
        return {}
    medians = {name: statistics.median(t) for name, t in alternated_times(steps, PAIRED_ROUNDS).items()}
    return {name: (SHAPE["N"] / (ms / 1e3), ms / medians["fastsae"])
            for name, ms in medians.items() if name != "fastsae"}


@needs_sparsify
@pytest.mark.parametrize("optimizer", ["adam", "signum"])
@pytest.mark.parametrize("aux", [False, True], ids=["no-dead", "auxk-on"])
def test_train_step_sparsify(benchmark, batch, optimizer, aux):
    _run_step(benchmark, sparsify_step_fn(batch, SHAPE["m"], SHAPE["k"], optimizer, aux))


@needs_saelens
@pytest.mark.parametrize("aux", [False, True], ids=["no-dead", "auxk-on"])
def test_train_step_saelens(benchmark, batch, aux):
    _run_step(benchmark, saelens_step_fn(batch, SHAPE["m"], SHAPE["k"], aux))


@pytest.mark.parametrize("aux", [False, True], ids=["no-dead", "auxk-on"])
def test_train_step_fastsae(benchmark, batch, aux):
    step = fastsae_step_fn(batch, SHAPE["m"], SHAPE["k"], aux)
    tokens_per_s = _run_step(benchmark, step)
    for library, (their_tokens_per_s, speedup) in _paired_speedups(step, batch, aux).items():
        benchmark.extra_info[f"{library}_tokens_per_s"] = their_tokens_per_s
        benchmark.extra_info[f"speedup_vs_{library}"] = speedup
        print(f"\nfastsae {tokens_per_s:,.0f} tokens/s; {library} {their_tokens_per_s:,.0f} tokens/s, fastsae "
              f"{speedup:.2f}x in {PAIRED_ROUNDS} alternated rounds")
