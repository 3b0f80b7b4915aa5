"""The overhead budget check of bench/test_bench_overhead.py fails when it should."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `bench`

from bench.test_bench_overhead import (  # noqa: E402
    build,
    check_overhead_budget,
    generation_times,
    interleaved,
    overhead,
)
from bench.toy_transformer import ToyConfig  # noqa: E402

TINY = {"config": ToyConfig(n_layer=2, n_embd=64, n_head=2, vocab_size=256, sequence_len=64), "batch": 1,
        "prompt": 8, "new_tokens": 4, "dtype": torch.float32}


def test_overhead_is_the_median_paired_ratio():
    assert overhead([1.0, 2.0, 4.0], [1.05, 2.1, 4.2]) == pytest.approx(0.05)
    # One disturbed round (either arm) does not move the median.
    assert overhead([1.0, 1.0, 1.0, 1.0, 0.1], [1.05, 1.05, 1.05, 1.05, 5.0]) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="same number"):
        overhead([1.0, 1.0], [1.0])
    with pytest.raises(ValueError, match="same number"):
        overhead([], [])


def test_budget_check_passes_within_and_fails_beyond_the_budget():
    assert check_overhead_budget([1.0] * 5, [1.08] * 5) == pytest.approx(0.08)
    with pytest.raises(AssertionError, match=r"decode overhead 12.0% exceeds the 10% budget \(median of 5"):
        check_overhead_budget([1.0] * 5, [1.12] * 5, what="decode")
    with pytest.raises(AssertionError, match="exceeds the 5% budget"):
        check_overhead_budget([1.0] * 3, [1.08] * 3, budget=0.05)


def test_interleaving_alternates_which_arm_goes_first():
    calls = []
    plain, tracked = interleaved(lambda: calls.append("p") or 1.0, lambda: calls.append("t") or 2.0, rounds=4)
    assert calls == ["p", "t", "t", "p", "p", "t", "t", "p"]
    assert plain == [1.0] * 4 and tracked == [2.0] * 4


def _assert_decode_budget_fails(model, im, prompt):
    """Three alternated rounds of plain and tracked decoding at TINY: the budget check fails."""
    runs = [lambda tracked=tracked: generation_times(model, im, prompt, 4, tracked, TINY)[1]
            for tracked in (False, True)]
    plain, tracked = interleaved(*runs, rounds=3)
    with pytest.raises(AssertionError, match="exceeds the 10% budget"):
        check_overhead_budget(plain, tracked, what="decode")


def test_a_slowed_hook_fails_the_budget_check():
    """Real timings at a tiny size: tracking plus heavy extra work per hook call must be caught."""
    model, im, prompt = build(TINY, torch.device("cpu"), hook_layer=1)
    hp = next(iter(im.saes))
    ballast = torch.randn(384, 384)
    track = im._track

    def slow_track(hook_point, x):
        track(hook_point, x)
        for _ in range(8):  # several times the tiny model's own work per forward
            ballast @ ballast

    im._track = slow_track
    _assert_decode_budget_fails(model, im, prompt)
    assert im.trace[hp].num_rows == 8 + 4  # the slowed hook did track


def test_a_slowed_deferred_encode_fails_the_budget_check():
    """The held rows' encode runs after the hook calls (at the flush the timed run forces): its
    cost must be timed too."""
    model, im, prompt = build(TINY, torch.device("cpu"), hook_layer=1)
    ballast = torch.randn(384, 384)
    top_features = im._top_features
    encoded = []

    def slow_top_features(hook_point, rows):
        encoded.append(rows.shape[0])
        for _ in range(8 * rows.shape[0]):  # several times the tiny model's work per row
            ballast @ ballast
        return top_features(hook_point, rows)

    im._top_features = slow_top_features
    _assert_decode_budget_fails(model, im, prompt)
    assert encoded == [8, 4] * 3  # each run: the prompt, then its 4 decode rows held and encoded together


def test_tracking_work_counts_the_hook_and_the_held_rows_encode():
    """The direct measure times the encode wherever it runs: here in the forced flushes, as the
    prompt (8 rows) and the 4 decode rows are held."""
    from bench.test_bench_overhead import clock, tracking_work

    model, im, prompt = build(TINY, torch.device("cpu"), hook_layer=1)
    ballast = torch.randn(384, 384)
    t = clock()
    for _ in range(20):
        ballast @ ballast
    ballast_s = clock() - t
    top_features = im._top_features

    def slow_top_features(hook_point, rows):
        for _ in range(20):
            ballast @ ballast
        return top_features(hook_point, rows)

    im._top_features = slow_top_features
    prefill_s, decode_s_per_token = tracking_work(model, im, prompt, 4, TINY)
    assert prefill_s > 0.5 * ballast_s and 4 * decode_s_per_token > 0.5 * ballast_s
    assert "_track" not in vars(im)  # the hook is the model's own again


def test_the_steered_arm_edits_every_forward_through_the_sae():
    from bench.test_bench_overhead import steering_config

    model, im, prompt = build(TINY, torch.device("cpu"), hook_layer=1)
    calls = []
    steer = im._steer_activation

    def counting(hook_point, plan, x):
        calls.append(x.shape[1])
        return steer(hook_point, plan, x)

    im._steer_activation = counting
    generation_times(model, im, prompt, 4, False, TINY, steering=steering_config(im))
    assert calls == [8, 1, 1, 1, 1]  # the prompt, then each decode step
    assert not any(m._forward_hooks for m in model.modules())  # removed after the run
