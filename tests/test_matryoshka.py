"""Matryoshka BatchTopK: the prefix decode on every backend against fastsae.reference (values
and gradients), the config, the loss, training, files, and SAELens loading our export."""
import json

import pytest
import torch
from test_ops import assert_close_all, grads, random_csr

from fastsae import ops
from fastsae import reference as R
from fastsae.config import SAEConfig
from fastsae.io import load_sae, save_sae
from fastsae.models import MatryoshkaBatchTopKSAE, create_sae
from fastsae.trainer import SAETrainer

BACKENDS = ["torch", "triton"]  # "triton" under the interpreter on CPU: tiny shapes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d,m,density,sizes,empty", [
    (6, 5, 9, 0.5, (1, 4, 9), (0, 3)),       # a one-latent prefix; empty rows give b_dec at every level
    (11, 33, 40, 0.3, (7, 8, 39, 40), (10,)),  # adjacent sizes: a level holding one latent
    (4, 3, 70, 0.9, (70,), ()),               # one level: the plain decode
    (3, 17, 20, 0.0, (5, 20), ()),            # no entries at all
])
def test_prefix_decode_matches_reference(backend, n, d, m, density, sizes, empty):
    dtype = torch.float32 if backend == "triton" else torch.float64
    values, indices, offsets = random_csr(n, m, density, dtype, seed=m, empty_rows=empty)
    W = torch.randn(m, d, dtype=dtype, requires_grad=True)
    b = torch.randn(d, dtype=dtype, requires_grad=True)
    out = ops.matryoshka_decode(values, indices, offsets, W, b, sizes, backend=backend)
    dense = R.csr_to_dense(values, indices, offsets, m)
    ref = R.matryoshka_decode(dense, W, b, sizes)
    assert out.shape == (n, len(sizes), d)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out[:, -1], R.csr_decode(values, indices, offsets, W, b))  # the last is all of it
    for r in empty:
        torch.testing.assert_close(out[r], b.expand(len(sizes), d))
    assert_close_all(grads([out], [values, W, b]), grads([ref], [values, W, b]))


def test_prefix_decode_refuses_sizes_that_do_not_end_at_d_sae():
    values, indices, offsets = random_csr(3, 10, 0.5, torch.float64, seed=0)
    W = torch.randn(10, 4, dtype=torch.float64)
    for sizes in [(3, 8), (3, 3, 10), (0, 10), ()]:
        with pytest.raises(ValueError, match="sizes must increase strictly from >= 1 to d_sae=10"):
            ops.matryoshka_decode(values, indices, offsets, W, None, sizes)


def test_prefix_decode_boundaries_are_exclusive():
    # Latent s - 1 belongs to the prefix of width s; latent s does not.
    W, b = torch.eye(6, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    values = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    indices, offsets = torch.tensor([1, 2, 0]), torch.tensor([0, 3])  # not sorted by latent
    out = ops.matryoshka_decode(values, indices, offsets, W, b, (2, 3, 6))
    assert out.tolist() == [[[4.0, 1.0, 0.0], [4.0, 1.0, 2.0], [4.0, 1.0, 2.0]]]


def test_config_sizes_are_checked_and_defaulted():
    assert SAEConfig(d_in=16, activation="matryoshka_batchtopk", k=4).matryoshka_sizes == (8, 16, 32, 64, 128)
    assert SAEConfig(d_in=4, d_sae=20, activation="matryoshka_batchtopk", k=2,
                     matryoshka_sizes=[5, 10]).matryoshka_sizes == (5, 10, 20)  # d_sae appended
    for sizes, message in [([10, 5], "must increase strictly up to d_sae=20"), ([5, 30], "must increase strictly"),
                           ([0, 20], "matryoshka_sizes entries must be an integer >= 1"),
                           ("5,10", "must be a non-empty list"), ([], "must be a non-empty list")]:
        with pytest.raises(ValueError, match=message):
            SAEConfig(d_in=4, d_sae=20, activation="matryoshka_batchtopk", k=2, matryoshka_sizes=sizes)
    with pytest.raises(ValueError, match="matryoshka_sizes is for activation 'matryoshka_batchtopk', not 'topk'"):
        SAEConfig(d_in=4, d_sae=20, k=2, matryoshka_sizes=[5])


def _sae(seed=0, **kw):
    config = SAEConfig(d_in=12, d_sae=48, activation="matryoshka_batchtopk", k=4, matryoshka_sizes=[3, 12, 24],
                       hook_point="blocks.3.hook_resid_post", seed=seed, **kw)
    return create_sae(config)


def test_loss_adds_each_inner_prefix_mse_to_the_full_one():
    sae = _sae()
    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(0))
    out = sae.loss(x)
    dense = out["code"].to_dense()
    expected = R.matryoshka_decode(dense, sae.W_dec, sae.b_dec, (3, 12, 24, 48))
    inner = [R.mse(expected[:, i], x) for i in range(3)]
    torch.testing.assert_close(out["mse_loss"], R.mse(expected[:, -1], x))
    torch.testing.assert_close(out["total_loss"], out["mse_loss"] + sum(inner))
    for size, value in zip((3, 12, 24), inner):
        torch.testing.assert_close(out[f"prefix_{size}_term"], value)
        torch.testing.assert_close(out[f"prefix_{size}_fvu"], R.fvu(expected[:, (3, 12, 24).index(size)], x))


def _prefix_fvus(sae, x, sizes=(3, 12, 24, 48)):
    with torch.no_grad():
        code = sae.encode_sparse(x)
        prefixes = MatryoshkaBatchTopKSAE.prefix_reconstructions(sae, code) if sae.config.activation != "batchtopk" \
            else ops.matryoshka_decode(code.values, code.indices, code.row_offsets, sae.W_dec, sae.b_dec, sizes)
    return [float(R.fvu(prefixes[:, i], x)) for i in range(len(sizes))]


def test_training_makes_early_prefixes_reconstruct_better_than_plain_batchtopk():
    # Features of falling frequency (Zipf): a good 3-latent prefix holds the three most common.
    g = torch.Generator().manual_seed(0)
    basis = torch.nn.functional.normalize(torch.randn(96, 12, generator=g), dim=1)
    frequency = 0.6 / torch.arange(1, 97).float()
    x = (torch.rand(8192, 96, generator=g) < frequency) * (1 + torch.rand(8192, 96, generator=g)) @ basis
    fvus = {}
    for activation in ("matryoshka_batchtopk", "batchtopk"):
        extra = {"matryoshka_sizes": [3, 12, 24]} if activation != "batchtopk" else {}
        config = SAEConfig(d_in=12, d_sae=48, activation=activation, k=4, batch_size=512, num_epochs=20,
                           learning_rate=3e-3, warmup_steps=10, **extra)
        trainer = SAETrainer(create_sae(config), config, x, device="cpu")
        trainer.train(verbose=False)
        # Batch selection (what the loss trains), not the inference threshold, which a run of 320
        # steps has not settled yet.
        fvus[activation] = _prefix_fvus(trainer.sae.train(), x[:2048] * trainer.scale)
    mat, plain = fvus["matryoshka_batchtopk"], fvus["batchtopk"]
    assert mat[0] > mat[1] > mat[2] > mat[3], mat  # wider prefixes reconstruct better
    assert mat[0] < 0.9 * plain[0] and mat[1] < 0.9 * plain[1], (mat, plain)  # early prefixes stand alone
    assert mat[3] < 0.25, mat  # and the whole dictionary still reconstructs


def test_files_round_trip_and_sae_lens_encodes_identically(tmp_path):
    sae = _sae()
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        sae.threshold.fill_(0.15)
    sae.eval()
    path = save_sae(sae, sae.config, tmp_path / "sae")
    cfg = json.loads((path / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"  # SAELens's inference form of (Matryoshka) BatchTopK
    loaded = load_sae(path)
    assert type(loaded) is MatryoshkaBatchTopKSAE and loaded.config == sae.config
    assert loaded.config.matryoshka_sizes == (3, 12, 24, 48)
    x = torch.randn(64, 12)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), sae.encode(x))
    sae_lens = pytest.importorskip("sae_lens")
    theirs = sae_lens.SAE.load_from_disk(str(path), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), sae.encode(x))
        torch.testing.assert_close(theirs.decode(sae.encode(x)), sae.decode(sae.encode(x)))


def test_evaluator_reports_each_prefix_fvu():
    from fastsae.evaluator import SAEEvaluator

    sae = _sae().eval()
    with torch.no_grad():
        sae.threshold.fill_(0.05)
    x = torch.randn(300, 12, generator=torch.Generator().manual_seed(2))
    metrics = SAEEvaluator(sae).evaluate(x, batch_size=128)  # three batches, sums exact over them
    with torch.no_grad():
        expected = R.matryoshka_decode(sae.encode(x), sae.W_dec, sae.b_dec, (3, 12, 24, 48))
    assert list(metrics.prefix_fvu) == [3, 12, 24, 48]
    for i, width in enumerate((3, 12, 24, 48)):
        assert metrics.prefix_fvu[width] == pytest.approx(float(R.fvu(expected[:, i], x)), rel=1e-5)
    assert metrics.prefix_fvu[48] == pytest.approx(metrics.fvu, rel=1e-6)
    assert "prefix fvu           3: " in str(metrics)
    assert metrics.to_dict()["prefix_fvu"] == metrics.prefix_fvu  # into eval_metrics.json
