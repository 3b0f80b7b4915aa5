"""The variable-L0 encode kernels (fastsae.kernels.encode) against the torch backend and dense
float64 formulas.

Structure tests use dyadic data (small multiples of powers of two): every product and sum
is then exact in fp32, so the kernel, the torch backend and float64 agree bit for bit on
which entries pass the cutoff, even for values that sit exactly on it.
"""
import pytest
import torch

from fastsae import torch_backend as tb
from fastsae.kernels.encode import gated_encode, threshold_encode

SHAPES_N = (1, 6, 19)
SHAPES_D = (3, 21, 40)
SHAPES_M = (5, 47, 129)


def _dyadic(shape, lo, hi, scale, gen):
    return torch.randint(lo, hi + 1, shape, generator=gen).to(torch.float32) * scale


def _problem(n, d, m, seed=0, empty_rows=(), full_rows=()):
    """x, W, b, b_dec, cutoff (fp32, CPU). Latent j reads x[:, 0] with weight 1 and
    b <= cutoff, so a row x = b_dec has no entry above the cutoff and x = b_dec + 64 e_0
    has all of them."""
    g = torch.Generator().manual_seed(seed)
    x = _dyadic((n, d), -8, 8, 0.25, g)
    W = _dyadic((m, d), -8, 8, 0.125, g)
    W[:, 0] = 1.0
    b_dec = _dyadic((d,), -4, 4, 0.25, g)
    cutoff = _dyadic((m,), 0, 8, 0.0625, g)
    b = cutoff - _dyadic((m,), 0, 4, 0.0625, g)
    for r in empty_rows:
        x[r] = b_dec
    for r in full_rows:
        x[r] = b_dec
        x[r, 0] += 64.0
    return x, W, b, b_dec, cutoff


def _to(device, *ts):
    return [None if t is None else t.to(device) for t in ts]


def _pre64(x, W, b, b_dec):
    xc = x.double() if b_dec is None else x.double() - b_dec.double()
    return xc @ W.double().t() + b.double()


def _dense_csr(pre, cutoff):
    """CSR (values, indices, row_offsets) of pre > cutoff, from a dense float64 tensor."""
    mask = pre > cutoff.double()
    row, col = mask.nonzero(as_tuple=True)
    offsets = torch.zeros(pre.shape[0] + 1, dtype=torch.int64)
    offsets[1:] = mask.sum(1).cumsum(0)
    return pre[row, col], col, offsets


def _check_csr(got, want_values, want_indices, want_offsets, atol=1e-5):
    values, indices, offsets = got
    assert indices.dtype == torch.int64 and offsets.dtype == torch.int64
    assert torch.equal(offsets.cpu(), want_offsets.cpu())
    assert torch.equal(indices.cpu(), want_indices.cpu())
    torch.testing.assert_close(values.cpu().double(), want_values.cpu().double(), atol=atol, rtol=1e-5)


@pytest.mark.parametrize("n", SHAPES_N)
@pytest.mark.parametrize("d", SHAPES_D)
@pytest.mark.parametrize("m", SHAPES_M)
def test_threshold_encode_matches_torch_and_float64(device, n, d, m):
    x, W, b, b_dec, cutoff = _to(device, *_problem(n, d, m, seed=n * 1000 + d * 10 + m))
    got = threshold_encode(x, W, b, b_dec, cutoff)
    assert got[0].dtype == torch.float32
    _check_csr(got, *tb.threshold_encode(x, W, b, b_dec, cutoff))
    _check_csr(got, *_dense_csr(_pre64(x.cpu(), W.cpu(), b.cpu(), b_dec.cpu()), cutoff.cpu()))


@pytest.mark.parametrize("capacity", [1, 4, None, 1000])
def test_empty_and_full_rows_with_capacity_retry(device, capacity):
    n, d, m = 19, 21, 129
    x, W, b, b_dec, cutoff = _to(device, *_problem(n, d, m, seed=7, empty_rows=(0, 5, 18), full_rows=(3, 11)))
    values, indices, offsets = threshold_encode(x, W, b, b_dec, cutoff, capacity=capacity)
    counts = offsets.diff().cpu()
    assert counts[[0, 5, 18]].tolist() == [0, 0, 0]
    assert counts[[3, 11]].tolist() == [m, m]
    assert indices[offsets[3]:offsets[4]].cpu().tolist() == list(range(m))
    _check_csr((values, indices, offsets), *tb.threshold_encode(x, W, b, b_dec, cutoff))


def test_every_row_overflows(device):
    # Every row is full, so the whole batch is recomputed on the retry pass.
    n, d, m = 6, 3, 47
    x, W, b, b_dec, cutoff = _to(device, *_problem(n, d, m, seed=3, full_rows=range(6)))
    got = threshold_encode(x, W, b, b_dec, cutoff, capacity=2)
    assert got[2].diff().cpu().tolist() == [m] * n
    _check_csr(got, *tb.threshold_encode(x, W, b, b_dec, cutoff))


def test_all_rows_empty(device):
    n, d, m = 6, 21, 47
    x, W, b, b_dec, cutoff = _to(device, *_problem(n, d, m, seed=4, empty_rows=range(6)))
    values, indices, offsets = threshold_encode(x, W, b, b_dec, cutoff)
    assert values.numel() == 0 and indices.numel() == 0
    assert offsets.cpu().tolist() == [0] * (n + 1)
    assert values.dtype == x.dtype and indices.dtype == torch.int64


def test_zero_rows(device):
    x, W, b, b_dec, cutoff = _to(device, *_problem(1, 5, 7))
    values, indices, offsets = threshold_encode(x[:0], W, b, b_dec, cutoff)
    assert values.numel() == 0 and indices.numel() == 0 and offsets.cpu().tolist() == [0]
    mag, pi, indices, offsets, l1 = gated_encode(x[:0], W, b, b, b, b_dec, dec_norm=b)
    assert mag.numel() == pi.numel() == indices.numel() == l1.numel() == 0 and offsets.cpu().tolist() == [0]


def test_per_latent_cutoff_without_b_dec(device):
    # JumpReLU style: cutoff = threshold - bandwidth / 2 differs per latent, some negative.
    n, d, m = 19, 40, 47
    x, W, b, _, _ = _problem(n, d, m, seed=11)
    g = torch.Generator().manual_seed(12)
    cutoff = _dyadic((m,), -16, 16, 0.125, g)
    x, W, b, cutoff = _to(device, x, W, b, cutoff)
    got = threshold_encode(x, W, b, None, cutoff)
    _check_csr(got, *tb.threshold_encode(x, W, b, None, cutoff))
    _check_csr(got, *_dense_csr(_pre64(x.cpu(), W.cpu(), b.cpu(), None), cutoff.cpu()))


def test_gaussian_data_relu(device):
    # Non-dyadic data: values differ by rounding only; random values avoid the cutoff.
    g = torch.Generator().manual_seed(5)
    n, d, m = 19, 40, 129
    x = torch.randn(n, d, generator=g)
    W = torch.randn(m, d, generator=g) / d ** 0.5
    b = torch.randn(m, generator=g) * 0.1
    b_dec = torch.randn(d, generator=g) * 0.1
    x, W, b, b_dec, zero = _to(device, x, W, b, b_dec, torch.zeros(m))
    got = threshold_encode(x, W, b, b_dec, zero, capacity=8)
    _check_csr(got, *tb.threshold_encode(x, W, b, b_dec, zero), atol=1e-5)


def _gated_problem(n, d, m, seed, **rows):
    x, W, b_gate, b_dec, _ = _problem(n, d, m, seed=seed, **rows)
    g = torch.Generator().manual_seed(seed + 1)
    b_gate = b_gate - 0.5  # some pre-activations sit exactly on 0
    r_mag = torch.randn(m, generator=g) * 0.5
    b_mag = torch.randn(m, generator=g)
    b_mag[::3] = -100.0  # magnitude 0 on these latents even where the gate is open
    dec_norm = torch.rand(m, generator=g) + 0.5
    return x, W, b_gate, r_mag, b_mag, b_dec, dec_norm


def _gated_dense(x, W, b_gate, r_mag, b_mag, b_dec, dec_norm):
    pi = _pre64(x, W, b_gate, b_dec)
    mag = torch.relu(pi * r_mag.double().exp() + b_mag.double())
    mask = pi > 0
    l1 = (torch.relu(pi) * dec_norm.double()).sum(1)
    return pi, mag, mask, l1


@pytest.mark.parametrize("n", SHAPES_N)
@pytest.mark.parametrize("d", SHAPES_D)
@pytest.mark.parametrize("m", SHAPES_M)
@pytest.mark.parametrize("capacity", [None, 3])
def test_gated_encode_matches_dense(device, n, d, m, capacity):
    # The last row has every gate open (over any capacity below d_sae); the first, none.
    cpu = _gated_problem(n, d, m, seed=n + d + m, empty_rows=(0,) if n > 1 else (), full_rows=(n - 1,))
    x, W, b_gate, r_mag, b_mag, b_dec, dec_norm = _to(device, *cpu)
    mag, pi, indices, offsets, l1 = gated_encode(x, W, b_gate, r_mag, b_mag, b_dec, dec_norm=dec_norm,
                                                 capacity=capacity)
    pi64, mag64, mask, l1_64 = _gated_dense(*cpu)
    row, col = mask.nonzero(as_tuple=True)
    # The pattern is the gate, identical to a ReLU threshold_encode of the gate GEMM.
    ref_vals, ref_idx, ref_offs = tb.threshold_encode(x, W, b_gate, b_dec, torch.zeros_like(b_gate))
    _check_csr((pi, indices, offsets), ref_vals, ref_idx, ref_offs)
    _check_csr((pi, indices, offsets), pi64[row, col], col, ref_offs)
    torch.testing.assert_close(mag.cpu().double(), mag64[row, col], atol=1e-5, rtol=1e-5)
    assert (mag == 0).any() and bool((pi > 0).all())  # zero magnitudes are kept; the gate decides
    torch.testing.assert_close(l1.cpu().double(), l1_64, atol=1e-4, rtol=1e-5)
    assert mag.dtype == pi.dtype == l1.dtype == torch.float32


def test_gated_encode_without_dec_norm(device):
    cpu = _gated_problem(6, 21, 47, seed=9)
    x, W, b_gate, r_mag, b_mag, b_dec, _ = _to(device, *cpu)
    out = gated_encode(x, W, b_gate, r_mag, b_mag, b_dec)
    assert len(out) == 4
    pi64, mag64, mask, _ = _gated_dense(*cpu)
    row, col = mask.nonzero(as_tuple=True)
    torch.testing.assert_close(out[0].cpu().double(), mag64[row, col], atol=1e-5, rtol=1e-5)
    assert torch.equal(out[2].cpu(), col)


def test_gated_all_gates_closed(device):
    x, W, b_gate, r_mag, b_mag, b_dec, dec_norm = _to(device, *_gated_problem(6, 21, 47, seed=2, empty_rows=range(6)))
    mag, pi, indices, offsets, l1 = gated_encode(x, W, b_gate, r_mag, b_mag, b_dec, dec_norm=dec_norm)
    assert mag.numel() == pi.numel() == indices.numel() == 0
    assert offsets.cpu().tolist() == [0] * 7
    assert l1.cpu().tolist() == [0.0] * 6


# ------------------------------------------------------------------------------------------
# Argument checks


def _args(device):
    return _to(device, *_problem(4, 8, 16))


def test_threshold_encode_rejects_bad_arguments(device):
    x, W, b, b_dec, cutoff = _args(device)
    with pytest.raises(ValueError, match=r"threshold_encode: x must be a 2-D tensor \[N, d_in\]"):
        threshold_encode(x[0], W, b, b_dec, cutoff)
    with pytest.raises(ValueError, match=r"W must have shape \(d_sae, 8\) to match x's d_in = 8"):
        threshold_encode(x, W[:, :5].contiguous(), b, b_dec, cutoff)
    with pytest.raises(TypeError, match=r"b must have dtype torch.float32 \(the dtype of x\), got torch.float64"):
        threshold_encode(x, W, b.double(), b_dec, cutoff)
    with pytest.raises(ValueError, match=r"b_dec must have shape \(8,\) \[d_in\], got \(7,\)"):
        threshold_encode(x, W, b, b_dec[:7], cutoff)
    with pytest.raises(ValueError, match=r"cutoff must have shape \(16,\) \[d_sae\], got \(15,\)"):
        threshold_encode(x, W, b, b_dec, cutoff[:15])
    with pytest.raises(ValueError, match="W must be contiguous"):
        threshold_encode(x, W.t().contiguous().t(), b, b_dec, cutoff)
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16, got torch.int64"):
        threshold_encode(x.long(), W, b, b_dec, cutoff)
    with pytest.raises(TypeError, match="cutoff must be a torch.Tensor, got float"):
        threshold_encode(x, W, b, b_dec, 0.0)
    with pytest.raises(ValueError, match="capacity must be a positive int or None, got 0"):
        threshold_encode(x, W, b, b_dec, cutoff, capacity=0)


def test_gated_encode_rejects_bad_arguments(device):
    x, W, b, b_dec, _ = _args(device)
    with pytest.raises(ValueError, match=r"gated_encode: r_mag must have shape \(16,\) \[d_sae\], got \(8,\)"):
        gated_encode(x, W, b, b_dec, b, b_dec)
    with pytest.raises(ValueError, match=r"b_mag must be a 1-D tensor \[d_sae\]"):
        gated_encode(x, W, b, b, b[None], b_dec)
    with pytest.raises(TypeError, match=r"dec_norm must have dtype torch.float32"):
        gated_encode(x, W, b, b, b, b_dec, dec_norm=b.half())
    with pytest.raises(ValueError, match=r"W_gate must have d_sae >= 1"):
        gated_encode(x, W[:0], b[:0], b[:0], b[:0], b_dec)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type (CUDA)")
def test_rejects_mixed_devices():
    x, W, b, b_dec, cutoff = _args("cuda")
    with pytest.raises(ValueError, match=r"cutoff must be on cuda:0 \(the device of x\), got cpu"):
        threshold_encode(x, W, b, b_dec, cutoff.cpu())


# ------------------------------------------------------------------------------------------
# 16-bit inputs (the interpreter cannot run bf16/fp16 dots correctly: GPU only)


def _near_cutoff_ok(got_offsets, got_idx, ref_pre, cutoff, tol):
    """Patterns may differ only at entries whose reference value is within tol of the cutoff."""
    n, m = ref_pre.shape
    rows = torch.repeat_interleave(torch.arange(n, device=got_idx.device), got_offsets.diff())
    got_mask = torch.zeros(n, m, dtype=torch.bool, device=got_idx.device)
    got_mask[rows, got_idx] = True
    ref_mask = ref_pre > cutoff
    differ = got_mask ^ ref_mask
    assert bool(((ref_pre - cutoff).abs()[differ] <= tol).all())
    return got_mask & ref_mask, rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16/fp16 kernels are checked on a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d,m", [(19, 40, 129), (300, 256, 1000), (1000, 512, 4096)])
def test_16bit_on_gpu(dtype, n, d, m):
    g = torch.Generator().manual_seed(n + m)
    x = torch.randn(n, d, generator=g).to("cuda", dtype)
    W = (torch.randn(m, d, generator=g) / d ** 0.5).to("cuda", dtype)
    b = (torch.randn(m, generator=g) * 0.1 - 0.5).to("cuda", dtype)
    b_dec = (torch.randn(d, generator=g) * 0.1).to("cuda", dtype)
    r_mag = (torch.randn(m, generator=g) * 0.3).to("cuda", dtype)
    b_mag = torch.randn(m, generator=g).to("cuda", dtype)
    dec_norm = (torch.rand(m, generator=g) + 0.5).to("cuda", dtype)
    cutoff = (torch.rand(m, generator=g) * 0.2).to("cuda", dtype)
    pre = _pre64(x, W, b, b_dec).float()
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3

    values, indices, offsets = threshold_encode(x, W, b, b_dec, cutoff, capacity=16)
    assert values.dtype == dtype
    both, rows = _near_cutoff_ok(offsets, indices, pre, cutoff.float(), tol)
    assert bool((indices[1:] > indices[:-1])[rows[1:] == rows[:-1]].all())  # ascending per row
    keep = both[rows, indices]
    torch.testing.assert_close(values.float()[keep], pre[rows, indices][keep], atol=tol, rtol=1e-2)

    mag, pi, indices, offsets, l1 = gated_encode(x, W, b, r_mag, b_mag, b_dec, dec_norm=dec_norm, capacity=16)
    assert mag.dtype == pi.dtype == l1.dtype == dtype
    both, rows = _near_cutoff_ok(offsets, indices, pre, torch.zeros_like(cutoff).float(), tol)
    keep = both[rows, indices]
    ref_mag = torch.relu(pre * r_mag.float().exp() + b_mag.float())
    torch.testing.assert_close(pi.float()[keep], pre[rows, indices][keep], atol=tol, rtol=1e-2)
    torch.testing.assert_close(mag.float()[keep], ref_mag[rows, indices][keep], atol=2 * tol, rtol=2e-2)
    ref_l1 = (torch.relu(pre) * dec_norm.float()).sum(1)
    torch.testing.assert_close(l1.float(), ref_l1, atol=tol * m ** 0.5, rtol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU fp32 at a larger shape")
def test_fp32_larger_on_gpu():
    n, d, m = 513, 384, 3000
    x, W, b, b_dec, cutoff = _to("cuda", *_problem(n, d, m, seed=21, empty_rows=(2,), full_rows=(7, 500)))
    got = threshold_encode(x, W, b, b_dec, cutoff, capacity=32)
    _check_csr(got, *tb.threshold_encode(x, W, b, b_dec, cutoff))
