"""The CPU TopK encode with its GEMM in bfloat16 (selection by cutoff, survivors rescored in
fp32) returns the fp32 answer: values, indices and tie rule. Inputs where bf16 rounding
reorders the top entries, exact ties, all-negative rows, huge and tiny norms, real
activations."""
import pytest
import torch

from fastsae import ops, reference, selection, torch_backend


@pytest.fixture(autouse=True)
def bf16_gemm(monkeypatch):
    monkeypatch.setenv("FASTSAE_CPU_ENCODE_GEMM", "bf16")
    torch_backend.reset_selection_counts()


def exact_topk(x, W, b, b_dec, k):
    """The top-k in float64: the answer fp32 rounding can only blur, never change, wherever
    neighbouring values differ by more than fp32's error."""
    pre = torch.relu((x.double() - b_dec.double()) @ W.double().t() + b.double())
    return reference.stable_topk(pre, k), pre


def assert_exact(x, W, b, b_dec, k):
    """Against float64: the selected set on every row whose k-th and (k+1)-th values are
    further apart than fp32 can resolve (4x the fp32 GEMM's error bound), the order
    descending wherever neighbours are that far apart, the values to fp32."""
    values, indices, _, _ = torch_backend.topk_encode(x, W, b, b_dec, k)
    (want_values, want_indices), pre = exact_topk(x, W, b, b_dec, k)
    kth_gap = want_values[:, k - 1] - torch.sort(pre, dim=1, descending=True).values[:, k]
    fp32_error = (4 * (x.shape[1] + 2) * selection.FP32_UNIT * (x - b_dec).double().norm(dim=1)
                  * W.double().norm(dim=1).max() + 1e-6 * b.double().abs().max())
    clear = (kth_gap > fp32_error) | (want_values[:, k - 1] == 0)
    assert clear.float().mean() > 0.75, "the test data must be mostly unambiguous"
    assert torch.equal(indices[clear].sort(1).values, want_indices[clear].sort(1).values)
    got_exact = pre.gather(1, indices)
    assert bool((got_exact[:, 1:] <= got_exact[:, :-1] + fp32_error[:, None]).all())
    torch.testing.assert_close(values.double(), got_exact, rtol=1e-5, atol=float(fp32_error.max()))
    return indices


def encoder(n, d, m, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * scale
    W = torch.randn(m, d, generator=g) / d ** 0.5
    b = torch.randn(m, generator=g) * 0.1 * scale
    b_dec = torch.randn(d, generator=g) * 0.1 * scale
    return x, W, b, b_dec


@pytest.mark.parametrize("rescoring", ["row order", "latent order"])
@pytest.mark.parametrize("n, d, m, k", [(37, 24, 1000, 5), (64, 64, 4096, 32), (9, 33, 517, 1), (130, 96, 8192, 64)])
def test_random_inputs_equal_fp32(monkeypatch, n, d, m, k, rescoring):
    # An encoder counts as cache-resident (rescored row by row) below CACHE_RESIDENT_BYTES.
    monkeypatch.setattr(torch_backend, "CACHE_RESIDENT_BYTES", 2**40 if rescoring == "row order" else 0)
    x, W, b, b_dec = encoder(n, d, m, seed=n + m)
    assert_exact(x, W, b, b_dec, k)
    stats = torch_backend.SURVIVORS
    assert stats["rows"] > 0  # the cutoff path really ran
    assert k <= stats["survivors"] / stats["rows"] < m / 4


def test_many_values_within_the_bf16_margin():
    """64 near-copies of each of 32 directions: dozens of latents per row lie within bf16's
    error (~0.3 here) of the k-th value, far outside fp32's (~1e-3)."""
    n, d, m, k = 48, 64, 2048, 16
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g)
    base = torch.randn(32, d, generator=g)
    W = base.repeat_interleave(64, 0) + 2e-2 * torch.randn(m, d, generator=g)
    b, b_dec = torch.zeros(m), torch.zeros(d)
    assert_exact(x, W, b, b_dec, k)
    assert torch_backend.SURVIVORS["survivors"] / max(1, torch_backend.SURVIVORS["rows"]) > 2 * k


def test_exact_ties_follow_the_tie_rule():
    """Small integers: every precision computes them exactly, so ties are real ties and the
    lowest latent index must win, as in the reference."""
    n, d, m, k = 40, 16, 1536, 8
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-2, 3, (n, d), generator=g).float()
    W = torch.randint(-1, 2, (m, d), generator=g).float()
    b, b_dec = torch.zeros(m), torch.zeros(d)
    values, indices, _, _ = torch_backend.topk_encode(x, W, b, b_dec, k)
    want_values, want_indices = reference.topk_encode(x, W, b, k, b_dec)
    assert torch.equal(indices, want_indices) and torch.equal(values, want_values)
    assert torch_backend.SURVIVORS["rows"] > 0


def test_all_negative_and_mostly_negative_rows_are_decided_by_the_signed_gemm():
    """Rows whose top-k holds ReLU zeros: no positive cut exists, so every entry that could be
    positive is rescored, and the zeros go to the lowest other indices (the tie rule)."""
    n, d, m, k = 12, 32, 1024, 8
    x, W, b, b_dec = encoder(n, d, m, seed=3)
    x[:4] = b_dec  # pre = b on rows 0..3: three positives, then zeros at the lowest other latents
    b[:] = -5.0
    b[[1, 3, 50]] = 1.0
    x[4:8] *= 0.01  # pre about b: the same three positives, then zeros
    values, indices, _, _ = torch_backend.topk_encode(x, W, b, b_dec, k)
    want_values, want_indices = reference.topk_encode(x, W, b, k, b_dec)
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(values, want_values)
    assert indices[0].tolist() == [1, 3, 50, 0, 2, 4, 5, 6]
    assert bool((want_values[4:8, 0] > 0).all() and (want_values[4:8, 3:] == 0).all())
    stats = torch_backend.SURVIVORS
    assert stats["signed_rows"] >= 8 and stats["hard_rows"] == 0


def test_rows_whose_kth_value_is_within_the_error_of_zero():
    """k or more positives, the k-th of them below twice the bf16 error: no positive cut decides
    the row, the signed GEMM does."""
    n, d, m, k = 16, 32, 2048, 8
    x, W, b, b_dec = encoder(n, d, m, seed=12)
    xc = x - b_dec
    W[:k] = xc[0] / xc[0].norm() ** 2 * 1e-3  # pre = 1e-3 + b on row 0, for latents 0..k-1
    b[:] = -50.0
    b[:k] = torch.linspace(1e-3, 2e-3, k)
    values, indices, _, _ = torch_backend.topk_encode(x, W, b, b_dec, k)
    want_values, want_indices = reference.topk_encode(x, W, b, k, b_dec)
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(values, want_values, rtol=1e-5, atol=1e-7)
    assert bool((want_values[0] > 0).all()) and float(want_values[0, -1]) < 1e-2
    assert torch_backend.SURVIVORS["hard_rows"] == 0 and torch_backend.SURVIVORS["signed_rows"] >= 1


def positives_in_two_groups(n, seed):
    """Rows whose positive pre-activations all lie in latents 0..127 (two groups), at least k=8
    of them: a trained encoder's negative biases leave positives in few groups, so the k-th
    group maximum is 0 and decides nothing."""
    n, d, m, k = n, 32, 2048, 8
    x, W, b, b_dec = encoder(n, d, m, seed=seed)
    b[:128], b[128:] = 3.0, -100.0
    pre = torch.relu((x - b_dec) @ W.t() + b)
    assert bool(((selection.group_maxima(pre) > 0).sum(1) < k).all())
    assert bool(((pre > 0).sum(1) > k).all())
    return x, W, b, b_dec, k


def test_rows_whose_positives_lie_in_few_groups_are_cut_by_their_own_kth_value():
    n = 24
    x, W, b, b_dec, k = positives_in_two_groups(n, seed=10)
    assert_exact(x, W, b, b_dec, k)
    stats = torch_backend.SURVIVORS
    assert stats["rows"] == n and stats["hard_rows"] == 0  # no row took the fp32 GEMM
    assert stats["own_kth_rows"] == n and stats["signed_rows"] == 0
    assert stats["survivors"] / n < 128


@pytest.mark.parametrize("scale", [1e-6, 1e6, 1e18])
def test_huge_and_tiny_norms(scale):
    x, W, b, b_dec = encoder(50, 48, 2048, seed=4, scale=scale)
    assert_exact(x, W, b, b_dec, 16)


def test_rows_differing_in_scale_within_one_batch():
    x, W, b, b_dec = encoder(64, 32, 2048, seed=5)
    x[::2] *= 1e4  # the error bound is per row: small rows must not inherit a large margin
    b_dec.zero_()
    b.zero_()
    assert_exact(x, W, b, b_dec, 16)


@pytest.fixture(scope="module")
def minilm_encoder(tmp_path_factory):
    """(activations, W): 1024 MiniLM block-3 residual-stream rows of the default corpus (what the
    demo trains on), and an 8x random encoder whose first d_in latents align with real rows."""
    pytest.importorskip("transformers")
    from fastsae.corpus import default_corpus
    from fastsae.sources import load_default_model
    from fastsae.store import collect_to_store
    model, tokenizer, info = load_default_model()
    store = collect_to_store(model, tokenizer, default_corpus(), "blocks.3.hook_resid_post",
                             tmp_path_factory.mktemp("minilm"), 1024, batch_size=16, context_length=64,
                             shard_tokens=1024, progress=False)
    acts = store.read_shard(0)["activations"].float()
    d = acts.shape[1]
    W = torch.randn(8 * d, d, generator=torch.Generator().manual_seed(6)) / d ** 0.5
    W[: d] = acts[:d] / acts[:d].norm(dim=1, keepdim=True)  # latents aligned with real directions
    return acts, W


def test_real_activations(minilm_encoder):
    acts, W = minilm_encoder
    assert_exact(acts, W, torch.zeros(W.shape[0]), acts.mean(0), 32)


# (x scale, W scale): ordinary; rows whose float32 squares underflow (norm 0 in float32); the
# same against huge weights; subnormal inputs, and subnormal weights, against huge partners
# (the bf16 dot-product instructions read subnormals as zero).
UNDERFLOWING = [(1.0, 1.0), (1e-24, 1.0), (1e-24, 1e17), (1.0, 1e-24), (1e-39, 1e17), (1e17, 1e-39)]


@pytest.mark.parametrize("x_scale, w_scale", UNDERFLOWING)
def test_error_bound_holds_on_the_gemm(x_scale, w_scale):
    """The bound on |bf16 GEMM - exact| that the cut rests on, against float64."""
    x, W, b, b_dec = encoder(64, 96, 1024, seed=7, scale=x_scale)
    W, b = W * w_scale, b * w_scale
    lp = torch_backend.LowPrecisionWeights(W, b)
    xc = x - b_dec
    xc16 = xc.to(torch.bfloat16)
    s = torch.ops.mkldnn._linear_pointwise(xc16, lp.W, lp.b, "none", [], "").double()
    exact = xc.double() @ W.double().t() + b.double()
    e = selection.input_error(xc, xc16, lp.residuals).double()
    u = selection.BF16_UNIT
    # |p - exact| <= u |p| / (1 - u) + e for the rounded output p
    assert bool(((s - exact).abs() <= u * s.abs() / (1 - u) + e[:, None]).all())
    if x_scale == w_scale == 1.0:  # and it is not vacuous where norms are representable
        assert float((s - exact).abs().max()) > 0.01 * float(e.min())


def test_norm_bound_holds_where_float32_squares_underflow():
    gen = torch.Generator().manual_seed(9)
    assert float(torch.full((1, 48), 1e-24).norm()) == 0.0  # what the bound must survive
    for scale in (1.0, 1e-20, 1e-24, 1e-40):
        v = torch.randn(16, 48, generator=gen) * scale
        assert bool((1.01 * selection.norm_bound(v).double() >= v.double().norm(dim=1)).all())


@pytest.mark.parametrize("x_scale, w_scale", UNDERFLOWING[1:])
def test_underflowing_norms_and_subnormal_operands(x_scale, w_scale):
    """The bound is then dominated by what underflow and flushing can hide (about 1e-18 times
    the other side's norm), so every row takes the fp32 GEMM, and the answer stays exact."""
    x, W, b, b_dec = encoder(50, 48, 2048, seed=4, scale=x_scale)
    assert_exact(x, W * w_scale, b * w_scale, b_dec, 16)
    assert torch_backend.SURVIVORS["hard_rows"] == 50


@pytest.mark.parametrize("scale", [1.0, 1e-24])
def test_a_cancellation_bf16_rounds_away(scale):
    """Latent 10's big weights cancel on x but for x[0]'s last bits, which bf16 rounds away:
    exactly, latent 10 is the top one; in bf16 it falls below latent 200. The bound must see
    it at every scale, also where float32 squares of x underflow."""
    d, m, k = 16, 512, 2
    x = torch.zeros(4, d)
    x[:, :3] = torch.tensor([1 + 2 ** -10, 1.0, 1.0]) * scale
    W = torch.zeros(m, d)
    W[10, :3] = torch.tensor([1000.0, -1000.0, 0.5])
    W[100, 2], W[200, 2] = 1.0, 0.9
    b, b_dec = torch.zeros(m), torch.zeros(d)
    values, indices, _, _ = torch_backend.topk_encode(x, W, b, b_dec, k)
    want_values, want_indices = reference.topk_encode(x, W, b, k, b_dec)
    assert indices[0].tolist() == [10, 100]
    assert torch.equal(indices, want_indices) and torch.equal(values, want_values)


def test_subnormal_inputs_the_bf16_instructions_read_as_zero():
    """x[0] = 2^-127 is subnormal: a bf16 unit's dot-product instructions read it as zero and
    give latent 0 (exactly 2^-67, the top) the value 0, below latent 200's bias."""
    d, m = 16, 256
    x = torch.zeros(8, d)
    x[:, 0] = 2.0 ** -127
    W = torch.zeros(m, d)
    W[0, 0] = 2.0 ** 60
    b, b_dec = torch.zeros(m), torch.zeros(d)
    b[200] = 1e-21
    lp = torch_backend.LowPrecisionWeights(W, b)
    if torch_backend._BF16_UNIT is not None:  # AVX512-BF16 and AMX flush by their definition; emulation need not
        assert float(torch.ops.mkldnn._linear_pointwise(x.bfloat16(), lp.W, lp.b, "none", [], "")[0, 0]) == 0.0
    values, indices, _, _ = torch_backend.topk_encode(x, W, b, b_dec, 1)
    want_values, want_indices = reference.topk_encode(x, W, b, 1, b_dec)
    assert want_indices[0].tolist() == [0]
    assert torch.equal(indices, want_indices) and torch.equal(values, want_values)


def test_fp32_mode_is_the_plain_gemm(monkeypatch):
    monkeypatch.setenv("FASTSAE_CPU_ENCODE_GEMM", "fp32")
    x, W, b, b_dec = encoder(20, 16, 512, seed=8)
    torch_backend.topk_encode(x, W, b, b_dec, 4)
    assert torch_backend.SURVIVORS["rows"] == 0
    assert "forced by FASTSAE_CPU_ENCODE_GEMM" in torch_backend.cpu_encoder_gemms()["topk, batchtopk"]


def test_a_onednn_without_bf16_keeps_every_encode_on_fp32(monkeypatch):
    """Decided once by a probe call: where oneDNN refuses bfloat16, even a forced bf16 mode runs
    the fp32 GEMM (no failing bf16 call per encode), and `fastsae info` says why."""
    def fp32_only(x, *args):
        if x.dtype == torch.bfloat16:
            raise RuntimeError("could not create a primitive descriptor")
        return torch.ops.mkldnn._linear_pointwise(x, *args)

    assert torch_backend._onednn_runs(fp32_only, torch.float32)
    assert not torch_backend._onednn_runs(fp32_only, torch.bfloat16)
    monkeypatch.setattr(torch_backend, "_ONEDNN_LINEAR", fp32_only)
    monkeypatch.setattr(torch_backend, "_ONEDNN_BF16", False)
    monkeypatch.setenv("FASTSAE_CPU_ENCODE_GEMM", "bf16")
    x, W, b, b_dec = encoder(20, 16, 512, seed=8)
    values, indices = torch_backend.topk_encode(x, W, b, b_dec, 4)[:2]
    want_values, want_indices = reference.topk_encode(x, W, b, 4, b_dec)
    torch.testing.assert_close(values, want_values)
    assert torch.equal(indices, want_indices)
    assert torch_backend.SURVIVORS["rows"] == 0
    torch_backend.threshold_encode(x, W, b, b_dec, quantile_cutoffs(W, b, b_dec, 0.99))
    assert torch_backend.THRESHOLD_STATS["rows"] == 0
    assert "runs no bfloat16 linear" in torch_backend.cpu_encoder_gemms()["topk, batchtopk"]


def test_blocked_bf16_weights_give_the_plain_weights_answers(monkeypatch):
    """The encoder's bf16 copy in oneDNN's blocked layout (where the probe says this torch
    takes it) changes no output of the TopK or the threshold encode."""
    x, W, b, b_dec = encoder(300, 40, 2048, seed=31)
    cutoffs = quantile_cutoffs(W, b, b_dec, 0.99)
    assert torch_backend.LowPrecisionWeights(W, b).W.is_mkldnn == torch_backend._ONEDNN_BLOCKED_BF16
    said = "oneDNN's blocked layout" in torch_backend.cpu_encoder_gemms()["topk, batchtopk"]
    assert said == torch_backend._ONEDNN_BLOCKED_BF16  # `fastsae info` says so
    blocked = torch_backend.topk_encode(x, W, b, b_dec, 16) + torch_backend.threshold_encode(x, W, b, b_dec, cutoffs)
    monkeypatch.setattr(torch_backend, "_ONEDNN_BLOCKED_BF16", False)
    assert not torch_backend.LowPrecisionWeights(W, b).W.is_mkldnn
    assert "blocked layout" not in torch_backend.cpu_encoder_gemms()["topk, batchtopk"]
    plain = torch_backend.topk_encode(x, W, b, b_dec, 16) + torch_backend.threshold_encode(x, W, b, b_dec, cutoffs)
    assert all(torch.equal(got, want) for got, want in zip(blocked, plain))
    assert torch_backend.SURVIVORS["rows"] == 600 and torch_backend.THRESHOLD_STATS["rows"] == 600


def test_the_blocked_layout_probe_refuses_a_torch_without_it(monkeypatch):
    def missing(W, batch_size=None):
        raise RuntimeError("mkldnn::_reorder_linear_weight: no kernel")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", missing)
    assert not torch_backend._blocked_weights_run()


def test_bad_mode_names_the_variable(monkeypatch):
    monkeypatch.setenv("FASTSAE_CPU_ENCODE_GEMM", "fp16")
    with pytest.raises(ValueError, match="FASTSAE_CPU_ENCODE_GEMM must be one of"):
        torch_backend.topk_encode(*encoder(4, 8, 512, seed=9), 2)


@pytest.mark.parametrize("dead_count", [0, 1, 300, 1024])
def test_auxk_among_dead_latents(dead_count):
    n, d, m, k, k_aux = 24, 32, 1024, 8, 64
    x, W, b, b_dec = encoder(n, d, m, seed=10)
    dead = torch.zeros(m, dtype=torch.bool)
    dead[torch.randperm(m, generator=torch.Generator().manual_seed(11))[:dead_count]] = True
    _, _, aux_values, aux_indices = torch_backend.topk_encode(x, W, b, b_dec, k, dead, k_aux)
    want_values, want_indices = reference.topk_aux(x, W, b, dead, k_aux, b_dec)
    assert torch.equal(aux_indices, want_indices)
    torch.testing.assert_close(aux_values, want_values)


# ----------------------------------------------------------------------------- threshold encoders

def assert_threshold_exact(x, W, b, b_dec, cutoff):
    """Against float64: every entry further above its cutoff than fp32 can resolve is in the
    code, every entry further below is not, values to fp32; and the pattern equals the fp32
    GEMM path's wherever that is so. Returns the code."""
    values, indices, row_offsets = torch_backend.threshold_encode(x, W, b, b_dec, cutoff)
    pre = (x.double() - b_dec.double()) @ W.double().t() + b.double()
    fp32_error = (4 * (x.shape[1] + 2) * selection.FP32_UNIT * (x - b_dec).double().norm(dim=1, keepdim=True)
                  * W.double().norm(dim=1).max() + 1e-6 * (b.double().abs().max() + cutoff.double().abs().max()))
    code = torch.zeros_like(pre, dtype=torch.bool)
    rows = torch.repeat_interleave(torch.arange(x.shape[0]), row_offsets.diff())
    code[rows, indices] = True
    assert bool(code[pre > cutoff.double() + fp32_error].all()), "an entry clearly above its cutoff is missing"
    assert not bool(code[pre < cutoff.double() - fp32_error].any()), "an entry clearly below its cutoff is kept"
    torch.testing.assert_close(values.double(), pre[rows, indices], rtol=1e-5, atol=float(fp32_error.max()))
    assert bool((indices[1:] > indices[:-1])[(rows[1:] == rows[:-1])].all())  # ascending within a row
    return values, indices, row_offsets


def quantile_cutoffs(W, b, b_dec, q, scale=1.0, seed=99):
    """Per-latent cutoffs at the q-quantile of each latent's pre-activations on 4096 other
    rows of the same distribution (a JumpReLU-like code with about 1 - q of its entries open)."""
    x = torch.randn(4096, W.shape[1], generator=torch.Generator().manual_seed(seed)) * scale
    return torch.quantile((x - b_dec) @ W.t() + b, q, dim=0)


@pytest.mark.parametrize("rescoring", ["row order", "latent order"])
@pytest.mark.parametrize("n, d, m, q", [(37, 24, 1000, 0.97), (130, 96, 8192, 0.99), (9, 33, 517, 0.995)])
def test_threshold_encode_in_bf16_equals_fp32(monkeypatch, n, d, m, q, rescoring):
    monkeypatch.setattr(torch_backend, "CACHE_RESIDENT_BYTES", 2**40 if rescoring == "row order" else 0)
    x, W, b, b_dec = encoder(n, d, m, seed=n + d)
    cutoff = quantile_cutoffs(W, b, b_dec, q)
    assert_threshold_exact(x, W, b, b_dec, cutoff)
    stats = torch_backend.THRESHOLD_STATS
    assert stats["rows"] == n and stats["fp32_rows"] == 0  # the bf16 path decided every row
    assert stats["candidates"] < n * m / 16


def test_threshold_entries_within_the_bf16_margin_of_their_cutoff():
    """Row 0 (scaled up) is above the 99th-percentile cutoff of about a quarter of the latents;
    those latents' cutoffs are moved to 1e-4 above or below row 0's pre-activation: far inside
    bf16's error, far outside fp32's, so the rescoring alone decides them."""
    n, d, m = 64, 48, 2048
    x, W, b, b_dec = encoder(n, d, m, seed=20)
    x[0] *= 4
    cutoff = quantile_cutoffs(W, b, b_dec, 0.99)
    pre0 = ((x[:1] - b_dec) @ W.t() + b)[0]
    close = pre0 > cutoff
    above = close & (torch.arange(m) % 2 == 0)
    cutoff = torch.where(close, pre0 + torch.where(above, -1e-4, 1e-4), cutoff)
    values, indices, row_offsets = assert_threshold_exact(x, W, b, b_dec, cutoff)
    assert close.sum() > 300
    assert torch.equal(indices[:row_offsets[1]], above.nonzero().squeeze(1))  # the ones just above, only
    assert torch_backend.THRESHOLD_STATS["fp32_rows"] == 0


def test_threshold_at_exact_ties_is_strict():
    """Small integers are exact in every precision: pre == cutoff is left out, as in the reference."""
    n, d, m = 40, 16, 1536
    g = torch.Generator().manual_seed(21)
    x = torch.randint(-2, 3, (n, d), generator=g).float()
    W = torch.randint(-1, 2, (m, d), generator=g).float()
    b, b_dec = torch.zeros(m), torch.zeros(d)
    cutoff = torch.full((m,), 9.0)  # 2% of the entries above, 1% at it
    values, indices, row_offsets = torch_backend.threshold_encode(x, W, b, b_dec, cutoff)
    want_values, want_indices, want_offsets = ops.threshold_encode(x, W, b, cutoff, b_dec, backend="reference")
    assert torch.equal(indices, want_indices) and torch.equal(row_offsets, want_offsets)
    assert torch.equal(values, want_values)
    assert torch_backend.THRESHOLD_STATS["rows"] == n


def test_a_dense_threshold_code_falls_back_to_the_fp32_gemm(monkeypatch):
    """A ReLU code with half its entries open: the first row block finds too many candidates and
    the batch runs the fp32 GEMM, with the fp32 path's exact answer."""
    monkeypatch.setattr(torch_backend, "CPU_BLOCK_BYTES", 64 * 2048 * 4)  # 64-row blocks
    x, W, b, b_dec = encoder(200, 32, 2048, seed=22)
    zero = torch.zeros(2048)
    got = torch_backend.threshold_encode(x, W, b, b_dec, zero)
    monkeypatch.setenv("FASTSAE_CPU_ENCODE_GEMM", "fp32")
    want = torch_backend.threshold_encode(x, W, b, b_dec, zero)
    assert all(torch.equal(a, w) for a, w in zip(got, want))
    assert torch_backend.THRESHOLD_STATS["fp32_rows"] == 200 and torch_backend.THRESHOLD_STATS["rows"] == 0


@pytest.mark.parametrize("scale", [1e-6, 1e6, 1e-24, 1e-39])
def test_threshold_huge_and_tiny_norms(scale):
    # 1e-24: float32 squares of x underflow; 1e-39: x is subnormal. Both bf16 blocks then have
    # too many candidates and run the fp32 GEMM.
    x, W, b, b_dec = encoder(50, 48, 2048, seed=23, scale=scale)
    assert_threshold_exact(x, W, b, b_dec, quantile_cutoffs(W, b, b_dec, 0.99, scale=scale))
    assert torch_backend.THRESHOLD_STATS["rows" if scale in (1e-6, 1e6) else "fp32_rows"] == 50


def test_threshold_real_activations(minilm_encoder):
    """Cutoffs at each latent's 99th percentile (a JumpReLU SAE's sparsity)."""
    acts, W = minilm_encoder
    b, b_dec = torch.zeros(W.shape[0]), acts.mean(0)
    cutoff = torch.quantile((acts - b_dec) @ W.t() + b, 0.99, dim=0)
    assert_threshold_exact(acts, W, b, b_dec, cutoff)
    assert torch_backend.THRESHOLD_STATS["fp32_rows"] == 0


@pytest.mark.parametrize("kind", ["relu", "jumprelu", "gated"])
def test_threshold_kinds_through_ops_match_the_reference(kind):
    """The autograd ops on the bf16 path: forward and gradients against fastsae.reference."""
    n, d, m = 48, 40, 1200
    x, W, b, b_dec = encoder(n, d, m, seed=25)
    b = b - 2.0  # a sparse code (2% open), so the bf16 path keeps it
    params = [t.clone().requires_grad_(True) for t in (W, b, b_dec)]
    results = {}
    for backend in ("torch", "reference"):
        Wp, bp, bdp = (t.detach().clone().requires_grad_(True) for t in params)
        if kind == "relu":
            values, indices, row_offsets = ops.relu_encode(x, Wp, bp, bdp, backend=backend)
        elif kind == "jumprelu":
            values, indices, row_offsets, _ = ops.jumprelu_encode(x, Wp, bp, torch.full((m,), -0.5), bdp,
                                                                  backend=backend)
        else:
            values, _, indices, row_offsets = ops.gated_encode(x, Wp, bp, torch.zeros(m), torch.zeros(m), bdp,
                                                               backend=backend)
        (values * torch.arange(values.numel())).sum().backward()
        results[backend] = (values.detach(), indices, row_offsets, Wp.grad, bp.grad, bdp.grad)
    got, want = results["torch"], results["reference"]
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    for a, w in zip(got[:1] + got[3:], want[:1] + want[3:]):
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-5 * float(w.abs().max()))  # sums in another order
    assert torch_backend.THRESHOLD_STATS["rows"] > 0 and torch_backend.THRESHOLD_STATS["fp32_rows"] == 0


@pytest.mark.parametrize("kind", ["topk", "threshold"])
def test_auto_mode_keeps_small_batches_on_the_fp32_gemm(monkeypatch, kind):
    """Below BF16_MIN_ROWS rows the per-call bf16 copy of the encoder would not pay: "auto" runs fp32."""
    monkeypatch.setenv("FASTSAE_CPU_ENCODE_GEMM", "auto")
    monkeypatch.setattr(torch_backend, "_BF16_UNIT", "AVX512-BF16")
    monkeypatch.setattr(torch_backend, "BF16_MIN_ROWS", 64)
    x, W, b, b_dec = encoder(64, 32, 2048, seed=26)
    cutoff = quantile_cutoffs(W, b, b_dec, 0.99)
    stats = torch_backend.SURVIVORS if kind == "topk" else torch_backend.THRESHOLD_STATS

    def encode(rows):
        if kind == "topk":
            return torch_backend.topk_encode(x[:rows], W, b, b_dec, 8)
        return torch_backend.threshold_encode(x[:rows], W, b, b_dec, cutoff)

    encode(63)
    assert stats["rows"] == 0
    encode(64)
    assert stats["rows"] == 64


@pytest.mark.parametrize("kind", ["topk", "threshold"])
def test_a_nan_weight_row_gives_the_fp32_paths_answer(monkeypatch, kind):
    """A NaN encoder row leaves the bf16 error bound undefined: the encode is the fp32 path's
    (not rows of -inf, or an empty code, from a NaN cut)."""
    x, W, b, b_dec = encoder(40, 32, 2048, seed=27)
    W[7] = float("nan")
    cutoff = quantile_cutoffs(W.nan_to_num(), b, b_dec, 0.99)

    def encode():
        if kind == "topk":
            return torch_backend.topk_encode(x, W, b, b_dec, 8)[:2]
        return torch_backend.threshold_encode(x, W, b, b_dec, cutoff)

    got = encode()
    monkeypatch.setenv("FASTSAE_CPU_ENCODE_GEMM", "fp32")
    want = encode()
    assert all(torch.equal(a, w) for a, w in zip(got, want))
    assert bool(torch.isfinite(got[0]).all()) and got[0].numel() > 0


def test_bf16_bits_compare_as_the_values_do():
    """The selection reads the ReLU'd bf16 GEMM output as int16 bits: for every bf16 p >= 0
    (+0.0, -0.0, subnormals, the largest finite, inf) and every cut v > 0 (bf16 values
    themselves, values between two of them, inf), p >= v exactly when bits(p) >=
    bf16_ceil_bits(v); the group maxima of the bits are the bits of the maxima."""
    g = torch.Generator().manual_seed(3)
    every_bf16 = torch.arange(0, 0x7F81, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)  # 0 .. inf
    p = torch.cat([every_bf16, torch.tensor([-0.0], dtype=torch.bfloat16)])
    between = every_bf16[1:-1].float() * (1 + torch.rand(every_bf16.numel() - 2, generator=g) * 2 ** -9)
    cuts = torch.cat([every_bf16[1:].float(), between, torch.tensor([1e-45, 3.4e38, float("inf")])])
    for v in cuts[torch.randperm(cuts.numel(), generator=g)[:300]].tolist() + [float("inf"), 1e-45]:
        v = torch.tensor([v])
        want = p.float() >= v
        got = selection.bf16_bits(p) >= selection.bf16_ceil_bits(v)
        assert torch.equal(got, want), v
    assert not bool((selection.bf16_bits(p) >= selection.NO_BITS_SURVIVE).any())
    # The in-place mask the encode uses: the comparison's answer, but for -0.0, which may survive.
    cut_bits = selection.bf16_ceil_bits(cuts[torch.randperm(cuts.numel(), generator=g)[:64]])
    cut_bits = torch.cat([cut_bits, torch.tensor([selection.NO_BITS_SURVIVE, 1], dtype=torch.int16)])
    bits = selection.bf16_bits(p).expand(cut_bits.numel(), -1)
    got = selection.bits_at_least_(bits.clone(), cut_bits)
    want = bits >= cut_bits[:, None]
    negative_zero = bits == selection.bf16_bits(torch.tensor([-0.0], dtype=torch.bfloat16))
    wraps = negative_zero & (cut_bits >= 2)[:, None]  # -32768 - (cut - 1) overflows to > 0
    assert torch.equal(got, want | wraps)
    assert not bool(got[-2, :-1].any()) and bool(got[-1, 1:-1].all()) and not bool(got[-1, 0])
    rows = p[torch.randint(0, p.numel(), (7, 640), generator=g)]
    assert torch.equal(selection.bits_to_float(selection.group_maxima(selection.bf16_bits(rows))),
                       selection.group_maxima(rows.float()))


@pytest.mark.parametrize("shape", [(64, 4096), (512, 640), (3, 9), (300, 100), (1, 1 << 15)])
@pytest.mark.parametrize("density", [0.0, 0.004, 0.3, 1.0])
def test_sparse_nonzero_equals_nonzero(shape, density):
    """Word-wise compaction (masks of at least SPARSE_NONZERO_MIN entries, rows a multiple
    of 8 wide) and the plain fallback both give torch.nonzero's rows and columns, in order."""
    g = torch.Generator().manual_seed(shape[0] + int(density * 1000))
    mask = torch.rand(shape, generator=g) < density
    rows, cols = selection.sparse_nonzero(mask)
    want_rows, want_cols = mask.nonzero(as_tuple=True)
    assert torch.equal(rows, want_rows) and torch.equal(cols, want_cols)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_rows", [512, 7])  # one block; several, the last one partial
def test_rounded_encoder_equals_the_whole_matrix_formulas(monkeypatch, dtype, block_rows):
    """The copy is W.to(dtype) and the residuals are those of the whole matrix at once, however
    the rows are blocked; the bias is rounded (bf16 GEMM) or kept exact (float16 mv); a NaN or
    Inf weight leaves no bound."""
    monkeypatch.setattr(selection, "ROUNDING_ROWS", block_rows)
    gen = torch.Generator().manual_seed(1)
    W, b = torch.randn(45, 13, generator=gen) * 3, torch.randn(45, generator=gen)
    low, b_low, res = selection.rounded_encoder(W, b, dtype)
    assert torch.equal(low, W.to(dtype)) and torch.equal(b_low, b.to(dtype))
    Wh = W.to(dtype).float()
    assert res.wh_max == float(selection.norm_bound(Wh).max())
    assert res.wl_max == float(selection.norm_bound(W - Wh).max())
    assert res.bl_max == float((b - b.to(dtype).float()).abs().max()) > 0 and res.finite
    _, b_kept, res = selection.rounded_encoder(W, b, dtype, round_bias=False)
    assert torch.equal(b_kept, b) and b_kept.dtype == torch.float32 and res.bl_max == 0.0
    W[44, 12] = float("nan")
    assert not selection.rounded_encoder(W, b, dtype)[2].finite
