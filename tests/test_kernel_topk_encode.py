"""The Triton TopK encode (selection by cutoff on the one encode kernel) against the torch
backend and a dense float64 formula.

On CPU the kernel runs under Triton's interpreter (set up in conftest.py), which is slow and
fp32-only, so shapes stay tiny; bf16/fp16 cases run only with a GPU. Shapes with d_sae >= 300
take the cutoff path (a subset GEMM for the bound, then survivors); smaller ones the dense one.
"""
import itertools

import pytest
import torch

from fastsae import torch_backend
from fastsae.kernels import encode as kmod
from fastsae.kernels.encode import topk_encode

GPU = torch.cuda.is_available()


def dense_reference(x, W, b, b_dec, k, dead_mask=None, k_aux=0):
    """The contract spelled out densely in float64: relu, then a stable descending sort."""
    xc = x.double() - (0 if b_dec is None else b_dec.double())
    pre = xc @ W.double().T + b.double()
    r = torch.relu(pre) + 0.0
    vals, idx = torch.sort(r, dim=-1, descending=True, stable=True)
    out = [vals[:, :k], idx[:, :k]]
    if dead_mask is not None and k_aux > 0:
        masked = torch.where(dead_mask, r, torch.tensor(float("-inf"), dtype=r.dtype, device=r.device))
        av, ai = torch.sort(masked, dim=-1, descending=True, stable=True)
        out += [av[:, :k_aux].clamp_min(0.0), ai[:, :k_aux]]
    else:
        out += [torch.zeros(x.shape[0], k_aux, dtype=r.dtype, device=x.device),
                torch.zeros(x.shape[0], k_aux, dtype=torch.long, device=x.device)]
    return tuple(out)


def assert_same(got, want, atol=1e-4, rtol=1e-5, check_dtype=None):
    names = ("values", "indices", "aux_values", "aux_indices")
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        if name.endswith("indices"):
            assert g.dtype == torch.int64, f"{name}: dtype {g.dtype}"
            assert torch.equal(g.cpu(), w.cpu()), f"{name} differ:\n{g}\n{w}"
        else:
            if check_dtype is not None:
                assert g.dtype == check_dtype, f"{name}: dtype {g.dtype}"
            torch.testing.assert_close(g.double().cpu(), w.double().cpu(), atol=atol, rtol=rtol, msg=name)


def make(n, d_in, d_sae, device, seed, dtype=torch.float32, integer=False, b_dec=True):
    g = torch.Generator().manual_seed(seed)
    if integer:
        # Small integers: every pre-activation is exact in fp32 and many are equal (ties).
        def draw(*shape):
            return torch.randint(-2, 3, shape, generator=g).float()
    else:
        def draw(*shape):
            return torch.randn(*shape, generator=g)
    x, W, b = draw(n, d_in), draw(d_sae, d_in), draw(d_sae)
    bd = draw(d_in) if b_dec else None
    to = dict(device=device, dtype=dtype)
    return x.to(**to), W.to(**to), b.to(**to), None if bd is None else bd.to(**to)


def random_dead(d_sae, device, seed, p=0.3):
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.rand(d_sae, generator=g) < p).to(device)


def check(x, W, b, b_dec, k, dead_mask=None, k_aux=0):
    got = topk_encode(x, W, b, b_dec, k, dead_mask, k_aux)
    assert_same(got, dense_reference(x, W, b, b_dec, k, dead_mask, k_aux), check_dtype=x.dtype)
    assert_same(got, torch_backend.topk_encode(x, W, b, b_dec, k, dead_mask, k_aux), check_dtype=x.dtype)
    return got


SHAPES = list(itertools.product((1, 5, 17), (3, 19, 33), (7, 50, 130)))


@pytest.mark.parametrize("n,d_in,d_sae", SHAPES)
def test_random_sweep(device, n, d_in, d_sae):
    seed = n * 10_000 + d_in * 100 + d_sae
    g = torch.Generator().manual_seed(seed)
    k = int(torch.randint(1, d_sae + 1, (1,), generator=g))
    k_aux = int(torch.randint(0, d_sae + 1, (1,), generator=g))
    x, W, b, bd = make(n, d_in, d_sae, device, seed, integer=bool(seed % 2))
    check(x, W, b, bd, k, random_dead(d_sae, device, seed), k_aux)


@pytest.mark.parametrize("d_sae", (7, 50, 130))
@pytest.mark.parametrize("k", ("one", "all"))
def test_k_extremes(device, d_sae, k):
    k = 1 if k == "one" else d_sae
    x, W, b, bd = make(5, 19, d_sae, device, seed=d_sae)
    check(x, W, b, bd, k)
    check(x, W, b, bd, k, random_dead(d_sae, device, 3), k_aux=k)


def test_k_256(device):
    x, W, b, bd = make(3, 5, 300, device, seed=7)
    check(x, W, b, bd, 256, random_dead(300, device, 7, p=0.9), k_aux=256)


@pytest.fixture
def cutoff_runs(monkeypatch):
    """Counts the subset passes (one per cutoff-path call) and, per dictionary size, the rows
    encoded densely (rows the cut left undecided; AuxK's dead-latent chunks)."""
    seen = {"subset_passes": 0, "dense_rows": {}}
    group_maxima, dense = kmod._group_maxima, kmod._dense_topk

    def counting_group_maxima(*args):
        seen["subset_passes"] += 1
        return group_maxima(*args)

    def counting_dense(x, W, *args):
        seen["dense_rows"][W.shape[0]] = seen["dense_rows"].get(W.shape[0], 0) + x.shape[0]
        return dense(x, W, *args)

    monkeypatch.setattr(kmod, "_group_maxima", counting_group_maxima)
    monkeypatch.setattr(kmod, "_dense_topk", counting_dense)
    return seen


def test_ties_lower_index_wins(device, cutoff_runs):
    # d_in=3 with weights in {-2..2}: only a few distinct pre-activations across 600 latents.
    x, W, b, bd = make(17, 3, 600, device, seed=11, integer=True)
    got = check(x, W, b, bd, 10)
    assert cutoff_runs["subset_passes"] == 1
    v, i = got[0].cpu(), got[1].cpu()
    tied = v[:, 1:] == v[:, :-1]
    assert tied.any(), "the data was meant to produce ties"
    assert (i[:, 1:][tied] > i[:, :-1][tied]).all()


@pytest.mark.parametrize("n, d_in, d_sae, k", [(17, 19, 300, 1), (9, 33, 700, 7), (33, 8, 1000, 12)])
def test_cutoff_path_odd_shapes(device, cutoff_runs, n, d_in, d_sae, k):
    x, W, b, bd = make(n, d_in, d_sae, device, seed=d_sae)
    check(x, W, b, bd, k, random_dead(d_sae, device, 5), k_aux=20)
    assert cutoff_runs["subset_passes"] == 1 and cutoff_runs["dense_rows"].get(d_sae, 0) < n


def test_rows_whose_subset_has_no_positive_group(device, cutoff_runs):
    """Positives only outside the subset (a trained encoder's negative biases leave few): the
    subset's cut is 0, every positive entry survives, and no row is encoded densely."""
    n, d_sae, k = 9, 2048, 2
    x, W, b, bd = make(n, 19, d_sae, device, seed=21)
    assert kmod._subset_size(d_sae, k) <= 128
    b[:] = -100.0
    b[128:400] = 3.0
    got = check(x, W, b, bd, k)
    assert cutoff_runs["subset_passes"] == 1 and cutoff_runs["dense_rows"].get(d_sae, 0) == 0
    assert bool((got[0] > 0).all())


def test_rows_overflowing_their_survivor_slots_are_redone(device, cutoff_runs, monkeypatch):
    monkeypatch.setattr(kmod, "SURVIVOR_SLACK", 0.05)  # two slots a row: every row overflows
    x, W, b, bd = make(17, 19, 600, device, seed=6)
    check(x, W, b, bd, 9)
    assert cutoff_runs["subset_passes"] == 1


def test_the_cut_margin_bounds_rows_whose_squares_underflow():
    """The GPU cut's margin (two accumulations' disagreement) from norms that stay upper bounds
    where float32 squares underflow: rows of 1e-24s have float32 norm 0."""
    x, W, _, _ = make(4, 48, 300, "cpu", seed=3)
    x, b = x * 1e-24, torch.zeros(300)
    assert float(x.norm()) == 0.0
    gamma = (48 + 2) * 2.0 ** -24
    want = 2 * gamma * x.double().norm(dim=1) * W.double().norm(dim=1).max()
    assert bool((kmod._accumulation_error(x, W, b).double() >= want).all())


@pytest.mark.parametrize("d_sae", [50, 600])
def test_all_negative_rows(device, d_sae):
    n, d_in = 5, 19
    x, W, b, bd = make(n, d_in, d_sae, device, seed=2)
    x[1:3] = bd  # x - b_dec = 0 there, so pre = b
    b = -1.0 - b.abs()
    dead = random_dead(d_sae, device, 2)
    got = check(x, W, b, bd, 6, dead, k_aux=4)
    for row in (1, 2):
        assert torch.equal(got[0][row].cpu(), torch.zeros(6))
        assert torch.equal(got[1][row].cpu(), torch.arange(6))
        assert torch.equal(got[3][row].cpu(), dead.nonzero().squeeze(1)[:4].cpu())
        assert not torch.signbit(got[0][row]).any(), "-0.0 must come out as +0.0"


@pytest.mark.parametrize("which", ("all", "none", "random", "one"))
def test_dead_mask(device, which):
    d_sae = 50
    x, W, b, bd = make(5, 19, d_sae, device, seed=3)
    dead = {
        "all": torch.ones(d_sae, dtype=torch.bool),
        "none": torch.zeros(d_sae, dtype=torch.bool),
        "random": random_dead(d_sae, "cpu", 3),
        "one": torch.arange(d_sae) == 17,
    }[which].to(device)
    k_aux = int(dead.sum()) + 5 if int(dead.sum()) + 5 <= d_sae else d_sae  # more slots than dead latents
    got = check(x, W, b, bd, 4, dead, k_aux)
    n_dead = int(dead.sum())
    # Slots past the dead latents hold 0 at the lowest non-dead indices (the -inf tie rule).
    assert (got[2][:, n_dead:] == 0).all()
    if n_dead < d_sae:
        assert torch.equal(got[3][0, n_dead:].cpu(), (~dead).nonzero().squeeze(1)[:k_aux - n_dead].cpu())


def test_no_b_dec_and_aux_without_mask(device):
    x, W, b, _ = make(5, 19, 50, device, seed=4, b_dec=False)
    check(x, W, b, None, 5)
    got = check(x, W, b, None, 5, None, k_aux=3)  # no mask: the aux code is all zeros
    assert (got[2] == 0).all() and (got[3] == 0).all()


def test_empty_batch(device):
    x, W, b, bd = make(0, 19, 50, device, seed=1)
    v, i, av, ai = topk_encode(x, W, b, bd, 4, random_dead(50, device, 1), 2)
    assert v.shape == (0, 4) and i.shape == (0, 4) and av.shape == (0, 2) and ai.shape == (0, 2)


# --- argument checks ---------------------------------------------------------------------------

def _args(device):
    x, W, b, bd = make(3, 8, 10, device, seed=0)
    return dict(x=x, W=W, b=b, b_dec=bd, k=2, dead_mask=torch.zeros(10, dtype=torch.bool, device=device), k_aux=1)


BAD = [
    ("x", lambda a: a["x"][0], r"x must be a 2-D tensor"),
    ("x", lambda a: a["x"].double(), r"x must be float32, bfloat16 or float16"),
    ("x", lambda a: a["x"].to(torch.int32), r"x must be float32, bfloat16 or float16"),
    ("W", lambda a: a["W"][:, :5].contiguous(), r"W must have shape \(d_sae, 8\)"),
    ("W", lambda a: a["W"].half(), r"W must have dtype torch.float32"),
    ("W", lambda a: a["W"].T.contiguous().T, r"W must be contiguous"),
    ("x", lambda a: torch.cat([a["x"], a["x"]], 1)[:, :8], r"x must be contiguous"),
    ("b", lambda a: a["b"][:9], r"b must have shape \(10,\)"),
    ("b", lambda a: a["b"][None], r"b must be a 1-D tensor"),
    ("b_dec", lambda a: a["b_dec"][:7], r"b_dec must have shape \(8,\)"),
    ("k", lambda a: 0, r"k must satisfy 1 <= k <= d_sae = 10, got 0"),
    ("k", lambda a: 11, r"k must satisfy 1 <= k <= d_sae = 10, got 11"),
    ("k", lambda a: 2.0, r"k must be an int"),
    ("k_aux", lambda a: -1, r"k_aux must satisfy 0 <= k_aux <= d_sae = 10"),
    ("k_aux", lambda a: 11, r"k_aux must satisfy 0 <= k_aux <= d_sae = 10"),
    ("dead_mask", lambda a: a["dead_mask"].int(), r"dead_mask must be a bool tensor of shape \(10,\)"),
    ("dead_mask", lambda a: a["dead_mask"][:9], r"dead_mask must be a bool tensor of shape \(10,\)"),
    ("x", lambda a: [[1.0]], r"x must be a torch.Tensor"),
]


@pytest.mark.parametrize("name,bad,match", BAD, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD)])
def test_argument_errors(device, name, bad, match):
    a = _args(device)
    a[name] = bad(a)
    with pytest.raises((ValueError, TypeError), match=match):
        topk_encode(**a)


@pytest.mark.skipif(not GPU, reason="needs two devices")
def test_device_mismatch():
    a = _args(torch.device("cuda"))
    a["b"] = a["b"].cpu()
    with pytest.raises(ValueError, match=r"b must be on cuda"):
        topk_encode(**a)


@pytest.mark.skipif(GPU, reason="CPU tensors are refused only without the interpreter")
def test_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    a = _args(torch.device("cpu"))
    with pytest.raises(ValueError, match=r"the Triton kernels need CUDA tensors"):
        topk_encode(**a)


# --- half precision: the interpreter cannot run these, a GPU can ----------------------------------

@pytest.mark.skipif(not GPU, reason="bf16/fp16 are only correct on a GPU (not the interpreter)")
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("n,d_in,d_sae,k", [(17, 33, 130, 8), (300, 256, 4096, 64), (64, 128, 1000, 256)])
def test_half_exact_data(dtype, n, d_in, d_sae, k):
    # Integer data: exact in bf16/fp16 and in fp32 accumulation, so indices must match exactly.
    x, W, b, bd = make(n, d_in, d_sae, "cuda", seed=d_sae, dtype=dtype, integer=True)
    dead = random_dead(d_sae, "cuda", 1)
    got = topk_encode(x, W, b, bd, k, dead, k // 2 + 1)
    assert_same(got, torch_backend.topk_encode(x, W, b, bd, k, dead, k // 2 + 1), check_dtype=dtype)


@pytest.mark.skipif(not GPU, reason="bf16/fp16 are only correct on a GPU (not the interpreter)")
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_half_random_data(dtype):
    x, W, b, bd = make(256, 512, 8192, "cuda", seed=9, dtype=dtype)
    x, W = x * 0.1, W * 0.1
    v, i, _, _ = topk_encode(x, W, b, bd, 32)
    rv, ri, _, _ = dense_reference(x, W, b, bd, 32)
    torch.testing.assert_close(v.double(), rv.to(dtype).double(), atol=2e-2, rtol=2e-2)
    # fp32 accumulation order may swap near-equal neighbours: compare the selected sets.
    agree = (torch.sort(i, 1).values == torch.sort(ri, 1).values).float().mean()
    assert agree > 0.99


@pytest.mark.parametrize("m, d", [(70, 13), (40_000, 600)])  # one chunk; two chunks of the bf16 upcast
def test_dense_fallback_takes_bf16_encoders_in_chunks(m, d):
    # The rows the cut cannot decide (and small dictionaries) go through _dense_topk: with a bf16
    # encoder it upcasts W a chunk at a time (it used to crash on the bf16 bias).
    from fastsae import reference as R

    g = torch.Generator().manual_seed(m)
    x, W, b = (torch.randn(*shape, generator=g).bfloat16() for shape in ((3, d), (m, d), (m,)))
    values, indices = kmod._dense_topk(x, W, b, 8)
    want_v, want_i = R.stable_topk(torch.relu(x.float() @ W.float().t() + b.float()), 8)
    torch.testing.assert_close(values, want_v, rtol=1e-5, atol=1e-5)
    assert torch.equal(indices, want_i)


@pytest.mark.parametrize("d_sae", [50, 600])
def test_a_nan_weight_row_ranks_as_torch_ranks_it(device, d_sae):
    """ops checks x for NaN before any kernel; a NaN inside the encoder (a diverged weight row)
    reaches the kernel, which must rank it as torch does (NaN first) compiled or interpreted:
    its group maximum counts as +inf, and such rows are redone in torch."""
    x, W, b, bd = make(5, 19, d_sae, device, seed=4)
    W[d_sae // 3, 2] = float("nan")
    got = topk_encode(x, W, b, bd, 6)
    want = dense_reference(x, W, b, bd, 6)
    assert torch.equal(got[1].cpu(), want[1].cpu()) and (got[1][:, 0] == d_sae // 3).all()
    assert got[0][:, 0].isnan().all()
    torch.testing.assert_close(got[0][:, 1:].cpu().double(), want[0][:, 1:].cpu().double(), atol=1e-4, rtol=1e-5)
