"""Neuronpedia export: the directory loads back, sparsity matches, batch files parse."""
import json

import pytest
import torch
from safetensors.torch import load_file
from test_feature_viz import SCRIPT, TEXTS, word_setup

from fastsae.evaluator import SAEEvaluator
from fastsae.io import load_sae, sae_state
from fastsae.latent_cache import LatentCache, collect_activations
from fastsae.neuronpedia import NeuronpediaUploader, create_neuronpedia_metadata

HOOK = "blocks.0.hook_resid_post"


def test_export_loads_back(tmp_path):
    tok, model, sae = word_setup()
    cache = LatentCache.from_model(sae, model, tok, TEXTS, max_tokens=1000)
    out = NeuronpediaUploader("tiny", "v1").prepare_sae_for_upload(
        sae, sae.config, tmp_path / "np", metadata={"training": {"steps": 10}}, cache=cache, tokenizer=tok,
        W_U=model.lm_head.weight, features_per_batch=5)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "batch-0.json", "batch-1.json", "batch-2.json", "batch-3.json", "cfg.json",
                     "metadata.json", "sae_weights.safetensors", "sparsity.safetensors"]

    loaded = load_sae(out)
    for name, value in sae_state(sae).items():
        assert torch.equal(sae_state(loaded)[name], value), name
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["model_name"] == "tiny-v1" and cfg["hook_name"] == HOOK and cfg["d_sae"] == 16

    sparsity = load_file(str(out / "sparsity.safetensors"))["sparsity"]
    assert sparsity.shape == (16,)
    torch.testing.assert_close(sparsity, torch.log10(cache.density().float() + 1e-10))

    features = []
    for b in range(4):
        batch = json.loads((out / f"batch-{b}.json").read_text())
        assert batch["model_id"] == "tiny-v1" and batch["layer"] == 0
        features += batch["features"]
    assert [f["feature_index"] for f in features] == list(range(16))
    f0 = features[0]
    assert f0["density"] == pytest.approx(3 / cache.num_tokens) == f0["frac_nonzero"]
    top = f0["activations"][0]
    assert top["tokens"][top["qualifying_token_index"]] == " " + SCRIPT  # JSON carries the raw text
    assert len(top["tokens"]) == len(top["values"]) and top["maxValue"] == pytest.approx(5.0)
    assert top["bin_min"] == -1
    assert f0["pos_str"][0] == " cat" and f0["neg_str"][0] == " dog"
    assert f0["pos_values"][0] == pytest.approx(3.0)
    assert sum(f0["freq_hist_data_bar_heights"]) == 3
    assert sum(f0["logits_hist_data_bar_heights"]) == len(tok.vocab)
    dead = [f for f in features if f["density"] == 0]
    assert all(f["activations"] == [] for f in dead)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["training"] == {"steps": 10} and meta["architecture"]["d_sae"] == 16


def test_export_from_activations_without_model(tmp_path):
    tok, model, sae = word_setup()
    acts, _ = collect_activations(model, tok, TEXTS, HOOK, 1000)
    out = NeuronpediaUploader().prepare_sae_for_upload(sae, sae.config, tmp_path / "np", activations=acts,
                                                       features=[0, 3])
    batch = json.loads((out / "batch-0.json").read_text())
    assert [f["feature_index"] for f in batch["features"]] == [0, 3]
    assert batch["features"][0]["pos_str"] == []  # no unembedding given
    assert batch["features"][0]["activations"][0]["tokens"][0] == ""  # no token ids known


def test_weights_only_export(tmp_path):
    _, _, sae = word_setup()
    out = NeuronpediaUploader().prepare_sae_for_upload(sae, None, tmp_path / "np")
    assert not (out / "sparsity.safetensors").exists() and not list(out.glob("batch-*.json"))
    assert torch.equal(load_sae(out).W_dec, sae.W_dec)


def test_metadata_includes_eval_metrics():
    tok, model, sae = word_setup()
    acts, _ = collect_activations(model, tok, TEXTS, HOOK, 1000)
    metrics = SAEEvaluator(sae).evaluate(acts)
    meta = create_neuronpedia_metadata(sae, sae.config, training_info={"tokens": 5}, eval_metrics=metrics)
    assert meta["evaluation"]["fvu"] == pytest.approx(0.0, abs=1e-6)
    assert meta["sparsity_config"]["l1_coefficient"] == sae.config.l1_coefficient
    assert meta["architecture"]["expansion_factor"] == 2.0
    json.dumps(meta)
