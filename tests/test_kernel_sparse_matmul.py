"""The Triton sparse matmuls against dense float64 PyTorch and against the torch backend.

Shapes are odd and tiny on purpose: nothing is a multiple of a block size, and the kernels
run under the interpreter on CPU. bf16/fp16 cases need a GPU (the interpreter's bf16 is
broken) and run wherever CUDA is present.
"""
import pytest
import torch

from fastsae import torch_backend as tb
from fastsae.kernels import sparse_matmul as sm

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="bf16/fp16 kernels are checked on a GPU (interpreter bf16 is broken)")

# (N, d, m, k, kind): tails in every dimension, k=1, k=m, k > 16 so entry chunks loop, and each
# kind of code (see pairs_code) on a small and a larger shape.
PAIR_CASES = [
    (1, 5, 3, 1, "repeat"),
    (7, 63, 50, 1, "distinct"),
    (7, 70, 3, 3, "distinct"),
    (7, 70, 3, 3, "repeat"),
    (7, 63, 50, 50, "distinct"),
    (7, 63, 50, 8, "skewed"),
    (7, 70, 50, 8, "unused"),
    (33, 70, 130, 8, "distinct"),
    (33, 70, 130, 8, "unused"),
    (33, 5, 130, 20, "repeat"),
    (33, 5, 130, 20, "skewed"),
]


# ----------------------------------------------------------------------------- codes


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def pairs_code(n, m, k, kind, seed=0):
    """A fixed-k code on CPU. kind: 'distinct' (top-k-like rows), 'repeat' (latents repeat within
    and across rows), 'unused' (only a few latents ever appear), 'skewed' (latent m-1 dominates)."""
    gen = _gen(seed)
    if kind == "distinct":
        indices = torch.stack([torch.randperm(m, generator=gen)[:k] for _ in range(n)])
    elif kind == "repeat":
        indices = torch.randint(0, m, (n, k), generator=gen)
    elif kind == "unused":
        few = torch.tensor([0, m // 2, m - 1]).unique()
        indices = few[torch.randint(0, few.numel(), (n, k), generator=gen)]
    elif kind == "skewed":
        indices = torch.randint(0, m, (n, k), generator=gen)
        indices[torch.rand(n, k, generator=gen) < 0.8] = m - 1
    else:
        raise AssertionError(kind)
    values = torch.randn(n, k, generator=gen)
    return values, indices


def csr_code(n, m, lengths, seed=0, skewed=False):
    gen = _gen(seed)
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    assert lengths.numel() == n
    row_offsets = torch.zeros(n + 1, dtype=torch.long)
    row_offsets[1:] = torch.cumsum(lengths, 0)
    nnz = int(row_offsets[-1])
    indices = torch.randint(0, m, (nnz,), generator=gen)
    if skewed:
        indices[torch.rand(nnz, generator=gen) < 0.8] = 0
    values = torch.randn(nnz, generator=gen)
    return values, indices, row_offsets


def random_lengths(n, max_len, seed):
    lengths = torch.randint(0, max_len + 1, (n,), generator=_gen(seed))
    lengths[::3] = 0  # empty rows, including the first
    return lengths


def _row_ids(row_offsets):
    counts = row_offsets[1:] - row_offsets[:-1]
    return torch.repeat_interleave(torch.arange(counts.numel()), counts)


def dense_code(values, indices, m, row_offsets=None):
    """The [N, m] float64 code; repeated latents within a row add up."""
    if row_offsets is None:
        n = indices.shape[0]
        rows = torch.arange(n).unsqueeze(1).expand_as(indices).reshape(-1)
        values, indices = values.reshape(-1), indices.reshape(-1)
    else:
        n = row_offsets.numel() - 1
        rows = _row_ids(row_offsets)
    dense = torch.zeros(n, m, dtype=torch.float64)
    dense.index_put_((rows, indices.long()), values.double(), accumulate=True)
    return dense


def _to(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def close(actual, expected, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(actual.cpu().double(), expected.cpu().double(), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- fixed-k code


@pytest.mark.parametrize("n,d,m,k,kind", PAIR_CASES)
def test_pairs_primitives(device, n, d, m, k, kind):
    values, indices = pairs_code(n, m, k, kind, seed=n * 1000 + d + m + k)
    gen = _gen(1)
    W = torch.randn(m, d, generator=gen)
    g = torch.randn(n, d, generator=gen)
    bias = torch.randn(d, generator=gen)
    dense = dense_code(values, indices, m)
    W64, g64 = W.double(), g.double()
    v_, i_, W_, g_, b_ = _to(device, values, indices, W, g, bias)

    expected = dense @ W64 + bias.double()
    out = sm.gather(v_, i_, W_, b_)
    assert out.dtype == torch.float32 and out.shape == (n, d) and out.device.type == device.type
    close(out, expected)
    close(out, tb.gather(values, indices, W, bias))
    close(sm.gather(v_, i_, W_), dense @ W64)

    out = sm.gather_dot(g_, i_, W_)
    assert out.shape == (n, k)
    close(out, (g64 @ W64.T).gather(1, indices))
    close(out, tb.gather_dot(g, indices, W))

    out = sm.scatter_add(v_, i_, g_, m)
    assert out.shape == (m, d)
    close(out, dense.T @ g64)
    close(out, tb.scatter_add(values, indices, g, m))
    unused = dense.abs().sum(0) == 0
    assert (out.cpu()[unused] == 0).all()


def test_int32_indices_and_offsets_match_int64(device):
    values, indices = pairs_code(7, 50, 5, "repeat")
    W, g = torch.randn(50, 20), torch.randn(7, 20)
    v, i64, W, g = _to(device, values, indices, W, g)
    i32 = i64.to(torch.int32)
    assert torch.equal(sm.gather(v, i32, W), sm.gather(v, i64, W))
    assert torch.equal(sm.gather_dot(g, i32, W), sm.gather_dot(g, i64, W))
    assert torch.equal(sm.scatter_add(v, i32, g, 50), sm.scatter_add(v, i64, g, 50))
    offsets = torch.arange(8, device=device) * 5
    vf, if32, if64 = v.reshape(-1), i32.reshape(-1), i64.reshape(-1)
    for o in (offsets, offsets.to(torch.int32)):
        assert torch.equal(sm.csr_gather(vf, if32, o, W), sm.csr_gather(vf, if64, offsets, W))
        assert torch.equal(sm.csr_gather_dot(g, if32, o, W), sm.csr_gather_dot(g, if64, offsets, W))
        assert torch.equal(sm.csr_scatter_add(vf, if32, o, g, 50), sm.csr_scatter_add(vf, if64, offsets, g, 50))


def test_pairs_zero_k(device):
    n, d, m = 5, 9, 4
    values, indices = torch.zeros(n, 0, device=device), torch.zeros(n, 0, dtype=torch.long, device=device)
    W, g, bias = torch.randn(m, d, device=device), torch.randn(n, d, device=device), torch.randn(d, device=device)
    close(sm.gather(values, indices, W, bias), bias.expand(n, d))
    assert sm.gather_dot(g, indices, W).shape == (n, 0)
    assert torch.equal(sm.scatter_add(values, indices, g, m), torch.zeros(m, d, device=device))


def test_weight_row_slice_is_accepted(device):
    """A W with a row stride larger than d (a column slice of a wider matrix) works."""
    values, indices = pairs_code(7, 50, 4, "repeat")
    wide = torch.randn(50, 80)
    W = wide[:, 3:66]
    g = torch.randn(7, 80)[:, 5:68]
    dense = dense_code(values, indices, 50)
    v, i, W_, g_ = _to(device, values, indices, W, g)
    close(sm.gather(v, i, W_), dense @ W.double())
    close(sm.gather_dot(g_, i, W_), (g.double() @ W.double().T).gather(1, indices))
    close(sm.scatter_add(v, i, g_, 50), dense.T @ g.double())


# ----------------------------------------------------------------------------- CSR code


CSR_CASES = [
    # (N, d, m, lengths or max row length, skewed)
    (1, 5, 3, [3], False),
    (7, 63, 50, 9, False),
    (33, 70, 130, 20, False),
    (33, 5, 3, 6, True),
    (7, 70, 50, [0, 0, 0, 40, 0, 0, 0], True),
    (7, 63, 50, [0] * 7, False),
]


@pytest.mark.parametrize("n,d,m,lengths,skewed", CSR_CASES)
def test_csr_primitives(device, n, d, m, lengths, skewed):
    if isinstance(lengths, int):
        lengths = random_lengths(n, lengths, seed=n + d + m)
    values, indices, row_offsets = csr_code(n, m, lengths, seed=n * 7 + d, skewed=skewed)
    gen = _gen(2)
    W = torch.randn(m, d, generator=gen)
    g = torch.randn(n, d, generator=gen)
    bias = torch.randn(d, generator=gen)
    dense = dense_code(values, indices, m, row_offsets)
    W64, g64 = W.double(), g.double()
    v_, i_, o_, W_, g_, b_ = _to(device, values, indices, row_offsets, W, g, bias)

    out = sm.csr_gather(v_, i_, o_, W_, b_)
    assert out.shape == (n, d)
    close(out, dense @ W64 + bias.double())
    close(out, tb.csr_gather(values, indices, row_offsets, W, bias))
    close(sm.csr_gather(v_, i_, o_, W_), dense @ W64)

    out = sm.csr_gather_dot(g_, i_, o_, W_)
    assert out.shape == (indices.numel(),)
    close(out, (g64 @ W64.T)[_row_ids(row_offsets), indices])
    if indices.numel():
        close(out, tb.csr_gather_dot(g, indices, row_offsets, W))

    out = sm.csr_scatter_add(v_, i_, o_, g_, m)
    assert out.shape == (m, d)
    close(out, dense.T @ g64)
    close(out, tb.csr_scatter_add(values, indices, row_offsets, g, m))


def test_csr_of_uniform_rows_equals_pairs(device):
    """A fixed-k code read as CSR gives the same bits as the pairs form."""
    n, d, m, k = 7, 70, 50, 6
    values, indices = pairs_code(n, m, k, "repeat")
    offsets = torch.arange(n + 1) * k
    W, g = torch.randn(m, d), torch.randn(n, d)
    v, i, o, W, g = _to(device, values, indices, offsets, W, g)
    assert torch.equal(sm.csr_gather(v.reshape(-1), i.reshape(-1), o, W), sm.gather(v, i, W))
    assert torch.equal(sm.csr_gather_dot(g, i.reshape(-1), o, W), sm.gather_dot(g, i, W).reshape(-1))
    assert torch.equal(sm.csr_scatter_add(v.reshape(-1), i.reshape(-1), o, g, m), sm.scatter_add(v, i, g, m))


def test_csr_zero_rows(device):
    d, m = 9, 4
    empty_f = torch.zeros(0, device=device)
    empty_i = torch.zeros(0, dtype=torch.long, device=device)
    offsets = torch.zeros(1, dtype=torch.long, device=device)
    W, g = torch.randn(m, d, device=device), torch.zeros(0, d, device=device)
    assert sm.csr_gather(empty_f, empty_i, offsets, W).shape == (0, d)
    assert sm.csr_gather_dot(g, empty_i, offsets, W).shape == (0,)
    assert torch.equal(sm.csr_scatter_add(empty_f, empty_i, offsets, g, m), torch.zeros(m, d, device=device))


# ----------------------------------------------------------------------------- determinism


def test_scatter_add_is_deterministic(device):
    """Bitwise equal across runs, with one latent holding most entries (many chunks)."""
    n, d, m, k = 33, 70, 50, 8
    values, indices = pairs_code(n, m, k, "skewed", seed=5)
    g = torch.randn(n, d, generator=_gen(6)) * 1e3  # big magnitudes make order effects visible
    v, i, g = _to(device, values, indices, g)
    first = sm.scatter_add(v, i, g, m)
    assert torch.equal(first, sm.scatter_add(v, i, g, m))
    offsets = torch.arange(n + 1, device=device) * k
    first = sm.csr_scatter_add(v.reshape(-1), i.reshape(-1), offsets, g, m)
    assert torch.equal(first, sm.csr_scatter_add(v.reshape(-1), i.reshape(-1), offsets, g, m))


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_a_hot_latent_is_reduced_in_pieces(device, monkeypatch, chunk):
    """A latent holding 80% of the entries (about 210) is split into pieces of `chunk` entries,
    summed in piece order: the dense result, bit for bit the same on a rerun; latents of one
    piece, empty latents and CSR rows of every length too."""
    monkeypatch.setattr(sm, "SCATTER_CHUNK", chunk)
    n, d, m, k = 33, 70, 50, 8
    values, indices = pairs_code(n, m, k, "skewed", seed=5)
    g = torch.randn(n, d, generator=_gen(6))
    v, i, g_ = _to(device, values, indices, g)
    out = sm.scatter_add(v, i, g_, m)
    close(out, dense_code(values, indices, m).T @ g.double())
    assert torch.equal(out, sm.scatter_add(v.clone(), i.clone(), g_, m))  # a new grouping, the same sums
    cv, ci, co = csr_code(n, m, random_lengths(n, 40, seed=3), seed=4, skewed=True)
    cv_, ci_, co_ = _to(device, cv, ci, co)
    close(sm.csr_scatter_add(cv_, ci_, co_, g_, m), dense_code(cv, ci, m, co).T @ g.double())


def test_a_code_is_grouped_once_for_its_scatters(device, monkeypatch):
    """The decoder's and the encoder's weight gradients and the bias's scatter along the same
    indices: one sort; indices changed in place (a new version) are grouped again."""
    sorts = []
    real_sort = torch.sort
    monkeypatch.setattr(torch, "sort", lambda *a, **kw: sorts.append(1) or real_sort(*a, **kw))
    n, d, m, k = 9, 12, 20, 3
    values, indices = pairs_code(n, m, k, "repeat", seed=1)
    v, i, g = _to(device, values, indices, torch.randn(n, d, generator=_gen(2)))
    first = sm.scatter_add(v, i, g, m)
    sm.scatter_add(v * 2, i, g[:, :5].contiguous(), m)
    sm.scatter_add(v, i.reshape(-1)[None].reshape(n, k), g, m)  # another view of the same indices
    assert len(sorts) == 1
    i[0, 0] = (i[0, 0] + 1) % m
    changed = sm.scatter_add(v, i, g, m)
    assert len(sorts) == 2 and not torch.equal(changed, first)
    close(changed, dense_code(values, i.cpu(), m).T @ g.cpu().double())


@pytest.mark.skipif(not CUDA, reason="bigger shapes: only meaningful (and fast) on a GPU")
def test_scatter_add_is_deterministic_at_scale():
    n, d, m, k = 4096, 1024, 8192, 32
    values, indices = pairs_code(n, m, k, "skewed", seed=7)
    g = torch.randn(n, d, generator=_gen(8))
    v, i, g = _to("cuda", values, indices, g)
    runs = [sm.scatter_add(v, i, g, m) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


# ----------------------------------------------------------------------------- half precision


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d,m,k", [(7, 70, 50, 8), (33, 4096, 130, 64), (513, 384, 6144, 32)])
def test_half_precision(dtype, n, d, m, k):
    values, indices = pairs_code(n, m, k, "repeat", seed=3)
    gen = _gen(4)
    W = torch.randn(m, d, generator=gen).to(dtype)
    g = torch.randn(n, d, generator=gen).to(dtype)
    bias = torch.randn(d, generator=gen).to(dtype)
    values = values.to(dtype)
    # The reference sees the same rounded inputs; only the kernel's accumulation and final
    # rounding differ, so the tolerance is a few output ulps.
    dense = dense_code(values, indices, m)
    W64, g64 = W.double(), g.double()
    v, i, W_, g_, b_ = _to("cuda", values, indices, W, g, bias)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 4e-3, "atol": 4e-3}

    out = sm.gather(v, i, W_, b_)
    assert out.dtype == dtype
    close(out, dense @ W64 + bias.double(), **tol)
    out = sm.gather_dot(g_, i, W_)
    assert out.dtype == dtype
    close(out, (g64 @ W64.T).gather(1, indices), **tol)
    out = sm.scatter_add(v, i, g_, m)
    assert out.dtype == dtype
    close(out, dense.T @ g64, **tol)

    offsets = (torch.arange(n + 1) * k).cuda()
    close(sm.csr_gather(v.reshape(-1), i.reshape(-1), offsets, W_, b_), dense @ W64 + bias.double(), **tol)
    close(sm.csr_gather_dot(g_, i.reshape(-1), offsets, W_), (g64 @ W64.T).gather(1, indices).reshape(-1), **tol)
    close(sm.csr_scatter_add(v.reshape(-1), i.reshape(-1), offsets, g_, m), dense.T @ g64, **tol)


# ----------------------------------------------------------------------------- argument checks


def _args(device):
    n, d, m, k = 4, 6, 5, 2
    values, indices = pairs_code(n, m, k, "repeat")
    W, g, bias = torch.randn(m, d), torch.randn(n, d), torch.randn(d)
    offsets = torch.arange(n + 1) * k
    v, i, W, g, b, o = _to(device, values, indices, W, g, bias, offsets)
    return {"v": v, "i": i, "W": W, "g": g, "b": b, "o": o, "vf": v.reshape(-1), "if_": i.reshape(-1)}


BAD_CALLS = [
    # (id, call, exception, message pattern)
    ("values dtype", lambda a: sm.gather(a["v"].double(), a["i"], a["W"]), TypeError,
     r"values must have dtype torch\.float32"),
    ("W dtype", lambda a: sm.gather(a["v"].double(), a["i"], a["W"].double()), TypeError,
     r"W must be float32, bfloat16 or float16, got torch\.float64"),
    ("W not tensor", lambda a: sm.gather(a["v"], a["i"], a["W"].tolist()), TypeError,
     r"W must be a torch\.Tensor"),
    ("indices dtype", lambda a: sm.gather(a["v"], a["i"].float(), a["W"]), TypeError,
     r"indices must be int64 \(or int32\), got torch\.float32"),
    ("indices 1-D", lambda a: sm.gather(a["vf"], a["if_"], a["W"]), ValueError,
     r"indices must be 2-D"),
    ("values shape", lambda a: sm.gather(a["v"][:, :1].contiguous(), a["i"], a["W"]), ValueError,
     r"values must have shape \(4, 2\), got \(4, 1\)"),
    ("values contiguity", lambda a: sm.gather(a["v"].T.contiguous().T, a["i"], a["W"]), ValueError,
     r"values must be contiguous"),
    ("indices contiguity", lambda a: sm.gather_dot(a["g"], a["i"].T.contiguous().T, a["W"]), ValueError,
     r"indices must be contiguous"),
    ("W stride", lambda a: sm.gather(a["v"], a["i"], a["W"].T.contiguous().T), ValueError,
     r"W must have unit stride along its last dimension"),
    ("bias shape", lambda a: sm.gather(a["v"], a["i"], a["W"], a["b"][:3]), ValueError,
     r"bias must have shape \(6,\), got \(3,\)"),
    ("index range", lambda a: sm.gather(a["v"], a["i"] + 10, a["W"]), ValueError,
     r"indices must lie in \[0, 5\)"),
    ("negative index", lambda a: sm.gather_dot(a["g"], a["i"] - 10, a["W"]), ValueError,
     r"indices must lie in \[0, 5\)"),
    ("device", lambda a: sm.gather(a["v"].to("meta"), a["i"], a["W"]), ValueError,
     r"values is on meta but W is on"),
    ("g width", lambda a: sm.gather_dot(a["g"][:, :4], a["i"], a["W"]), ValueError,
     r"g must have shape \(N, 6\)"),
    ("g rows", lambda a: sm.gather_dot(a["g"][:3], a["i"], a["W"]), ValueError,
     r"indices must have shape \(3, k\)"),
    ("g dtype", lambda a: sm.gather_dot(a["g"].half(), a["i"], a["W"]), TypeError,
     r"g must have dtype torch\.float32"),
    ("num_rows negative", lambda a: sm.scatter_add(a["v"], a["i"], a["g"], -1), ValueError,
     r"num_rows must be a non-negative int, got -1"),
    ("num_rows type", lambda a: sm.scatter_add(a["v"], a["i"], a["g"], 5.0), ValueError,
     r"num_rows must be a non-negative int"),
    ("num_rows too small", lambda a: sm.scatter_add(a["v"], a["i"], a["g"], 1), ValueError,
     r"indices must lie in \[0, 1\)"),
    ("scatter values dtype", lambda a: sm.scatter_add(a["v"].half(), a["i"], a["g"], 5), TypeError,
     r"values must have dtype torch\.float32"),
    ("scatter rows", lambda a: sm.scatter_add(a["v"][:2].contiguous(), a["i"][:2].contiguous(), a["g"], 5),
     ValueError, r"indices must have shape \(4, k\)"),
    ("csr indices 2-D", lambda a: sm.csr_gather(a["v"], a["i"], a["o"], a["W"]), ValueError,
     r"indices must be 1-D"),
    ("offsets dtype", lambda a: sm.csr_gather(a["vf"], a["if_"], a["o"].float(), a["W"]), TypeError,
     r"row_offsets must be int64"),
    ("offsets end", lambda a: sm.csr_gather(a["vf"], a["if_"], a["o"][:-1], a["W"]), ValueError,
     r"row_offsets must start at 0 and end at nnz=8, got 0 and 6"),
    ("offsets order", lambda a: sm.csr_gather(a["vf"], a["if_"], torch.tensor([0, 4, 2, 6, 8]).to(a["o"].device),
                                              a["W"]), ValueError, r"row_offsets must be non-decreasing"),
    ("offsets empty", lambda a: sm.csr_gather(a["vf"], a["if_"], a["o"][:0], a["W"]), ValueError,
     r"row_offsets must have N \+ 1 >= 1 entries"),
    ("offsets length vs g", lambda a: sm.csr_gather_dot(a["g"], a["if_"], a["o"][:-1], a["W"]), ValueError,
     r"row_offsets must have shape \(5,\)"),
    ("csr scatter offsets", lambda a: sm.csr_scatter_add(a["vf"], a["if_"], a["o"] + 1, a["g"], 5), ValueError,
     r"row_offsets must start at 0 and end at nnz=8, got 1 and 9"),
    ("csr scatter range", lambda a: sm.csr_scatter_add(a["vf"], a["if_"], a["o"], a["g"], 2), ValueError,
     r"indices must lie in \[0, 2\)"),
]


@pytest.mark.parametrize("call,exc,pattern", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments(device, monkeypatch, call, exc, pattern):
    # Index values are range-checked by default only on CPU (on a GPU it costs a host sync).
    monkeypatch.setattr(sm, "_CHECK_INDEX_VALUES", True)
    with pytest.raises(exc, match=pattern):
        call(_args(device))


def test_cpu_index_values_checked_by_default():
    """On CPU the range check costs no device sync, so it is always on."""
    if not sm._interpreting():
        pytest.skip("CPU tensors reach the kernels only under the interpreter")
    values, indices = pairs_code(3, 5, 2, "repeat")
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 5\)"):
        sm.gather(values, indices + 5, torch.randn(5, 4))
