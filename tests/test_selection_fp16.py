"""The CPU one-row TopK encode from a float16 torch.mv (a decode step's product: selection by
cutoff, survivors rescored in fp32) returns the fp32 answer: values, indices and tie rule, on
random, adversarial and real inputs; and it refuses float16 arithmetic it cannot bound."""
import pytest
import torch
from test_selection import encoder, exact_topk, minilm_encoder, positives_in_two_groups  # noqa: F401  (a fixture)

from fastsae import reference, selection, torch_backend


@pytest.fixture(autouse=True)
def fresh_counts():
    torch_backend.reset_selection_counts()


def fp16_topk(x, W, b, b_dec, k):
    return torch_backend.topk_rows_fp16(x, W, b, b_dec, k, torch_backend.HalfPrecisionEncoder(W, b))


def assert_exact(x, W, b, b_dec, k):
    """As test_selection.assert_exact, for the float16 one-row path: against float64, the set on
    every row fp32 can resolve, the order, the values to fp32."""
    values, indices = fp16_topk(x, W, b, b_dec, k)
    (want_values, want_indices), pre = exact_topk(x, W, b, b_dec, k)
    kth_gap = want_values[:, k - 1] - torch.sort(pre, dim=1, descending=True).values[:, k]
    fp32_error = (4 * (x.shape[1] + 2) * selection.FP32_UNIT * (x - b_dec).double().norm(dim=1)
                  * W.double().norm(dim=1).max() + 1e-6 * b.double().abs().max())
    clear = (kth_gap > fp32_error) | (want_values[:, k - 1] == 0)
    assert bool(clear.all()), "the test data must be unambiguous"
    assert torch.equal(indices.sort(1).values, want_indices.sort(1).values)
    got_exact = pre.gather(1, indices)
    assert bool((got_exact[:, 1:] <= got_exact[:, :-1] + fp32_error[:, None]).all())
    torch.testing.assert_close(values.double(), got_exact, rtol=1e-5, atol=float(fp32_error.max()))


@pytest.mark.parametrize("n, d, m, k", [(1, 256, 4096, 32), (2, 33, 517, 1), (1, 96, 8192, 64), (2, 24, 1000, 5)])
def test_random_rows_equal_fp32(n, d, m, k):
    x, W, b, b_dec = encoder(n, d, m, seed=n + m)
    assert_exact(x, W, b, b_dec, k)
    stats = torch_backend.SURVIVORS
    assert stats["rows"] == n and stats["hard_rows"] == 0  # the cut decided every row
    assert k <= stats["survivors"] / n < m / 4


def test_many_values_within_the_fp16_margin():
    """8 near-copies of each of 256 directions: dozens of latents lie within float16's error of
    the k-th value (perturbations of 1e-4, below float16's resolution of these weights)."""
    d, m, k = 64, 2048, 16
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, d, generator=g)
    W = torch.randn(256, d, generator=g).repeat_interleave(8, 0) + 1e-4 * torch.randn(m, d, generator=g)
    b, b_dec = torch.zeros(m), torch.zeros(d)
    values, indices = fp16_topk(x, W, b, b_dec, k)
    want_values, want_indices = reference.topk_encode(x, W, b, k, b_dec)
    assert torch.equal(indices.sort(1).values, want_indices.sort(1).values)
    torch.testing.assert_close(values, want_values)
    assert torch_backend.SURVIVORS["survivors"] / 2 > 2 * k  # the margin really held many


def test_exact_ties_follow_the_tie_rule():
    """Small integers are exact in every precision: ties are real and the lowest index wins."""
    d, m, k = 16, 1536, 8
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-2, 3, (2, d), generator=g).float()
    W = torch.randint(-1, 2, (m, d), generator=g).float()
    b, b_dec = torch.zeros(m), torch.zeros(d)
    values, indices = fp16_topk(x, W, b, b_dec, k)
    want_values, want_indices = reference.topk_encode(x, W, b, k, b_dec)
    assert torch.equal(indices, want_indices) and torch.equal(values, want_values)
    assert torch_backend.SURVIVORS["rows"] == 2


def test_rows_whose_positives_lie_in_few_groups_are_cut_by_their_own_kth_value():
    x, W, b, b_dec, k = positives_in_two_groups(2, seed=11)
    assert_exact(x, W, b, b_dec, k)
    assert torch_backend.SURVIVORS["rows"] == 2 and torch_backend.SURVIVORS["hard_rows"] == 0


def test_all_negative_and_mostly_negative_rows_are_decided_by_the_signed_survivors():
    """Rows whose top-k holds ReLU zeros: every latent that could be positive is rescored, and
    the zeros go to the lowest other indices."""
    d, m, k = 32, 1024, 8
    x, W, b, b_dec = encoder(3, d, m, seed=3)
    x[0] = b_dec  # pre = b: every pre-activation negative, the top-k is latents 0..k-1 at 0
    b[:] = -5.0
    x[1] *= 0.01  # pre about b: every one negative too
    x[2] = b_dec + W[5] / W[5].norm() ** 2 * 6.0  # latent 5 at about 1, the rest near -5
    values, indices = fp16_topk(x, W, b, b_dec, k)
    want_values, want_indices = reference.topk_encode(x, W, b, k, b_dec)
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(values, want_values)
    assert torch.equal(indices[0], torch.arange(k))
    assert indices[2].tolist() == [5, 0, 1, 2, 3, 4, 6, 7]  # latent 5, then zeros in index order
    assert float(want_values[2, 0]) > 0 and bool((want_values[2, 1:] == 0).all())
    stats = torch_backend.SURVIVORS
    assert stats["rows"] == stats["signed_rows"] == 3 and stats["hard_rows"] == 0


@pytest.mark.parametrize("scale, decided", [(1e-6, True), (1e3, True), (1e6, False), (1e18, False), (1e-24, False)])
def test_tiny_huge_and_out_of_range_rows(scale, decided):
    # 1e-6: float16 subnormals and underflow; 1e6 and 1e18: past float16's range, so the product
    # overflows and the row goes to the fp32 GEMM; 1e-24: x rounds to float16 zeros and its
    # float32 squares underflow, so the bound exceeds every value and the row goes there too.
    x, W, b, b_dec = encoder(2, 48, 2048, seed=4, scale=scale)
    assert_exact(x, W, b, b_dec, 16)
    assert (torch_backend.SURVIVORS["rows"] == 2) == decided


def test_error_bound_holds_on_the_product():
    """The bound on |q - exact| that the cut rests on, against float64, and not vacuous."""
    x, W, b, b_dec = encoder(1, 96, 1024, seed=7)
    half = torch_backend.HalfPrecisionEncoder(W, b)
    xc = x - b_dec
    xh = xc.to(torch.float16)
    q = torch.mv(half.W, xh[0]).float().add_(b)
    exact = (xc.double() @ W.double().t() + b.double())[0]
    bound = selection.fp16_product_error(float(selection.input_error(xc, xh, half.residuals)[0]),
                                         float(q.abs().max()), half.b_absmax)
    error = (q.double() - exact).abs()
    assert float(error.max()) <= bound
    assert float(error.max()) > 0.05 * bound


def test_real_activations(minilm_encoder):  # noqa: F811
    acts, W = minilm_encoder
    b_dec = acts.mean(0)
    for rows in (acts[:1], acts[100:102], acts[517:518]):
        assert_exact(rows, W, torch.zeros(W.shape[0]), b_dec, 32)


def _fp16_accumulating_mv(W16, x16):
    """A matrix-vector product that keeps its running sums in float16 (8 columns at a time)."""
    acc = torch.zeros(W16.shape[0], dtype=torch.float16)
    for start in range(0, W16.shape[1], 8):
        acc = (acc.float() + W16[:, start:start + 8].float() @ x16[start:start + 8].float()).half()
    return acc


def test_float16_accumulation_is_detected_and_the_answer_stays_exact(monkeypatch):
    x, W, b, b_dec = encoder(2, 256, 2048, seed=12)
    monkeypatch.setattr(torch, "mv", _fp16_accumulating_mv)
    half = torch_backend.HalfPrecisionEncoder(W, b)
    assert not half.usable
    values, indices = torch_backend.topk_rows_fp16(x, W, b, b_dec, 16, half)
    want_values, want_indices = reference.topk_encode(x, W, b, 16, b_dec)
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(values, want_values)
    assert torch_backend.SURVIVORS["rows"] == 0


def test_allowed_float16_reductions_turn_the_path_off(monkeypatch):
    x, W, b, b_dec = encoder(1, 64, 2048, seed=13)
    half = torch_backend.HalfPrecisionEncoder(W, b)
    assert half.usable
    monkeypatch.setattr(torch_backend, "_fp16_reduced_precision_allowed", lambda: True)
    values, indices = torch_backend.topk_rows_fp16(x, W, b, b_dec, 8, half)
    assert torch.equal(indices, reference.topk_encode(x, W, b, 8, b_dec)[1])
    assert torch_backend.SURVIVORS["rows"] == 0


def test_weights_past_float16_range_are_not_usable():
    x, W, b, b_dec = encoder(1, 64, 2048, seed=14)
    W[5, 3] = 1e5  # float16's largest finite value is 65504
    assert not torch_backend.HalfPrecisionEncoder(W, b).usable
    assert torch.equal(fp16_topk(x, W, b, b_dec, 8)[1], reference.topk_encode(x, W, b, 8, b_dec)[1])
