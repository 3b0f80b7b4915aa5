"""The runtime's overhead budget: generating with feature tracking, or under steering, must cost
at most 10% more than generating without it, at prefill and per decoded token.

Setup: a nanochat-d20-shaped causal transformer (``bench/toy_transformer.py``: 20 layers,
d_model 1280, 10 heads, vocab 65536, KV cache so decode steps are (B, 1, D)) with tracking at
one layer (a TopK SAE, d_sae = 16 x d_model, k = 32, at ``blocks.10.hook_resid_post``).
Tracking includes every cost it adds: the hook, the recording, the encode of the activation rows
a hook holds (``InterpretableModel(encode_rows=...)``: 64 by default, so a decode step's row
waits for others) and the merge of the max-activating examples, both forced at the end of each
timed run. Steering scales one latent by 2 (``steering_config``): an edit that reads the
feature, so a TopK SAE encodes the rows of every forward, decode steps included (its feature
depends on the row's k-th value); its decode ratio is noisier (single runs read +0.6% to +9.5%
on the 2-core VM), so it takes 41 decode rounds at the CI size.

Method: each round times a plain run and a tracked run back to back, alternating which goes
first; the overhead is the median over rounds of tracked / plain - 1, so slow drifts in the
machine's speed cancel. The test fails when the overhead exceeds BUDGET. On a GPU the clock is
wall time with synchronisation. On CPU it is the process's CPU time with torch on one thread:
CI machines are shared, and wall time there measures the neighbours as much as the code
(single-threaded CPU time is what wall time would be on an idle single core). Even CPU time
varies by 5-10% from run to run on a shared 2-core VM, so the CI size takes 61 prefill and 25
decode rounds: with 21 and 15 a true overhead of about 5% read above 10% in some runs. On
CPU one more tracked generation times tracking's own work directly (``tracking_work``: the
hook calls, the encodes they start, the forced flushes), reported beside the ratio as
``tracking_work_fraction`` of the plain run: the machine's drift does not move it.

Sizes (FASTSAE_BENCH_SIZE, see bench/common.py):
- "full": the d20 shape above, bf16 model and SAE on a GPU (fp32 on CPU), prompt 512, 64 new tokens.
- "ci": reduced to run on 2 CPU cores in about two minutes: d_model 1280 -> 256 (2 heads of 128),
  vocab 65536 -> 13107 (the same vocab / d_model ratio), prompt 64, 32 new tokens, fp32.
  Kept: 20 layers, the SAE at one of them with the same d_in as the model and 16x expansion,
  k = 32. The SAE's weight and FLOPs relative to the model's are therefore those of d20
  (16 d^2 against 20 * 12 d^2 + 2 V d, about 4.7%), so the ratio is an honest stand-in.

Run: ``python -m pytest bench/test_bench_overhead.py -q`` (FASTSAE_BENCH_SIZE=full on a GPU).
"""
from __future__ import annotations

import contextlib
import statistics
import time
from functools import partial
from typing import Callable, Sequence

import pytest
import torch

from bench.common import DEVICE, ON_GPU, shapes
from bench.toy_transformer import D20, KVCache, ToyConfig, ToyGPT
from fastsae import torch_backend
from fastsae.config import SAEConfig
from fastsae.models import create_sae
from fastsae.runtime import InterpretableModel, scale
from fastsae.trace import Trace

BUDGET = 0.10

CASE = shapes(
    ci={"config": ToyConfig(n_layer=20, n_embd=256, n_head=2, vocab_size=13107), "batch": 1, "prompt": 64,
        "new_tokens": 32, "rounds": {"prefill": 61, "decode": 25}, "steering_rounds": {"prefill": 61, "decode": 41},
        "dtype": torch.float32},
    full={"config": D20, "batch": 1, "prompt": 512, "new_tokens": 64, "rounds": {"prefill": 21, "decode": 11},
          "steering_rounds": {"prefill": 21, "decode": 11}, "dtype": torch.bfloat16 if ON_GPU else torch.float32},
)


# ----------------------------------------------------------------------------- the budget check

def overhead(plain: Sequence[float], tracked: Sequence[float]) -> float:
    """Median over paired rounds of tracked / plain - 1."""
    if len(plain) != len(tracked) or not plain:
        raise ValueError(f"need the same number (>0) of plain and tracked timings, got {len(plain)} and {len(tracked)}")
    return statistics.median(t / p for p, t in zip(plain, tracked)) - 1.0


def check_overhead_budget(plain: Sequence[float], tracked: Sequence[float], budget: float = BUDGET,
                          what: str = "tracking") -> float:
    """The overhead (a fraction); AssertionError when it exceeds the budget."""
    ratio = overhead(plain, tracked)
    assert ratio <= budget, (f"{what} overhead {ratio:.1%} exceeds the {budget:.0%} budget (median of "
                             f"{len(plain)} paired rounds; plain median {statistics.median(plain):.4g}s, "
                             f"tracked median {statistics.median(tracked):.4g}s)")
    return ratio


def alternating_round(plain: list, other: list, run_plain: Callable[[], float], run_other: Callable[[], float]):
    """One round: each arm's time appended to its list, the plain arm first in even rounds."""
    arms = [(plain, run_plain), (other, run_other)]
    for times, run in arms if len(plain) % 2 == 0 else arms[::-1]:
        times.append(run())


def interleaved(run_plain: Callable[[], float], run_tracked: Callable[[], float], rounds: int):
    """Run both arms `rounds` times, alternating which goes first; each call returns its own time."""
    plain, tracked = [], []
    for _ in range(rounds):
        alternating_round(plain, tracked, run_plain, run_tracked)
    return plain, tracked


# ----------------------------------------------------------------------------- the workload

def _sync():
    if ON_GPU:
        torch.cuda.synchronize()


clock = time.perf_counter if ON_GPU else time.process_time


def build(case=CASE, device=DEVICE, hook_layer=None, sae_factory=None):
    """(model, InterpretableModel with one SAE, prompt) for a case."""
    cfg = case["config"]
    model = ToyGPT(cfg).to(device=device, dtype=case["dtype"]).eval()
    layer = cfg.n_layer // 2 if hook_layer is None else hook_layer
    sae_cfg = SAEConfig(d_in=cfg.n_embd, d_sae=16 * cfg.n_embd, k=32)
    sae = (sae_factory or create_sae)(sae_cfg).to(device=device, dtype=case["dtype"])
    im = InterpretableModel(model, {f"blocks.{layer}.hook_resid_post": sae})
    prompt = torch.randint(0, cfg.vocab_size, (case["batch"], case["prompt"]),
                           generator=torch.Generator().manual_seed(0)).to(device)
    return model, im, prompt


def generation_times(model, im, prompt, new_tokens, tracked, case=CASE, steering=None):
    """(prefill seconds, decode seconds per token) of one greedy generation with a KV cache;
    ``steering``: a steering config to run it under (``InterpretableModel.steering_enabled``)."""
    cache = KVCache(case["config"], prompt.shape[0], prompt.shape[1] + new_tokens + 1, case["dtype"], prompt.device)
    context = im.interpretation_enabled() if tracked else contextlib.nullcontext()
    steered = im.steering_enabled(steering) if steering else contextlib.nullcontext()
    with torch.inference_mode(), context, steered:
        _sync()
        t0 = clock()
        token = model(prompt, kv_cache=cache)[:, -1:].argmax(-1)
        if tracked:
            im.trace.flush()
        _sync()
        t1 = clock()
        for _ in range(new_tokens):
            token = model(token, kv_cache=cache)[:, -1:].argmax(-1)
        if tracked:  # the held rows' encode and the examples' merge are tracking work too
            im.trace.flush()
        _sync()
        t2 = clock()
    return t1 - t0, (t2 - t1) / max(new_tokens, 1)


def tracking_work(model, im, prompt, new_tokens, case=CASE):
    """(prefill seconds, decode seconds per token) of the work tracking itself does in one
    tracked generation (CPU): the hook calls, the encodes they start and the forced flushes,
    timed by the same clock. A direct measure beside the paired ratios, which a shared
    machine's drift moves by more than tracking costs. ``generation_times``'s forced flushes
    end its phases: the work spent when each ends is noted."""
    spent, at_flush = [0.0], []

    def timed(fn, note=False):
        def run(*args):
            t = clock()
            try:
                return fn(*args)
            finally:
                spent[0] += clock() - t
                if note:
                    at_flush.append(spent[0])
        return run

    track, flush = im._track, Trace.flush
    im._track = timed(track)
    Trace.flush = timed(flush, note=True)
    try:
        generation_times(model, im, prompt, new_tokens, True, case)
    finally:
        del im._track
        Trace.flush = flush
    prefill, generation = at_flush[0], at_flush[1]  # (a third flush: the block's exit, nothing held)
    return prefill, (generation - prefill) / max(new_tokens, 1)


@pytest.fixture(scope="module")
def workload():
    threads = torch.get_num_threads()
    if not ON_GPU:
        torch.set_num_threads(1)  # see the module docstring: CPU time of one thread
    model, im, prompt = build()
    generation_times(model, im, prompt, 2, tracked=True)  # warm up every path
    generation_times(model, im, prompt, 2, tracked=False)
    generation_times(model, im, prompt, 2, tracked=False, steering=steering_config(im))
    yield model, im, prompt
    torch.set_num_threads(threads)


def _label():
    c = CASE["config"]
    return (f"L{c.n_layer}-d{c.n_embd}-V{c.vocab_size}-sae{16 * c.n_embd}-k32-B{CASE['batch']}-"
            f"T{CASE['prompt']}-{str(CASE['dtype']).removeprefix('torch.')}")


def steering_config(im):
    """Scale one latent of the benchmark's SAE by 2: an edit that reads the feature, so each
    forward encodes its rows (a TopK SAE's feature depends on the whole row)."""
    return {hp: scale(0, 2.0) for hp in im.saes}


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_steering_overhead(benchmark, workload, phase):
    """Generating under steering must cost at most BUDGET more than generating without it."""
    model, im, prompt = workload
    new_tokens = 0 if phase == "prefill" else CASE["new_tokens"]
    pick = 0 if phase == "prefill" else 1
    config = steering_config(im)
    plain, steered = [], []
    one_round = partial(alternating_round, plain, steered,
                        lambda: generation_times(model, im, prompt, new_tokens, False)[pick],
                        lambda: generation_times(model, im, prompt, new_tokens, False, steering=config)[pick])
    benchmark.group = f"runtime-steering-overhead-{phase}"
    benchmark.name = f"{phase}[{_label()}]"
    benchmark.pedantic(one_round, rounds=CASE["steering_rounds"][phase], iterations=1)
    ratio = overhead(plain, steered)
    benchmark.extra_info.update({"plain_median_s": statistics.median(plain),
                                 "steered_median_s": statistics.median(steered),
                                 "overhead": ratio, "budget": BUDGET, "edit": "scale(0, 2.0)",
                                 "per": "token" if phase == "decode" else "prompt"})
    print(f"\nsteering {phase} [{_label()}]: plain {statistics.median(plain) * 1e3:.2f} ms, steered "
          f"{statistics.median(steered) * 1e3:.2f} ms, overhead {ratio:+.1%}")
    check_overhead_budget(plain, steered, what=f"{phase} steering")


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_tracking_overhead(benchmark, workload, phase):
    model, im, prompt = workload
    new_tokens = 0 if phase == "prefill" else CASE["new_tokens"]
    pick = 0 if phase == "prefill" else 1
    plain, tracked = [], []
    # timed by pytest-benchmark as the pair; the ratio uses each arm's own time
    one_round = partial(alternating_round, plain, tracked,
                        lambda: generation_times(model, im, prompt, new_tokens, False)[pick],
                        lambda: generation_times(model, im, prompt, new_tokens, True)[pick])
    benchmark.group = f"runtime-overhead-{phase}"
    benchmark.name = f"{phase}[{_label()}]"
    torch_backend.reset_selection_counts()
    benchmark.pedantic(one_round, rounds=CASE["rounds"][phase], iterations=1)
    ratio = overhead(plain, tracked)
    work = None if ON_GPU else tracking_work(model, im, prompt, new_tokens)[pick]
    # Rows of the tracked runs (prompt and new tokens) the cut encoded from a bf16 or fp16
    # product, and their candidates; 0 where the hooks ran the fp32 GEMM.
    cut = torch_backend.SURVIVORS
    benchmark.extra_info.update({"plain_median_s": statistics.median(plain),
                                 "tracked_median_s": statistics.median(tracked),
                                 "overhead": ratio, "budget": BUDGET,
                                 "per": "token" if phase == "decode" else "prompt",
                                 "cut_rows": cut["rows"], "undecided_rows": cut["hard_rows"],
                                 "candidates_per_row": cut["survivors"] / max(1, cut["rows"])})
    if work is not None:
        benchmark.extra_info.update(tracking_work_s=work, tracking_work_fraction=work / statistics.median(plain))
    print(f"\n{phase} [{_label()}]: plain {statistics.median(plain) * 1e3:.2f} ms, tracked "
          f"{statistics.median(tracked) * 1e3:.2f} ms, overhead {ratio:+.1%}" +
          ("" if work is None else f"; tracking's own work {work * 1e3:.3f} ms "
                                   f"({work / statistics.median(plain):.2%} of the plain time)"))
    check_overhead_budget(plain, tracked, what=f"{phase} tracking")
