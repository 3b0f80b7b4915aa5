"""fastsae.ops on every backend against fastsae.reference: values, indices and gradients."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.profiler import ProfilerActivity, profile

from fastsae import ops, torch_backend
from fastsae import reference as R

# "triton" runs under the interpreter on CPU: tiny shapes only.
BACKENDS = ["torch", "triton"]


def make_encoder(n, d_in, d_sae, dtype=torch.float64, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(n, d_in, generator=g, dtype=dtype), torch.randn(d_sae, d_in, generator=g, dtype=dtype),
               torch.randn(d_sae, generator=g, dtype=dtype), torch.randn(d_in, generator=g, dtype=dtype)]
    return [t.requires_grad_(grad) for t in tensors]


def grads(out, inputs, seed=1):
    """Gradients of a fixed random projection of the outputs, so every output element counts."""
    g = torch.Generator().manual_seed(seed)
    total = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in out if o.is_floating_point())
    return torch.autograd.grad(total, inputs, allow_unused=True)


def assert_close_all(a, b, **tol):
    for x, y in zip(a, b):
        if x is None or y is None:
            assert x is None and y is None or (x if x is not None else y).abs().max() == 0
        else:
            torch.testing.assert_close(x, y, **tol)


def as_float32(tensors):
    return [t.detach().float().requires_grad_() for t in tensors]


# ----------------------------------------------------------------------------- TopK


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d_in,d_sae,k", [(1, 3, 7, 1), (5, 19, 50, 4), (9, 5, 13, 13), (4, 33, 30, 30)])
def test_topk_encode_matches_reference(backend, n, d_in, d_sae, k):
    dtype = torch.float32 if backend == "triton" else torch.float64
    inputs = make_encoder(n, d_in, d_sae, dtype=dtype)
    v, i = ops.topk_encode(*inputs[:3], k, inputs[3], backend=backend)
    rv, ri = R.topk_encode(*inputs[:3], k, inputs[3])
    torch.testing.assert_close(v, rv)
    assert torch.equal(i, ri)
    assert_close_all(grads([v], inputs), grads([rv], inputs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_ties_and_all_negative_rows(backend):
    # Integer weights make many pre-activations equal; the last rows are all negative.
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [-5.0, -5.0]])
    W = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [2.0, 2.0]])
    b = torch.tensor([0.0, 0.0, 1.0, -1.0, 0.0, -10.0])
    v, i = ops.topk_encode(x, W, b, 3, backend=backend)
    rv, ri = R.topk_encode(x, W, b, 3)
    assert torch.equal(i, ri) and torch.equal(v, rv)
    assert i[0].tolist() == [0, 1, 2]  # three latents at 1.0: lowest indices first
    assert i[3].tolist() == [0, 1, 2] and v[3].abs().sum() == 0  # all-negative row


def test_topk_gradcheck_float64():
    inputs = make_encoder(6, 5, 11)
    assert torch.autograd.gradcheck(lambda x, W, b, bd: ops.topk_encode(x, W, b, 3, bd, backend="torch")[0], inputs)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 17), d_in=st.integers(1, 23), d_sae=st.integers(1, 41), k_frac=st.floats(0, 1),
       seed=st.integers(0, 2**16), quantize=st.booleans())
def test_topk_torch_randomized(n, d_in, d_sae, k_frac, seed, quantize):
    k = max(1, round(k_frac * d_sae))
    inputs = make_encoder(n, d_in, d_sae, seed=seed)
    if quantize:  # coarse values create ties
        inputs = [t.detach().round().requires_grad_() for t in inputs]
    v, i = ops.topk_encode(*inputs[:3], k, inputs[3], backend="torch")
    rv, ri = R.topk_encode(*inputs[:3], k, inputs[3])
    assert torch.equal(i, ri)
    torch.testing.assert_close(v, rv)
    assert_close_all(grads([v], inputs), grads([rv], inputs))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dead", ["none", "all", "some"])
def test_topk_aux_matches_reference(backend, dead):
    n, d_in, d_sae, k, k_aux = 5, 7, 20, 3, 6
    dtype = torch.float32 if backend == "triton" else torch.float64
    inputs = make_encoder(n, d_in, d_sae, dtype=dtype)
    mask = {"none": torch.zeros(d_sae, dtype=torch.bool), "all": torch.ones(d_sae, dtype=torch.bool),
            "some": torch.arange(d_sae) % 5 == 0}[dead]  # "some": 4 dead latents < k_aux
    out = ops.topk_encode_aux(*inputs[:3], k, inputs[3], mask, k_aux, backend=backend)
    rv, ri = R.topk_encode(*inputs[:3], k, inputs[3])
    av, ai = R.topk_aux(*inputs[:3], mask, k_aux, inputs[3])
    torch.testing.assert_close(out[0], rv)
    torch.testing.assert_close(out[2], av)
    assert torch.equal(out[1], ri) and torch.equal(out[3], ai)
    assert_close_all(grads([out[0], out[2]], inputs), grads([rv, av], inputs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dead", ["all", "some", "one", "none"])
def test_dead_topk_encode_matches_the_reference_selection(dtype, dead):
    """AuxK's selection on its own (a JumpReLU's): values, ids, the tie rule and gradients as
    reference.topk_aux, with fewer dead latents than slots and rows of ReLU zeros (ties)."""
    n, d_in, d_sae, k_aux = 9, 7, 20, 6
    inputs = make_encoder(n, d_in, d_sae, dtype=dtype)
    with torch.no_grad():
        inputs[2][:10] -= 4.0  # latents 0-9 rarely positive: rows with fewer positives than slots
    mask = {"all": torch.ones(d_sae, dtype=torch.bool), "some": torch.arange(d_sae) % 3 == 0,
            "one": torch.arange(d_sae) == 4, "none": torch.zeros(d_sae, dtype=torch.bool)}[dead]
    v, i = ops.dead_topk_encode(*inputs[:3], mask, k_aux, inputs[3])
    rv, ri = R.topk_aux(*inputs[:3], mask, k_aux, inputs[3])
    assert v.shape == (n, k_aux) and torch.equal(i, ri)
    torch.testing.assert_close(v, rv)
    assert_close_all(grads([v], inputs), grads([rv], inputs))
    with pytest.raises(ValueError, match=r"dead_mask must be a bool tensor of shape \[20\], got torch.int64 \(20,\)"):
        ops.dead_topk_encode(*inputs[:3], mask.long(), k_aux, inputs[3])
    with pytest.raises(ValueError, match=r"k_aux must be in \[1, d_sae=20\], got 0"):
        ops.dead_topk_encode(*inputs[:3], mask, 0, inputs[3])


@pytest.mark.parametrize("gemm, dense_tensors", [("fp32", 1), ("bf16", 1)])
def test_torch_topk_builds_no_second_dense_tensor(monkeypatch, gemm, dense_tensors):
    """fp32: the pre-activation block alone; bf16: the GEMM's bf16 output alone (half the fp32
    block's bytes; the selection reads its bits, with no float32 copy)."""
    monkeypatch.setenv("FASTSAE_CPU_ENCODE_GEMM", gemm)
    n, d_in, d_sae, k = 256, 64, 4096, 8
    x, W, b, b_dec = make_encoder(n, d_in, d_sae, dtype=torch.float32, grad=False)
    x[:8] = -100.0  # all-zero rows after ReLU take the tie path too
    dense_bytes = n * d_sae * 4

    def big_allocations(backend):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            ops.topk_encode(x, W, b, k, b_dec, backend=backend)
        return [e.name for e in prof.events() if e.self_cpu_memory_usage >= dense_bytes // 2]

    assert len(big_allocations("torch")) == dense_tensors
    assert len(big_allocations("reference")) > 1  # the probe does see dense temporaries


@pytest.mark.parametrize("block_rows", [1, 2, 64])
def test_torch_float32_encoders_in_row_blocks_match_reference(monkeypatch, block_rows):
    """The torch backend's CPU float32 path (oneDNN's fused linear, pre-activations in row
    blocks, as at training sizes) against the reference, with exact ties between latents."""
    n, d_in, d_sae, k, k_aux = 7, 9, 24, 3, 5
    monkeypatch.setattr(torch_backend, "CPU_BLOCK_BYTES", 4 * d_sae * block_rows)
    x, W, b, b_dec = make_encoder(n, d_in, d_sae, dtype=torch.float32, grad=False)
    b[2] = 100.0
    W[5], b[5] = W[2], b[2]  # latents 2 and 5 tie at the top of every row: 2 must come first
    inputs = [t.requires_grad_() for t in (x, W, b, b_dec)]
    dead = torch.arange(d_sae) % 3 == 0
    out = ops.topk_encode_aux(*inputs[:3], k, inputs[3], dead, k_aux, backend="torch")
    rv, ri = R.topk_encode(*inputs[:3], k, inputs[3])
    av, ai = R.topk_aux(*inputs[:3], dead, k_aux, inputs[3])
    torch.testing.assert_close(out[0], rv)
    torch.testing.assert_close(out[2], av)
    assert torch.equal(out[1], ri) and torch.equal(out[3], ai)
    assert (out[1][:, :2] == torch.tensor([2, 5])).all()
    assert_close_all(grads([out[0], out[2]], inputs), grads([rv, av], inputs))
    values, indices, offsets = ops.relu_encode(*inputs[:3], inputs[3], backend="torch")
    torch.testing.assert_close(R.csr_to_dense(values, indices, offsets, d_sae), R.relu_codes(*inputs))


def test_onednn_linear_is_dropped_only_when_its_probe_fails(monkeypatch):
    def unsupported(*args):
        raise RuntimeError("mkldnn linear: unsupported CPU")

    assert torch_backend._onednn_linear_op() is torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", unsupported)
    assert torch_backend._onednn_linear_op() is None


def test_torch_encoder_without_onednn_uses_blas(monkeypatch):
    monkeypatch.setattr(torch_backend, "_ONEDNN_LINEAR", None)
    x, W, b, b_dec = make_encoder(4, 6, 10, dtype=torch.float32, grad=False)
    values, indices = ops.topk_encode(x, W, b, 3, b_dec, backend="torch")
    rv, ri = R.topk_encode(x, W, b, 3, b_dec)
    torch.testing.assert_close(values, rv)
    assert torch.equal(indices, ri)


def test_onednn_error_at_call_time_is_raised_and_the_op_kept(monkeypatch):
    """An error in a call (memory, say) reaches the caller; it does not switch oneDNN off for
    the rest of the process, as a missing oneDNN would."""
    def out_of_memory(*args):
        raise RuntimeError("DefaultCPUAllocator: not enough memory")

    monkeypatch.setattr(torch_backend, "_ONEDNN_LINEAR", out_of_memory)
    x, W, b, b_dec = make_encoder(4, 6, 10, dtype=torch.float32, grad=False)
    with pytest.raises(RuntimeError, match="not enough memory"):
        ops.topk_encode(x, W, b, 3, b_dec, backend="torch")
    assert torch_backend._ONEDNN_LINEAR is out_of_memory


@pytest.mark.parametrize("resident", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("spread", ["narrow", "wide"])
def test_torch_fixed_k_backward_primitives_match_reference(monkeypatch, spread, dtype, resident):
    """gather-dot and scatter-add on every torch path: a narrow code (few distinct latents, as
    AuxK's, done as one small GEMM) and a wide one: the gather-dot in fp32 through
    sampled_addmm (on the code's unsorted columns while W counts as cached, by latent on the
    transposed code otherwise), in float64 through the embedding-bag backward; the scatter-add
    by latent through the embedding-bag forward, and through the embedding-bag backward (the
    path off CPU). With a latent repeated inside a row and latents never used."""
    monkeypatch.setattr(torch_backend, "CACHE_RESIDENT_BYTES", 2**40 if resident else 0)
    n, d, m, k = 40, 6, 300, 3
    gen = torch.Generator().manual_seed(0)
    pool = torch.tensor([5, 17, 200]) if spread == "narrow" else torch.arange(m)
    indices = pool[torch.randint(0, len(pool), (n, k), generator=gen)]
    indices[0] = indices[0, 0]  # one latent three times in a row
    values = torch.randn(n, k, generator=gen, dtype=dtype)
    g = torch.randn(n, d, generator=gen, dtype=dtype)
    W = torch.randn(m, d, generator=gen, dtype=dtype)
    assert (torch_backend._narrow_code(indices, m) is None) == (spread == "wide")
    expected_dot = torch.einsum("nd,nkd->nk", g.double(), W.double()[indices])
    expected_scatter = torch.zeros(m, d, dtype=torch.float64).index_add_(
        0, indices.reshape(-1), values.double().reshape(-1, 1) * g.double().repeat_interleave(k, 0))
    tol = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(torch_backend.gather_dot(g, indices, W).double(), expected_dot, **tol)
    torch.testing.assert_close(torch_backend.scatter_add(values, indices, g, m).double(), expected_scatter, **tol)
    # Each entry's dot is taken on its own: the code's columns in any order within a row give
    # the same bits as the same code sorted (CSR order), entry for entry.
    by_index, place = indices.sort(1)
    sorted_dots = torch_backend.gather_dot(g, by_index, W)
    unsorted_dots = torch_backend.gather_dot(g, indices, W)
    assert torch.equal(unsorted_dots, torch.empty_like(sorted_dots).scatter_(1, place, sorted_dots))
    bag_of_entry, bag_sizes = torch_backend._fixed_bags(n, k, g.device)
    off_cpu = torch_backend._bag_scatter(values.reshape(-1), indices.reshape(-1), bag_of_entry, bag_sizes, g, m)
    torch.testing.assert_close(off_cpu.double(), expected_scatter, **tol)
    again = torch_backend.scatter_add(values, indices, g, m)
    assert torch.equal(again, torch_backend.scatter_add(values, indices, g, m))  # deterministic
    torch_backend._latent_majors.clear()  # grouped afresh: the same answer
    torch_backend._narrow_codes.clear()
    assert torch.equal(again, torch_backend.scatter_add(values, indices, g, m))
    indices[1:] = indices[1:].flip(0)  # changed in place: grouped again, not the stale grouping
    indices[0, 0] = m - 1  # and a narrow code no longer narrow in the same way
    expected_dot = torch.einsum("nd,nkd->nk", g.double(), W.double()[indices])
    expected_scatter = torch.zeros(m, d, dtype=torch.float64).index_add_(
        0, indices.reshape(-1), values.double().reshape(-1, 1) * g.double().repeat_interleave(k, 0))
    torch.testing.assert_close(torch_backend.scatter_add(values, indices, g, m).double(), expected_scatter, **tol)
    torch.testing.assert_close(torch_backend.gather_dot(g, indices, W).double(), expected_dot, **tol)


@pytest.mark.parametrize("k", [1, 2, 5, 9, 10])
def test_torch_stable_topk_with_heavy_ties_matches_reference(k):
    """Scores from {0, 1, 2} (ties at and across the k-th place in most rows, all-zero rows)."""
    gen = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 3, (200, 11), generator=gen).float()
    scores[:5] = 0.0
    ref_vals, ref_idx = R.stable_topk(scores, k)
    vals, idx = torch_backend.stable_topk(scores, k)
    assert torch.equal(vals, ref_vals) and torch.equal(idx, ref_idx)
    scores[5:10] = -0.0  # what a ReLU may leave: ranks as 0.0
    ref_vals, ref_idx = R.stable_topk(scores + 0.0, k)
    vals, idx = torch_backend._nonnegative_topk(scores, k)  # AuxK's: one top-k over unique keys
    assert torch.equal(vals, ref_vals) and torch.equal(idx, ref_idx)


def test_torch_stable_topk_ranks_nan_first_with_a_tie_straddling_the_kth_place():
    """A NaN score ranks above every number (torch.topk's order, the reference's); the zeros
    tied across the k-th place still refill in ascending index order."""
    scores = torch.tensor([[0.0, 0.0, 1.0, 0.0, float("nan"), 2.0], [0.0, 3.0, 0.0, 0.0, 0.0, 0.0]])
    ref_vals, ref_idx = R.stable_topk(scores, 4)
    for top in (torch_backend.stable_topk, torch_backend._nonnegative_topk):
        vals, idx = top(scores, 4)
        assert torch.equal(idx, ref_idx) and torch.equal(idx[0], torch.tensor([4, 5, 2, 0]))
        torch.testing.assert_close(vals, ref_vals, equal_nan=True)


# ----------------------------------------------------------------------------- BatchTopK


@pytest.mark.parametrize("candidates", [1, 2, None])
def test_batch_topk_is_exact(candidates):
    inputs = make_encoder(12, 6, 25, seed=3)
    # Concentrate mass in a few rows so they need more than their share of the batch budget.
    with torch.no_grad():
        inputs[0][:2] *= 10
    values, indices, offsets = ops.batch_topk_encode(*inputs[:3], 2, inputs[3], candidates=candidates)
    dense = R.csr_to_dense(values, indices, offsets, 25)
    expected = R.batch_topk_codes(*inputs[:3], 2, inputs[3])
    torch.testing.assert_close(dense, expected)
    assert int(offsets[1] - offsets[0]) > 2  # a hot row took more than k
    assert_close_all(grads([dense], inputs), grads([expected], inputs))


# ----------------------------------------------------------------------------- decode


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d,m,k", [(1, 5, 3, 1), (7, 63, 50, 4), (33, 70, 130, 3)])
def test_sparse_decode_matches_reference(backend, n, d, m, k):
    dtype = torch.float32 if backend == "triton" else torch.float64
    g = torch.Generator().manual_seed(n)
    values = torch.randn(n, k, generator=g, dtype=dtype, requires_grad=True)
    indices = torch.randint(0, m, (n, k), generator=g)
    indices[:, 0] = 0  # a popular latent, repeated across rows
    W = torch.randn(m, d, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(d, generator=g, dtype=dtype, requires_grad=True)
    out = ops.sparse_decode(values, indices, W, b, backend=backend)
    ref = R.sparse_decode(values, indices, W, b)
    torch.testing.assert_close(out, ref)
    assert_close_all(grads([out], [values, W, b]), grads([ref], [values, W, b]))


def test_sparse_decode_gradcheck_float64():
    values = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    indices = torch.tensor([[0, 1, 1], [2, 0, 4], [4, 4, 4], [0, 0, 1], [3, 2, 1], [1, 1, 0]])
    W = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, W, b: ops.sparse_decode(v, indices, W, b, backend="torch"),
                                    (values, W, b))


def random_csr(n, m, density, dtype, seed, empty_rows=()):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, m, generator=g) < density
    for r in empty_rows:
        mask[r] = False
    dense = torch.randn(n, m, generator=g, dtype=dtype) * mask
    rows, cols = mask.nonzero(as_tuple=True)
    offsets = torch.zeros(n + 1, dtype=torch.long)
    offsets[1:] = mask.sum(1).cumsum(0)
    return dense[rows, cols].clone().requires_grad_(), cols, offsets


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d,m,density,empty",
                         [(6, 5, 9, 0.4, (0, 3)), (3, 17, 20, 0.0, ()), (11, 33, 40, 0.9, (10,))])
def test_csr_decode_matches_reference(backend, n, d, m, density, empty):
    dtype = torch.float32 if backend == "triton" else torch.float64
    values, indices, offsets = random_csr(n, m, density, dtype, seed=m, empty_rows=empty)
    W = torch.randn(m, d, dtype=dtype, requires_grad=True)
    b = torch.randn(d, dtype=dtype, requires_grad=True)
    out = ops.csr_decode(values, indices, offsets, W, b, backend=backend)
    ref = R.csr_decode(values, indices, offsets, W, b)
    torch.testing.assert_close(out, ref)
    for r in empty:
        torch.testing.assert_close(out[r], b)
    assert_close_all(grads([out], [values, W, b]), grads([ref], [values, W, b]))


@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("n,d,m,density,empty", [(13, 7, 30, 0.5, (0, 4, 5, 12)), (16, 5, 24, 0.05, (3,))])
def test_csr_decode_dense_and_sparse_paths(monkeypatch, path, n, d, m, density, empty):
    """A dense code runs as GEMMs on row blocks of its dense form (four rows a block here,
    empty rows on the blocks' edges), a sparse one on the sparse kernels: both the reference."""
    for name in ("DENSE_CSR_SCATTER", "DENSE_CSR_GATHER_DOT", "DENSE_CSR_GATHER"):
        monkeypatch.setattr(torch_backend, name, 0.0 if path == "dense" else 2.0)
    monkeypatch.setattr(torch_backend, "CPU_BLOCK_BYTES", 4 * 4 * m)
    values, indices, offsets = random_csr(n, m, density, torch.float64, seed=n, empty_rows=empty)
    W = torch.randn(m, d, dtype=torch.float64, requires_grad=True)
    b = torch.randn(d, dtype=torch.float64, requires_grad=True)
    out = ops.csr_decode(values, indices, offsets, W, b, backend="torch")
    ref = R.csr_decode(values, indices, offsets, W, b)
    torch.testing.assert_close(out, ref)
    assert_close_all(grads([out], [values, W, b]), grads([ref], [values, W, b]))
    g = torch.randn(n, d, dtype=torch.float64)
    scattered = torch_backend.csr_scatter_add(values.detach(), indices, offsets, g, m)
    torch.testing.assert_close(scattered, R.csr_to_dense(values.detach(), indices, offsets, m).t() @ g)


# ----------------------------------------------------------------------------- ReLU, JumpReLU, Gated


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d_in,d_sae", [(1, 3, 5), (6, 21, 47), (7, 4, 9)])
def test_relu_encode_matches_reference(backend, n, d_in, d_sae):
    dtype = torch.float32 if backend == "triton" else torch.float64
    inputs = make_encoder(n, d_in, d_sae, dtype=dtype, seed=d_sae)
    with torch.no_grad():
        inputs[0][0] = -50 * inputs[1].sum(0).sign()  # a row with (nearly) nothing open
    values, indices, offsets = ops.relu_encode(*inputs[:3], inputs[3], backend=backend)
    dense = R.csr_to_dense(values, indices, offsets, d_sae)
    ref = R.relu_codes(*inputs[:3], inputs[3])
    torch.testing.assert_close(dense, ref)
    assert_close_all(grads([dense], inputs), grads([ref], inputs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gated_encode_matches_reference(backend):
    dtype = torch.float32 if backend == "triton" else torch.float64
    x, W, b, b_dec = make_encoder(8, 6, 19, dtype=dtype, seed=4)
    r_mag = (torch.randn(19, dtype=dtype) * 0.3).requires_grad_()
    b_mag = torch.randn(19, dtype=dtype).requires_grad_()
    with torch.no_grad():
        x[0] = -80 * W.sum(0).sign()  # a row whose gates are all (or nearly all) closed
    inputs = [x, W, b, b_dec, r_mag, b_mag]
    mag, pi, indices, offsets = ops.gated_encode(x, W, b, r_mag, b_mag, b_dec, backend=backend)
    f = R.csr_to_dense(mag, indices, offsets, 19)
    p = R.csr_to_dense(pi, indices, offsets, 19)
    rf, rp = R.gated_codes(x, W, b, r_mag, b_mag, b_dec)
    # Row 0 has inputs of size 80: float32 sums in another order differ by ~1e-5 relative.
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {}
    torch.testing.assert_close(f, rf, **tol)
    torch.testing.assert_close(p, rp, **tol)
    got, want = grads([f, p], inputs), grads([rf, rp], inputs)
    assert_close_all(got, want, **tol)
    assert all(t is not None and t.abs().sum() > 0 for t in got)  # the gate is trained too


def test_jumprelu_forward_and_straight_through_gradient():
    x, W, b, b_dec = make_encoder(9, 5, 12, seed=7)
    log_t = torch.full((12,), 0.3, dtype=torch.float64).log().requires_grad_()
    eps = 0.5
    values, indices, offsets, l0 = ops.jumprelu_encode(x, W, b, log_t, b_dec, bandwidth=eps)
    dense = R.csr_to_dense(values, indices, offsets, 12)
    t = log_t.exp()
    ref = R.jumprelu_codes(x, W, b, t, b_dec)
    torch.testing.assert_close(dense, ref)
    pre = R.preactivations(x, W, b, b_dec)
    torch.testing.assert_close(l0, (pre > t).sum(1).to(l0.dtype))
    # Rectangle-kernel pseudo-gradients, computed densely by hand.
    gv = torch.randn(9, 12, dtype=torch.float64)
    gl = torch.randn(9, dtype=torch.float64)
    loss = (dense * gv).sum() + (l0 * gl).sum()
    g_logt, g_x = torch.autograd.grad(loss, [log_t, x])
    rect = ((pre - t).abs() < eps / 2).double() / eps
    expected_t = (-(t * rect) * gv - rect * gl[:, None]).sum(0) * t
    torch.testing.assert_close(g_logt, expected_t)
    expected_x = ((pre > t).double() * gv) @ W
    torch.testing.assert_close(g_x, expected_x)


# ----------------------------------------------------------------------------- backend choice and errors


def test_backend_resolution_order(monkeypatch):
    cpu = torch.device("cpu")
    assert ops.resolve_backend(None, cpu) == "torch"
    # CUDA with Triton: each primitive timed on its first call (fastsae.autotune); else torch
    assert ops.default_backend("cuda") == ("auto" if ops.triton_available() else "torch")
    monkeypatch.setenv("FASTSAE_BACKEND", "reference")
    assert ops.resolve_backend(None, cpu) == "reference"
    with ops.use_backend("triton"):
        assert ops.resolve_backend(None, cpu) == "triton"
        assert ops.resolve_backend("torch", cpu) == "torch"
    monkeypatch.setenv("FASTSAE_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="FASTSAE_BACKEND must be one of"):
        ops.resolve_backend(None, cpu)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.use_backend("nope").__enter__()


def test_use_backend_changes_the_computation(monkeypatch):
    calls = []
    monkeypatch.setattr(R, "topk_encode", lambda *a: calls.append(1) or (torch.zeros(1, 1), torch.zeros(1, 1)))
    x, W, b, _ = make_encoder(1, 2, 3, grad=False)
    with ops.use_backend("reference"):
        ops.topk_encode(x, W, b, 1)
    assert calls == [1]


@pytest.mark.parametrize("call,error,match", [
    (lambda x, W, b: ops.topk_encode(x[:, :2], W, b, 2), ValueError, "x has d_in=2 but W_enc expects d_in=4"),
    (lambda x, W, b: ops.topk_encode(x, W, b, 0), ValueError, r"k must be in \[1, d_sae=6\], got 0"),
    (lambda x, W, b: ops.topk_encode(x, W, b, 7), ValueError, r"k must be in \[1, d_sae=6\], got 7"),
    (lambda x, W, b: ops.topk_encode(x, W, b, 2.0), TypeError, "k must be an int"),
    (lambda x, W, b: ops.topk_encode(x.double(), W, b, 2), TypeError, "W_enc has dtype torch.float32 but x has"),
    (lambda x, W, b: ops.topk_encode(x, W, b[:5], 2), ValueError, r"b_enc must have shape \[6\]"),
    (lambda x, W, b: ops.topk_encode(x, W, b, 2, torch.zeros(3)), ValueError, r"b_dec must have shape \[4\]"),
    (lambda x, W, b: ops.topk_encode(x.index_fill(0, torch.tensor([1]), float("nan")), W, b, 2), ValueError,
     "x contains NaN or Inf"),
    (lambda x, W, b: ops.topk_encode(x.index_fill(0, torch.tensor([0]), float("inf")), W, b, 2), ValueError,
     "x contains NaN or Inf"),
    (lambda x, W, b: ops.topk_encode(x, W, b, 2, backend="gpu"), ValueError, "backend must be one of"),
    (lambda x, W, b: ops.topk_encode(x, W.to("meta"), b, 2), ValueError, "W_enc is on meta but x is on cpu"),
    (lambda x, W, b: ops.topk_encode_aux(x, W, b, 2, dead_mask=torch.ones(5, dtype=torch.bool), k_aux=2),
     ValueError, r"dead_mask must be a bool tensor of shape \[6\]"),
    (lambda x, W, b: ops.sparse_decode(torch.ones(3, 2), torch.full((3, 2), 6), W, None), ValueError,
     r"indices must lie in \[0, d_sae=6\)"),
    (lambda x, W, b: ops.sparse_decode(torch.ones(3, 2), torch.ones(3, 2), W, None), TypeError,
     "indices must be int32 or int64"),
    (lambda x, W, b: ops.csr_decode(torch.ones(3), torch.zeros(3, dtype=torch.long),
                                    torch.tensor([0, 2]), W, None), ValueError, "row_offsets must end at nnz=3"),
    (lambda x, W, b: ops.jumprelu_encode(x, W, b, torch.zeros(6), bandwidth=0), ValueError,
     "bandwidth must be a positive finite number"),
])
def test_bad_input_names_the_argument(call, error, match):
    x, W, b, _ = make_encoder(3, 4, 6, dtype=torch.float32, grad=False)
    with pytest.raises(error, match=match):
        call(x, W, b)


def test_input_checks_can_be_disabled():
    x, W, b, _ = make_encoder(2, 3, 4, dtype=torch.float32, grad=False)
    x[0, 0] = float("nan")
    with ops.input_checks(False):
        ops.topk_encode(x, W, b, 1)  # no scan, no error
    with pytest.raises(ValueError, match="NaN"):
        ops.topk_encode(x, W, b, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_path_matches_autograd_path(backend):
    # Without gradients the op calls the primitive directly; the result must not change.
    inputs = make_encoder(5, 7, 20, dtype=torch.float32, seed=11)
    dead = torch.arange(20) % 3 == 0
    with_grad = ops.topk_encode_aux(*inputs[:3], 4, inputs[3], dead, 5, backend=backend)
    with torch.no_grad():
        without = ops.topk_encode_aux(*inputs[:3], 4, inputs[3], dead, 5, backend=backend)
    assert all(t.grad_fn is None for t in without)
    for a, b in zip(with_grad, without):
        assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_all_finite_equals_isfinite_all(dtype):
    """The one-pass finiteness check (min and max) answers as torch.isfinite(t).all() does: a
    NaN, +inf or -inf anywhere, alone or together, and an empty tensor."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 11, generator=gen).to(dtype)
    assert bool(ops.all_finite(x))
    for bad in ([float("nan")], [float("inf")], [-float("inf")], [float("inf"), -float("inf")],
                [float("nan"), float("inf")]):
        y = x.clone()
        for value in bad:
            y.view(-1)[torch.randint(0, y.numel(), (1,), generator=gen)] = value
        assert bool(ops.all_finite(y)) == bool(torch.isfinite(y).all()) is False
    assert bool(ops.all_finite(x[:0]))
    assert ops.all_finite(x).shape == () and ops.all_finite(x).dtype == torch.bool
