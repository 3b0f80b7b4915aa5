"""train_saes: several hook points from one forward pass, one SAE each, on the nanochat stand-in."""
import dataclasses

import pytest
import torch
from nanochat_stub import number_docs  # noqa: E402

import fastsae  # noqa: E402
from fastsae.config import SAEConfig  # noqa: E402
from fastsae.io import load_sae  # noqa: E402
from fastsae.models import create_sae  # noqa: E402
from fastsae.store import collect_to_store, split_store  # noqa: E402
from fastsae.trainer import SAETrainer  # noqa: E402

RESID, HIDDEN = "blocks.1.hook_resid_post", "blocks.0.hook_mlp_hidden"
TRAINING = dict(k=4, batch_size=128, num_epochs=2, num_activations=2000, learning_rate=3e-3)


def docs(n=60):
    return number_docs(n)


def test_train_saes_equals_one_collection_and_run_per_hook_point(tiny, tmp_path):
    model, tok = tiny
    configs = {RESID: SAEConfig(d_in=16, expansion_factor=2, **TRAINING),
               HIDDEN: SAEConfig(d_in=64, expansion_factor=1, **TRAINING)}
    trained = fastsae.train_saes(model, tok, docs(), configs, tmp_path / "runs", verbose=False)
    assert list(trained) == [RESID, HIDDEN]
    for hook_point, (sae, _) in trained.items():
        saved = load_sae(tmp_path / "runs" / hook_point / "best_model")
        assert saved.config.hook_point == hook_point and saved.d_in == configs[hook_point].d_in
        # The same SAE as a store of that hook point alone and a run on it would give.
        store = collect_to_store(model, tok, docs(), hook_point, tmp_path / "alone" / hook_point, 2000,
                                 shard_tokens=1024, progress=False)
        train, val = split_store(store, 0.1)
        config = dataclasses.replace(configs[hook_point], hook_point=hook_point)
        alone = SAETrainer(create_sae(config), config, train, val, device="cpu")
        alone.train(verbose=False)
        for name, value in alone.sae.state_dict().items():
            assert torch.equal(value, sae.state_dict()[name]), (hook_point, name)


def test_train_saes_checks_configs_before_collecting(tiny, tmp_path):
    model, tok = tiny
    with pytest.raises(ValueError, match=r"configs\['blocks.0.hook_mlp_hidden'\].d_in is 16, but the model's "
                                         r"activation there has width 64"):
        fastsae.train_saes(model, tok, docs(), {HIDDEN: SAEConfig(d_in=16, **TRAINING)}, tmp_path, verbose=False)
    with pytest.raises(ValueError, match=r"hook_point is 'blocks.0.hook_attn_out': leave it unset"):
        fastsae.train_saes(model, tok, docs(), {RESID: SAEConfig(d_in=16, hook_point="blocks.0.hook_attn_out",
                                                                 **TRAINING)}, tmp_path, verbose=False)
    with pytest.raises(ValueError, match="configs is empty"):
        fastsae.train_saes(model, tok, docs(), {}, tmp_path, verbose=False)
    assert not any(tmp_path.iterdir())


def test_train_saes_pairs_a_transcoder_with_its_target_from_the_same_passes(tiny, tmp_path):
    model, tok = tiny
    mlp_in, mlp_out = "blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out"
    config = SAEConfig(d_in=16, expansion_factor=2, architecture="transcoder", output_hook_point=mlp_out, **TRAINING)
    trained = fastsae.train_saes(model, tok, docs(), {mlp_in: config}, tmp_path / "runs", verbose=False)
    sae, trainer = trained[mlp_in]
    folder = tmp_path / "runs" / mlp_in
    assert (folder / "target_activations" / "manifest.json").is_file()
    paired = fastsae.PairedStore(fastsae.ActivationStore(folder / "activations"),
                                 fastsae.ActivationStore(folder / "target_activations"))
    assert trainer.data.num_rows < len(paired) and trainer.data.width == 32  # the last shards held out
    saved = load_sae(folder / "best_model")
    assert saved.config.output_hook_point == mlp_out
    with pytest.raises(ValueError, match=r"configs\['blocks.1.hook_mlp_in'\].d_out is 64, but the model's "
                                         r"activation at 'blocks.1.hook_mlp_out' has width 16"):
        fastsae.train_saes(model, tok, docs(), {mlp_in: dataclasses.replace(config, d_out=64)}, tmp_path / "x",
                           verbose=False)
