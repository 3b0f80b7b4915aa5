"""SAE files: fastsae <-> SAELens layout round trip, sparsify and seed .pt loaders, load_saes."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastsae.config import ACTIVATIONS, SAEConfig  # every kind the library has
from fastsae.io import load_sae, load_saes, sae_state, save_sae
from fastsae.models import create_sae


def random_sae(activation, d_in=12, d_sae=48, seed=0, hook="blocks.3.hook_resid_post"):
    torch.manual_seed(seed)
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, activation=activation, k=5, dtype="float32", hook_point=hook,
                    jumprelu_init_threshold=0.05, seed=seed)
    sae = create_sae(cfg)
    with torch.no_grad():  # every parameter away from its init, so a swapped tensor would show
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        if activation in ("batchtopk", "matryoshka_batchtopk"):
            sae.threshold.fill_(0.2)
    return sae.eval()


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_saelens_layout_round_trip(tmp_path, activation):
    sae = random_sae(activation)
    path = save_sae(sae, sae.config, tmp_path / "sae", model_name="tiny", context_size=64)
    assert sorted(os.listdir(path)) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((path / "cfg.json").read_text())
    assert cfg["d_in"] == 12 and cfg["d_sae"] == 48 and cfg["hook_name"] == "blocks.3.hook_resid_post"
    assert cfg["hook_layer"] == 3 and cfg["model_name"] == "tiny" and cfg["context_size"] == 64
    assert cfg["architecture"] == {"topk": "topk", "batchtopk": "jumprelu", "matryoshka_batchtopk": "jumprelu",
                                   "relu": "standard", "jumprelu": "jumprelu", "gated": "gated"}[activation]
    weights = load_file(str(path / "sae_weights.safetensors"))
    assert weights["W_enc"].shape == (12, 48) and weights["W_dec"].shape == (48, 12)

    loaded = load_sae(path)
    assert type(loaded) is type(sae) and loaded.config == sae.config
    for name, value in sae_state(sae).items():
        if activation == "jumprelu" and name == "threshold":  # stored as exp(log_threshold)
            torch.testing.assert_close(sae_state(loaded)[name], value, rtol=1e-6, atol=0)
        else:
            assert torch.equal(sae_state(loaded)[name], value), name
    x = torch.randn(64, 12)
    with torch.no_grad():
        a, b = sae.encode(x), loaded.encode(x)
    if activation == "jumprelu":
        torch.testing.assert_close(a, b)
    else:
        assert torch.equal(a, b)


def test_saelens_only_config_loads(tmp_path):
    """A cfg.json as SAELens writes it (no fastsae section) loads by its architecture."""
    sae = random_sae("topk")
    path = save_sae(sae, sae.config, tmp_path / "sae")
    cfg = json.loads((path / "cfg.json").read_text())
    del cfg["fastsae"]
    (path / "cfg.json").write_text(json.dumps(cfg))
    loaded = load_sae(path)
    assert loaded.config.activation == "topk" and loaded.config.k == 5
    x = torch.randn(16, 12)
    assert torch.equal(sae.encode(x), loaded.encode(x))


def test_sparsify_layout_encodes_as_relu_topk_of_centered_input(tmp_path):
    torch.manual_seed(0)
    d_in, d_sae, k = 10, 40, 4
    enc_w, enc_b = torch.randn(d_sae, d_in), torch.randn(d_sae) * 0.1
    w_dec, b_dec = torch.randn(d_sae, d_in), torch.randn(d_in)
    (tmp_path / "cfg.json").write_text(json.dumps({"expansion_factor": 4, "normalize_decoder": True,
                                                   "num_latents": d_sae, "k": k, "d_in": d_in}))
    save_file({"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": w_dec, "b_dec": b_dec},
              str(tmp_path / "sae.safetensors"))
    sae = load_sae(tmp_path)
    x = torch.randn(32, d_in)
    pre = torch.relu(torch.nn.functional.linear(x - b_dec, enc_w, enc_b))
    top = pre.topk(k, dim=1)
    code = sae.encode_sparse(x)
    torch.testing.assert_close(code.values, top.values)
    expected = torch.zeros(32, d_sae).scatter(1, top.indices, top.values)
    torch.testing.assert_close(sae.encode(x), expected)
    torch.testing.assert_close(sae.decode(expected), expected @ w_dec + b_dec)


def seed_checkpoint(sae, step=0):
    state = {"W_enc": sae.W_enc.detach().clone(), "b_enc": sae.b_enc.detach().clone(),
             "W_dec": sae.W_dec.detach().clone(), "b_dec": sae.b_dec.detach().clone()}
    return {"model_state_dict": state, "config": sae.config.to_dict(), "step": step}


def test_seed_pt_checkpoint_loads(tmp_path):
    sae = random_sae("topk")
    torch.save(seed_checkpoint(sae, step=7), tmp_path / "best_model.pt")
    loaded = load_sae(tmp_path / "best_model.pt")
    for name, value in sae_state(sae).items():
        assert torch.equal(sae_state(loaded)[name], value), name
    assert loaded.metadata == {"step": 7}


class Payload:
    """Unpickling this would create a file: proof that arbitrary code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pt_with_arbitrary_pickled_object_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = seed_checkpoint(random_sae("topk"))
    ckpt["config"] = Payload(str(marker))
    torch.save(ckpt, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights-only"):
        load_sae(tmp_path / "evil.pt")
    assert not marker.exists()


def test_load_saes_prefers_best_model_over_periodic_checkpoints(tmp_path):
    best, periodic = random_sae("topk", seed=1), random_sae("topk", seed=2)
    layer = tmp_path / "layer_3"
    save_sae(periodic, periodic.config, layer / "checkpoints" / "checkpoint_30000")
    save_sae(best, best.config, layer / "best_model")
    save_sae(periodic, periodic.config, layer / "checkpoints" / "checkpoint_40000")
    other = random_sae("relu", seed=3, hook="blocks.5.hook_resid_post")
    save_sae(other, other.config, tmp_path / "layer_5" / "final")
    saes = load_saes(tmp_path)
    assert sorted(saes) == ["blocks.3.hook_resid_post", "blocks.5.hook_resid_post"]
    assert torch.equal(saes["blocks.3.hook_resid_post"].W_dec, best.W_dec)
    assert torch.equal(saes["blocks.5.hook_resid_post"].W_dec, other.W_dec)
    assert list(load_saes(tmp_path, hook_points=["blocks.5.hook_resid_post"])) == ["blocks.5.hook_resid_post"]
    with pytest.raises(ValueError, match="blocks.9"):
        load_saes(tmp_path, hook_points=["blocks.9.hook_resid_post"])


def test_load_saes_seed_pt_layout(tmp_path):
    best, periodic = random_sae("topk", seed=1), random_sae("topk", seed=2)
    layer = tmp_path / "layer_3"
    layer.mkdir()
    torch.save(seed_checkpoint(periodic, 90000), layer / "checkpoint_90000.pt")
    torch.save(seed_checkpoint(best, 5000), layer / "best_model.pt")
    torch.save(seed_checkpoint(periodic, 95000), layer / "checkpoint_95000.pt")
    saes = load_saes(tmp_path)
    assert torch.equal(saes["blocks.3.hook_resid_post"].W_dec, best.W_dec)


def test_corrupt_files_give_clear_errors(tmp_path):
    sae = random_sae("relu")
    path = save_sae(sae, sae.config, tmp_path / "sae")
    (path / "sae_weights.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="safetensors"):
        load_sae(path)
    with pytest.raises(FileNotFoundError):
        load_sae(tmp_path / "missing")


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_sae_lens_loads_our_export_and_encodes_identically(tmp_path, activation):
    sae_lens = pytest.importorskip("sae_lens")
    sae = random_sae(activation)
    path = save_sae(sae, sae.config, tmp_path / "sae")
    theirs = sae_lens.SAE.load_from_disk(str(path), device="cpu")
    x = torch.randn(32, 12)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), sae.encode(x))
        torch.testing.assert_close(theirs.decode(sae.encode(x)), sae.decode(sae.encode(x)))


def test_a_batchtopk_file_with_one_threshold_number_still_loads(tmp_path):
    """Earlier versions wrote a BatchTopK threshold as one number; such folders still load."""
    sae = random_sae("batchtopk")
    path = save_sae(sae, sae.config, tmp_path / "old")
    weights = load_file(str(path / "sae_weights.safetensors"))
    weights["threshold"] = weights["threshold"][:1].clone()
    cfg = json.loads((path / "cfg.json").read_text())
    save_file(weights, str(path / "sae_weights.safetensors"), metadata={"fastsae_save_id": cfg["fastsae"]["save_id"]})
    loaded = load_sae(path)
    assert float(loaded.threshold) == float(sae.threshold) == pytest.approx(0.2)
    weights["threshold"] = torch.tensor([0.2, 0.3] * 24)
    save_file(weights, str(path / "sae_weights.safetensors"), metadata={"fastsae_save_id": cfg["fastsae"]["save_id"]})
    with pytest.raises(ValueError, match="a BatchTopK SAE has one threshold for every latent; these differ"):
        load_sae(path)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_expected_shapes_match_what_save_writes(activation):
    """The loader checks files against _expected_shapes (no SAE allocated); it must name and
    shape exactly what sae_state writes."""
    from fastsae.io import _expected_shapes, sae_state

    config = SAEConfig(d_in=8, d_sae=24, activation=activation, k=3)
    assert _expected_shapes(config) == {k: tuple(v.shape) for k, v in sae_state(create_sae(config)).items()}
