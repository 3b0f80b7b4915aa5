"""SAE models: the seed API on top of ops, and the defects the seed had, fixed."""
import dataclasses

import pytest
import torch

import fastsae
from fastsae import models
from fastsae import reference as R
from fastsae.config import ACTIVATIONS, SAEConfig  # every kind the library has
from fastsae.models import (
    BatchTopKSAE,
    GatedSAE,
    JumpReLUSAE,
    MatryoshkaBatchTopKSAE,
    ReLUSAE,
    TopKSAE,
    create_sae,
)


def make(activation, d_in=10, d_sae=37, **kw):
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, k=4, activation=activation, jumprelu_init_threshold=0.1,
                    jumprelu_bandwidth=0.5, **kw)
    sae = create_sae(cfg)
    with torch.no_grad():
        sae.b_enc.add_(0.1)  # open a few latents so every path carries gradient
    return sae


def test_create_sae_picks_the_class():
    classes = [TopKSAE, BatchTopKSAE, MatryoshkaBatchTopKSAE, ReLUSAE, JumpReLUSAE, GatedSAE]
    for activation, cls in zip(ACTIVATIONS, classes):
        assert type(make(activation)) is cls


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_parameter_gets_a_gradient(activation):
    sae = make(activation)
    x = torch.randn(33, 10, generator=torch.Generator().manual_seed(0))
    dead = torch.arange(37) % 3 == 0
    sae.loss(x, dead_mask=dead)["total_loss"].backward()
    for name, p in sae.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_seed_forward_contract(activation):
    sae = make(activation)
    x = torch.randn(2, 5, 10)  # any leading shape
    recon, features, metrics = sae(x)
    assert recon.shape == (2, 5, 10) and features.shape == (2, 5, 37)
    assert {"mse_loss", "l0", "total_loss"} <= set(metrics)
    if activation in ("relu", "gated"):
        assert "l1_loss" in metrics
    torch.testing.assert_close(sae.decode(features), recon)
    assert float(metrics["l0"]) == pytest.approx(float((features != 0).float().sum(-1).mean()))
    assert sae.W_enc.shape == (10, 37) and sae.W_dec.shape == (37, 10)
    assert sae.b_enc.shape == (37,) and sae.b_dec.shape == (10,)


def test_topk_encode_applies_relu_and_subtracts_b_dec():
    sae = make("topk")
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.fill_(-5.0)  # most pre-activations negative
    x = torch.randn(7, 10)
    f = sae.encode(x)
    assert (f >= 0).all()
    expected = R.topk_encode(x, sae.enc_weight, sae.b_enc, 4, sae.b_dec)
    torch.testing.assert_close(f, R.to_dense(*expected, 37))


def test_topk_model_matches_reference_pipeline():
    sae = make("topk")
    x = torch.randn(6, 10)
    recon, _, metrics = sae(x)
    values, indices = R.topk_encode(x, sae.enc_weight, sae.b_enc, 4, sae.b_dec)
    ref = R.sparse_decode(values, indices, sae.W_dec, sae.b_dec)
    torch.testing.assert_close(recon, ref)
    torch.testing.assert_close(metrics["mse_loss"], R.mse(ref, x))


def test_mse_and_fvu_from_one_error_pass_equal_the_two_apart():
    """The step's loss and metric from one pass equal reference.mse and reference.fvu (float64
    formulas as the check), the loss differentiable and the FVU detached."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(33, 7, generator=gen) * 3 + 1
    x_hat = (x + torch.randn(33, 7, generator=gen)).requires_grad_()
    mse, fvu = R.mse_and_fvu(x_hat, x)
    torch.testing.assert_close(mse, R.mse(x_hat, x))
    torch.testing.assert_close(fvu, R.fvu(x_hat.detach(), x))
    error, variance = (x_hat - x).double().pow(2).sum(), (x - x.mean(0)).double().pow(2).sum()
    torch.testing.assert_close(mse.double(), error / x.numel())
    torch.testing.assert_close(fvu.double(), error / variance)
    assert mse.requires_grad and not fvu.requires_grad
    mse.backward()
    torch.testing.assert_close(x_hat.grad, 2 * (x_hat - x).detach() / x.numel())


def test_initialisation_unit_decoder_rows_and_tied_encoder():
    sae = make("topk")
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(37))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.t())


@pytest.mark.parametrize("block_rows", [512, 8])  # one block; five, the last one partial
def test_normalize_decoder_and_remove_parallel_grad(monkeypatch, block_rows):
    monkeypatch.setattr(models.BaseSAE, "PROJECTION_ROWS", block_rows)
    sae = make("topk")
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder_weights()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(37))
    sae.W_dec.grad = torch.randn(37, 10)
    sae.remove_parallel_decoder_grad()
    torch.testing.assert_close((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(37), atol=1e-6, rtol=0)
    # Rows of any norm (a zero row keeps its gradient): g - (g . w) w with w the unit row, in float64.
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.1, 5.0, 37)[:, None])
        sae.W_dec[4] = 0.0
    g = torch.randn(37, 10)
    sae.W_dec.grad = g.clone()
    sae.remove_parallel_decoder_grad()
    w = sae.W_dec.detach().double()
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-300)
    expected = g.double() - (g.double() * w).sum(1, keepdim=True) * w
    torch.testing.assert_close(sae.W_dec.grad.double(), expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(sae.W_dec.grad[4], g[4])


def test_relu_l1_weighted_by_decoder_norms():
    sae = make("relu")
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, 37)[:, None])
    x = torch.randn(5, 10)
    out = sae.loss(x)
    f = R.relu_codes(x, sae.enc_weight, sae.b_enc, sae.b_dec)
    expected = (f * sae.W_dec.norm(dim=1)).sum(1).mean()
    torch.testing.assert_close(out["l1_loss"], expected)


def test_batchtopk_eval_uses_learned_threshold():
    sae = make("batchtopk")
    x = torch.randn(16, 10)
    sae.train()
    sae.loss(x)
    assert float(sae.threshold) > 0
    sae.eval()
    code = sae.encode_sparse(x)
    assert (code.values > float(sae.threshold)).all()


@pytest.mark.parametrize("architecture", ["sae", "skip_transcoder"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_latent_activations_equal_the_code_where_each_latent_decides_its_own(activation, architecture):
    kw = {} if architecture == "sae" else {"architecture": architecture, "output_hook_point": "blocks.0.hook_mlp_out"}
    sae = make(activation, **kw)
    x = torch.randn(23, 10, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for name in ("b_dec", "r_mag", "b_mag"):  # zero at the start: no test of their part
            if hasattr(sae, name):
                getattr(sae, name).copy_(0.3 * torch.randn(getattr(sae, name).shape, generator=gen))
        sae.train()
        sae.loss(x if architecture == "sae" else torch.cat([x, x], 1))  # a BatchTopK sets its threshold
        if activation == "jumprelu":  # thresholds of 0.05 to 1.5: some entries open, some shut
            sae.log_threshold.copy_(torch.linspace(0.05, 1.5, sae.d_sae).log())
        latents = torch.tensor([36, 0, 5, 5, 17])  # unsorted, repeated, the last latent
        in_training = sae.latent_activations(x, latents)
        sae.eval()
        got = sae.latent_activations(x, latents)
        want = sae.encode_sparse(x).to_dense()[:, latents]
    if activation == "topk":  # the row's k-th value decides: no per-latent answer
        assert got is None and in_training is None
        return
    if activation in ("batchtopk", "matryoshka_batchtopk"):
        assert in_training is None  # the batch's N*k-th value decides while training
    assert got.shape == (23, 5) and 0 < int((got > 0).sum()) < got.numel()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_batchtopk_threshold_starts_at_the_first_batch_then_follows_an_ema():
    sae = make("batchtopk").train()
    x1, x2 = torch.randn(16, 10, generator=torch.Generator().manual_seed(1)), torch.randn(16, 10)
    first = sae.loss(x1)["code"].values.detach()
    smallest = float(first[first > 0].min())
    assert float(sae.threshold) == pytest.approx(smallest)  # not 1% of it, as an EMA from 0 would give
    second = sae.loss(x2)["code"].values.detach()
    assert float(sae.threshold) == pytest.approx(0.99 * smallest + 0.01 * float(second[second > 0].min()))


def test_wrong_width_is_a_clear_error():
    with pytest.raises(ValueError, match=r"x must have last dimension d_in=10, got shape \(3, 9\)"):
        make("topk")(torch.randn(3, 9))


def test_config_round_trip_and_unknown_keys():
    cfg = SAEConfig(d_in=16, activation="gated", k=3, expansion_factor=4)
    assert cfg.d_sae == 64
    d = cfg.to_dict()
    assert SAEConfig.from_dict({**d, "some_future_field": 1}) == cfg
    assert dataclasses.asdict(SAEConfig.from_dict(d)) == d


@pytest.mark.parametrize("kwargs,match", [
    ({"d_in": 0}, "d_in must be an integer >= 1, got 0"),
    ({"d_in": 8, "activation": "softmax"}, "activation must be one of"),
    ({"d_in": 8, "d_sae": 16, "k": 17}, r"k must be in \[1, d_sae=16\], got 17"),
    ({"d_in": 8, "k": 0}, "k must be an integer >= 1, got 0"),
    ({"d_in": 8, "k": "8"}, "k must be an integer >= 1, got '8'"),
    ({"d_in": 8, "k": 2.5}, "k must be an integer >= 1, got 2.5"),
    ({"d_in": 8, "aux_k": -1}, "aux_k must be an integer >= 0, got -1"),
    ({"d_in": 8, "batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
    ({"d_in": 8, "save_every": 0}, "save_every must be an integer >= 1, got 0"),
    ({"d_in": 8, "eval_every": 0}, "eval_every must be an integer >= 1, got 0"),
    ({"d_in": 8, "num_epochs": -1}, "num_epochs must be an integer >= 1, got -1"),
    ({"d_in": 8, "l1_coefficient": -1.0}, r"l1_coefficient must be a finite number >= 0.0, got -1.0"),
    ({"d_in": 8, "learning_rate": float("nan")}, "learning_rate must be a finite number > 0.0, got nan"),
    ({"d_in": 8, "normalize_decoder": "yes"}, "normalize_decoder must be true or false"),
    ({"d_in": 8, "hook_point": ".."}, "hook_point must be a dotted module name"),
    ({"d_in": 8, "hook_point": "blocks/0"}, "hook_point must be a dotted module name"),
    ({"d_in": 8, "hook_point": 5}, "hook_point must be a dotted module name"),
    ({"d_in": 8, "dtype": "int8"}, "dtype must be one of"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SAEConfig(**kwargs)


def test_config_from_model():
    class Cfg:
        n_embd, n_layer = 48, 4

    class Model:
        config = Cfg()

    cfg = SAEConfig.from_model(Model(), 2, hook_type="mlp_out", k=8)
    assert (cfg.d_in, cfg.hook_point, cfg.k) == (48, "blocks.2.hook_mlp_out", 8)
    with pytest.raises(ValueError, match=r"layer_idx must be in \[0, 4\), got 4"):
        SAEConfig.from_model(Model(), 4)


def test_import_fastsae_as_sae_exposes_every_seed_name():
    seed_names = ["SAEConfig", "TopKSAE", "ReLUSAE", "GatedSAE", "create_sae", "ActivationCollector",
                  "collect_activations_from_dataloader", "SAETrainer", "train_sae_from_activations",
                  "InterpretableModel", "load_saes", "save_sae", "SAEEvaluator", "SAEMetrics",
                  "FeatureVisualizer", "generate_sae_summary", "NeuronpediaUploader", "create_neuronpedia_metadata"]
    for name in seed_names:
        assert name in fastsae.__all__
        assert getattr(fastsae, name) is not None, name


def test_batchtopk_auxk_comes_from_the_same_pass():
    from fastsae import ops
    sae = make("batchtopk")
    x = torch.randn(16, 10, generator=torch.Generator().manual_seed(2))
    dead = torch.arange(37) % 4 == 0
    out = sae.loss(x, dead_mask=dead)
    k_aux = min(sae.config.aux_k, 37)
    _, _, aux_v, aux_i = ops.topk_encode_aux(x, sae.enc_weight, sae.b_enc, 1, sae.b_dec, dead, k_aux)
    expected = R.auxk_loss(R.sparse_decode(aux_v, aux_i, sae.W_dec), (x - out["reconstruction"]).detach())
    torch.testing.assert_close(out["aux_loss"], expected.detach())


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_auxk_slots_capped_at_the_dead_count_give_the_same_loss_and_gradients(activation):
    """With 3 dead latents and aux_k 5, slots 4-5 would hold zeros: capping them changes nothing."""
    dead = torch.zeros(37, dtype=torch.bool)
    dead[[4, 9, 30]] = True
    x = torch.randn(16, 10, generator=torch.Generator().manual_seed(0))
    results = []
    for cap in (None, 3):
        sae = make(activation, aux_k=5)
        out = sae.loss(x, dead_mask=dead, max_aux_k=cap)
        out["total_loss"].backward()
        results.append((out["aux_loss"], [p.grad.clone() for p in sae.parameters()]))
    (loss_full, grads_full), (loss_capped, grads_capped) = results
    assert loss_full > 0
    torch.testing.assert_close(loss_capped, loss_full)
    for full, capped in zip(grads_full, grads_capped):
        torch.testing.assert_close(capped, full)
