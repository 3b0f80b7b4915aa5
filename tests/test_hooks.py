"""Hook points and the activation collector, on a stand-in with nanochat's module names and on
small Hugging Face models built from configs (GPT-2, Llama, BERT)."""
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent / "stubs"))

from nanochat.gpt import GPT, GPTConfig, KVCache, norm  # noqa: E402

from fastsae.hooks import (  # noqa: E402
    HOOK_KINDS,
    ActivationCollector,
    TokenBatch,
    collect_activations_from_dataloader,
    list_hook_points,
    resolve_hook_point,
)

N_LAYER, D = 3, 16


@pytest.fixture
def gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=N_LAYER, n_embd=D)).eval()


@pytest.fixture
def idx():
    return torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))


def reference(model, idx):
    """Every hook kind of every layer, computed by calling the modules directly (no hooks)."""
    out = {}
    with torch.no_grad():
        x = norm(model.transformer.wte(idx))
        x0 = x
        for i, block in enumerate(model.transformer.h):
            x = model.resid_lambdas[i] * x + model.x0_lambdas[i] * x0
            out[f"blocks.{i}.hook_resid_pre"] = x
            attn = block.attn(norm(x))
            out[f"blocks.{i}.hook_attn_out"] = attn
            h = x + attn
            out[f"blocks.{i}.hook_mlp_in"] = norm(h)
            out[f"blocks.{i}.hook_mlp_hidden"] = block.mlp.c_fc(norm(h))
            mlp = block.mlp(norm(h))
            out[f"blocks.{i}.hook_mlp_out"] = mlp
            x = h + mlp
            out[f"blocks.{i}.hook_resid_post"] = x
    return {k: v.reshape(-1, v.shape[-1]) for k, v in out.items()}


@pytest.mark.parametrize("kind", HOOK_KINDS)
def test_every_hook_kind_matches_the_modules(gpt, idx, kind):
    expected = reference(gpt, idx)
    names = [f"blocks.{i}.hook_{kind}" for i in range(N_LAYER)]
    with ActivationCollector(gpt, names) as c:
        gpt(idx)
    acts = c.get_activations()
    for name in names:
        assert acts[name].shape == expected[name].shape
        torch.testing.assert_close(acts[name], expected[name])
    # resid_pre is the lambda-mixed input, not the previous block's output
    assert not torch.allclose(expected["blocks.1.hook_resid_pre"], expected["blocks.0.hook_resid_post"])


def test_resolve_kinds_and_modules(gpt):
    h = gpt.transformer.h
    assert resolve_hook_point(gpt, "blocks.1.hook_resid_pre") == (h[1], "pre")
    assert resolve_hook_point(gpt, "blocks.1.hook_resid_post") == (h[1], "output")
    assert resolve_hook_point(gpt, "blocks.2.hook_attn_out") == (h[2].attn, "output")
    assert resolve_hook_point(gpt, "blocks.0.hook_mlp_out") == (h[0].mlp, "output")
    assert resolve_hook_point(gpt, "blocks.0.hook_mlp_hidden") == (h[0].mlp.c_fc, "output")
    assert resolve_hook_point(gpt, "transformer.h.2.mlp.c_proj") == (h[2].mlp.c_proj, "output")
    points = list_hook_points(gpt)
    assert resolve_hook_point(gpt, "blocks.0.hook_mlp_in") == (h[0].mlp, "pre")
    assert points[:6] == [f"blocks.0.hook_{k}" for k in sorted(HOOK_KINDS)]
    assert "transformer.h.1.attn.c_q" in points and len([p for p in points if p.startswith("blocks.")]) == 18


def test_module_path_equals_canonical_name(gpt, idx):
    with ActivationCollector(gpt, ["transformer.h.1.mlp.c_proj", "blocks.1.hook_mlp_out", "transformer.h.1"]) as c:
        gpt(idx)
    acts = c.get_activations()
    torch.testing.assert_close(acts["transformer.h.1.mlp.c_proj"], acts["blocks.1.hook_mlp_out"])
    torch.testing.assert_close(acts["transformer.h.1"], reference(gpt, idx)["blocks.1.hook_resid_post"])


def test_unknown_hook_point_lists_close_names(gpt):
    with pytest.raises(ValueError, match=r"unknown hook point 'blocks.0.hook_resid_pots'.*blocks\.0\.hook_resid_post"):
        resolve_hook_point(gpt, "blocks.0.hook_resid_pots")
    with pytest.raises(ValueError, match=r"unknown hook point 'transformer.h.1.mlpp'.*transformer\.h\.1\.mlp"):
        ActivationCollector(gpt, ["transformer.h.1.mlpp"])
    with pytest.raises(ValueError, match="unknown hook point"):
        resolve_hook_point(gpt, "")


def test_layer_out_of_range(gpt):
    with pytest.raises(ValueError, match=r"layer 3 out of range, model has 3 blocks \(valid layers 0\.\.2\)"):
        resolve_hook_point(gpt, "blocks.3.hook_resid_post")
    with pytest.raises(ValueError, match="layer -1 out of range"):
        resolve_hook_point(gpt, "blocks.-1.hook_mlp_out")


def test_padding_dropped_metadata_kept_bos_optional(gpt, idx):
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    docs = torch.tensor([[5] * 7, [6] * 4 + [-1] * 3])
    hp = "blocks.1.hook_resid_post"
    with ActivationCollector(gpt, hp) as c:
        c.set_batch(idx, mask, docs)
        gpt(idx)
    acts, meta = c.get_activations()[hp], c.get_metadata(hp)[hp]
    keep = mask.flatten().bool()
    assert acts.shape == (11, D)
    torch.testing.assert_close(acts, reference(gpt, idx)[hp][keep])
    assert meta["token_ids"].tolist() == idx.flatten()[keep].tolist()
    assert meta["doc_ids"].tolist() == [5] * 7 + [6] * 4
    assert meta["positions"].tolist() == list(range(7)) + list(range(4))

    with ActivationCollector(gpt, hp, drop_bos=True) as c:
        c.set_batch(idx, mask, docs)
        gpt(idx)
    meta = c.get_metadata(hp)[hp]
    assert c.get_activations()[hp].shape == (9, D) and 0 not in meta["positions"].tolist()


def test_cap_cast_and_clear(gpt, idx):
    hp = "blocks.0.hook_mlp_hidden"
    with ActivationCollector(gpt, hp, max_activations=10, dtype=torch.bfloat16) as c:
        gpt(idx)
        assert c.is_full
        gpt(idx)
    acts = c.get_activations(hp)[hp]
    assert acts.shape == (10, 4 * D) and acts.dtype == torch.bfloat16
    torch.testing.assert_close(acts, reference(gpt, idx)[hp][:10].bfloat16())
    c.clear()
    assert c.counts[hp] == 0 and c.get_activations()[hp].numel() == 0


def test_hooks_removed_on_exit(gpt, idx):
    with ActivationCollector(gpt, ["blocks.0.hook_resid_pre", "blocks.0.hook_attn_out"]) as c:
        gpt(idx)
    assert not gpt.transformer.h[0]._forward_pre_hooks and not gpt.transformer.h[0].attn._forward_hooks
    gpt(idx)
    assert c.counts["blocks.0.hook_resid_pre"] == idx.numel()


def test_kv_cache_decode_steps_are_collected(gpt, idx):
    """Prefill sees (B, T, D), each decode step (B, 1, D); decode activations equal a full forward's."""
    hp = "blocks.2.hook_resid_post"
    full = torch.cat([idx, torch.tensor([[3, 4], [5, 6]])], dim=1)
    with ActivationCollector(gpt, hp) as c:
        cache = KVCache()
        gpt(idx, kv_cache=cache)
        gpt(full[:, 7:8], kv_cache=cache)
        gpt(full[:, 8:9], kv_cache=cache)
    acts = c.get_activations()[hp]
    assert acts.shape == (2 * 7 + 2 + 2, D)
    expected = reference(gpt, full)[hp].view(2, 9, D)
    torch.testing.assert_close(acts[-2:], expected[:, 8], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(acts[-4:-2], expected[:, 7], atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_atomic(gpt, idx, tmp_path):
    path = tmp_path / "acts.safetensors"
    hps = ["blocks.0.hook_resid_post", "blocks.2.hook_mlp_out"]
    with ActivationCollector(gpt, hps, save_path=path) as c:
        c.set_batch(idx)
        gpt(idx)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acts.safetensors"]  # no temp file left
    loaded = ActivationCollector.load_activations(path)
    for hp in hps:
        assert torch.equal(loaded[hp], c.get_activations()[hp])
    only, meta = ActivationCollector.load_activations(path, hook_points="blocks.2.hook_mlp_out", with_metadata=True)
    assert list(only) == ["blocks.2.hook_mlp_out"]
    assert meta["blocks.2.hook_mlp_out"]["token_ids"].tolist() == idx.flatten().tolist()
    with pytest.raises(KeyError, match="blocks.1.hook_mlp_out"):
        ActivationCollector.load_activations(path, ["blocks.1.hook_mlp_out"])


def test_no_save_when_the_block_raises(gpt, tmp_path):
    path = tmp_path / "acts.safetensors"
    with pytest.raises(RuntimeError):
        with ActivationCollector(gpt, "blocks.0.hook_resid_post", save_path=path):
            raise RuntimeError("interrupted")
    assert not path.exists()


def test_collect_from_dataloader_batch_forms(gpt, idx):
    hp = ["blocks.0.hook_resid_post", "blocks.1.hook_attn_out"]
    expected = reference(gpt, idx)
    loader = [idx, (idx, idx), {"input_ids": idx, "attention_mask": torch.ones_like(idx)}]
    acts = collect_activations_from_dataloader(gpt, loader, hp, max_activations=40, verbose=False)
    for name in hp:
        assert acts[name].shape == (40, D)  # three batches of 14, capped at 40
        torch.testing.assert_close(acts[name][:14], expected[name])
        torch.testing.assert_close(acts[name][28:], expected[name][:12])
    batch = TokenBatch(idx, torch.ones_like(idx), torch.zeros_like(idx), torch.arange(7).expand(2, 7))
    acts = collect_activations_from_dataloader(gpt, [batch], hp[:1], verbose=False)
    torch.testing.assert_close(acts[hp[0]], expected[hp[0]])
    with pytest.raises(TypeError, match="dataloader item"):
        collect_activations_from_dataloader(gpt, ["text"], hp, verbose=False)


class TupleBlock(nn.Module):
    """A block in the Hugging Face style: called with hidden_states=..., returns a tuple."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, hidden_states, attention_mask=None):
        return (hidden_states + self.lin(hidden_states), None)


class TupleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([TupleBlock(), TupleBlock()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(hidden_states=x)[0]
        return x


def test_tuple_outputs_and_keyword_inputs():
    torch.manual_seed(0)
    model, x = TupleModel(), torch.randn(2, 3, 4)
    with ActivationCollector(model, ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]) as c:
        out = model(x)
    acts = c.get_activations()
    torch.testing.assert_close(acts["blocks.1.hook_resid_post"], out.detach().reshape(6, 4))
    torch.testing.assert_close(acts["blocks.1.hook_resid_pre"], model.layers[0](x)[0].detach().reshape(6, 4))


def _tiny_hf(family):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32)
        return transformers.GPT2LMHeadModel(config).eval()
    if family == "llama":
        config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                          num_attention_heads=2, num_key_value_heads=2, vocab_size=100)
        return transformers.LlamaForCausalLM(config).eval()
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                     num_attention_heads=2, vocab_size=100)
    return transformers.BertModel(config).eval()


@pytest.mark.parametrize("family,paths", [
    ("gpt2", {"resid_post": "transformer.h.1", "attn_out": "transformer.h.1.attn", "mlp_out": "transformer.h.1.mlp",
              "mlp_hidden": "transformer.h.1.mlp.c_fc", "mlp_in": "transformer.h.1.mlp"}),
    ("llama", {"resid_post": "model.layers.1", "attn_out": "model.layers.1.self_attn",
               "mlp_out": "model.layers.1.mlp", "mlp_hidden": "model.layers.1.mlp.down_proj",
               "mlp_in": "model.layers.1.mlp"}),
    ("bert", {"resid_post": "encoder.layer.1", "attn_out": "encoder.layer.1.attention.output.dense",
              "mlp_out": "encoder.layer.1.output.dense", "mlp_hidden": "encoder.layer.1.intermediate",
              "mlp_in": "encoder.layer.1.intermediate"}),
])
def test_hugging_face_families(family, paths):
    model = _tiny_hf(family)
    for kind, path in paths.items():
        module, hook_kind = resolve_hook_point(model, f"blocks.1.hook_{kind}")
        assert module is model.get_submodule(path)
        assert hook_kind == ("pre" if (family, kind) == ("llama", "mlp_hidden") or kind == "mlp_in" else "output")
    ids = torch.randint(0, 100, (2, 5))
    names = [f"blocks.{i}.hook_{k}" for i in range(2) for k in HOOK_KINDS]
    with ActivationCollector(model, names) as c:
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
    acts = c.get_activations()
    hidden = [h.reshape(10, 32) for h in out.hidden_states]
    torch.testing.assert_close(acts["blocks.0.hook_resid_post"], hidden[1])  # block 0 output
    torch.testing.assert_close(acts["blocks.1.hook_resid_pre"], hidden[1])   # block 1 input
    torch.testing.assert_close(acts["blocks.0.hook_resid_pre"], hidden[0])
    assert acts["blocks.1.hook_mlp_hidden"].shape == (10, 128 if family == "gpt2" else 64)
    # the MLP's input: the block's second norm of the residual (BERT: the attention sublayer's output)
    assert acts["blocks.1.hook_mlp_in"].shape == (10, 32)
    assert not torch.allclose(acts["blocks.1.hook_mlp_in"], acts["blocks.1.hook_resid_pre"])
    with pytest.raises(ValueError, match="layer 2 out of range, model has 2 blocks"):
        resolve_hook_point(model, "blocks.2.hook_resid_post")
