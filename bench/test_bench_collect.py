"""Collecting several hook points from one forward pass, on the embedded all-MiniLM-L6-v2.

Each case collects the same tokens of the default corpus into activation stores (shards on
disk, as ``fastsae train`` does) at the last 1, 3 or 6 blocks' ``hook_resid_post``, so the
forward runs through every block in every case and only the number of stores changes. The
"separate" row collects the 6 hook points with one run each, what a library that takes one
hook point per run costs.

Budget: 6 hook points from one pass must take at most twice the time of one hook point (a
run per hook point takes about 6x); the benchmark fails when they take more.

Run: ``python -m pytest bench/test_bench_collect.py -q``.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest

from bench.common import shapes
from fastsae.corpus import default_corpus
from fastsae.sources import load_default_model
from fastsae.store import collect_to_store, collect_to_stores

CASE = shapes(ci={"tokens": 16_384}, full={"tokens": 262_144})
SETTINGS = dict(batch_size=64, context_length=128, shard_tokens=4096, progress=False)
BUDGET = 2.0  # time(6 hook points) / time(1)
TIMES: dict[str, float] = {}


@pytest.fixture(scope="module")
def minilm():
    model, tokenizer, info = load_default_model()
    return model, tokenizer, [f"blocks.{i}.hook_resid_post" for i in range(info.n_layers)]


def _collect(model, tokenizer, hooks, separate=False) -> float:
    root = Path(tempfile.mkdtemp(prefix="fastsae-collect-"))
    try:
        start = time.perf_counter()
        if separate:
            for hp in hooks:
                collect_to_store(model, tokenizer, default_corpus(), hp, root / hp, CASE["tokens"], **SETTINGS)
        else:
            collect_to_stores(model, tokenizer, default_corpus(), {hp: root / hp for hp in hooks}, CASE["tokens"],
                              **SETTINGS)
        return time.perf_counter() - start
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("count, separate", [(1, False), (3, False), (6, False), (6, True)],
                         ids=["1-hook", "3-hooks", "6-hooks", "6-hooks-separate-runs"])
def test_collect_hook_points(benchmark, minilm, count, separate):
    model, tokenizer, hooks = minilm
    chosen = hooks[-count:]
    benchmark.group = f"collect-minilm-{CASE['tokens']}-tokens"
    seconds = benchmark.pedantic(lambda: _collect(model, tokenizer, chosen, separate), rounds=1, iterations=1,
                                 warmup_rounds=1 if count == 1 else 0)
    TIMES[(count, separate)] = seconds
    benchmark.extra_info.update({"hook_points": count, "separate_runs": separate,
                                 "tokens_per_s": CASE["tokens"] / seconds,
                                 "hook_point_tokens_per_s": count * CASE["tokens"] / seconds})
    if count == 6 and not separate:
        one = TIMES.get((1, False)) or _collect(model, tokenizer, hooks[-1:])
        ratio = seconds / one
        benchmark.extra_info["vs_one_hook"] = ratio
        assert ratio <= BUDGET, f"6 hook points took {ratio:.2f}x the time of one (budget {BUDGET}x)"
