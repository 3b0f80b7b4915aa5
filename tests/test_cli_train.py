"""``fastsae train`` and ``python -m scripts.sae_train``: collection, training, outputs, resume,
errors; on the embedded MiniLM and on a nanochat checkpoint (the stand-in package)."""
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from nanochat_stub import nanochat, stubs_on_path

from fastsae.cli import main
from fastsae.io import load_sae

REPO = Path(__file__).resolve().parents[1]
STUBS = REPO / "tests" / "stubs"
SMALL = ["--num_activations", "4096", "--batch_size", "256", "--num_epochs", "1", "--expansion_factor", "1",
         "--k", "8", "--learning_rate", "1e-3", "--context_length", "64", "--device", "cpu", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_fastsae_train_on_default_model_then_resume(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "--layer", "1", "--output_dir", str(out), "--max_steps", "5", *SMALL]) == 0
    layer = out / "layer_1"
    assert (layer / "checkpoints" / "step_5").is_dir() and not (layer / "final_model").exists()
    manifest = json.loads((layer / "activations" / "manifest.json").read_text())
    assert manifest["token_count"] == 4096 and len(manifest["shards"]) == 4

    assert main(["train", "--layer", "1", "--output_dir", str(out), "--resume", *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "best val FVU" in printed and "blocks.1.hook_resid_post" in printed
    steps = [json.loads(ln)["step"] for ln in (layer / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] <= 5 and max(steps) == 12  # 3 training shards of 1024 rows / 256: one epoch = 12 steps
    assert steps == sorted(steps)
    sae = load_sae(layer / "best_model")
    assert sae.config.hook_point == "blocks.1.hook_resid_post" and sae.d_in == 384 and sae.d_sae == 384
    for name in ("config.json", "loss_curves.png", "final_model"):
        assert (layer / name).exists(), name
    recorded = json.loads((layer / "config.json").read_text())
    assert recorded["num_activations"] == 4096 and recorded["learning_rate"] == 1e-3
    assert recorded["run"] == {"learning_rate": 1e-3, "total_steps": 12, "global_batch": 256, "train_rows": 3072,
                               "world_size": 1}


def _nanochat_checkpoint(directory: Path) -> None:
    gpt = nanochat("gpt")
    torch.manual_seed(0)
    config = gpt.GPTConfig(n_layer=2, n_embd=16)
    nanochat("checkpoint_manager").save_checkpoint(str(directory), 7, gpt.GPT(config).state_dict(),
                                                   {"model_config": asdict(config), "step": 7})


def test_seed_script_on_a_nanochat_checkpoint(tmp_path):
    ckpt = tmp_path / "base_checkpoints" / "d2"
    _nanochat_checkpoint(ckpt)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(STUBS), str(REPO)]))
    args = [sys.executable, "-m", "scripts.sae_train", "--checkpoint", str(ckpt), "--layer", "1", "--hook_type",
            "mlp", "--activation", "relu", "--output_dir", str(tmp_path / "sae_outputs"), *SMALL,
            "--expansion_factor", "4", "--num_activations", "2048", "--batch_size", "128"]
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    sae = load_sae(tmp_path / "sae_outputs" / "layer_1" / "best_model")
    assert sae.config.activation == "relu" and sae.config.hook_point == "blocks.1.hook_mlp_out"
    assert sae.d_in == 16 and sae.d_sae == 64
    assert sae.metadata["normalization_scale"] > 0


def test_unwritable_output_dir_is_reported_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "--layer", "1", "--output_dir", str(blocker), *SMALL]) == 1
    err = capsys.readouterr().err
    assert "fastsae train: error: save_dir" in err and "is not a writable directory" in err


def test_layer_out_of_range(tmp_path, capsys):
    assert main(["train", "--layer", "9", "--output_dir", str(tmp_path), *SMALL]) == 1
    assert "--layer 9 is out of range" in capsys.readouterr().err


def test_several_layers_and_hook_point_globs_train_one_sae_each(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "--layers", "0-1", "--output_dir", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    for layer in (0, 1):
        folder = out / f"layer_{layer}"
        hook_point = f"blocks.{layer}.hook_resid_post"
        assert json.loads((folder / "activations" / "manifest.json").read_text())["hook_point"] == hook_point
        assert load_sae(folder / "best_model").config.hook_point == hook_point
        assert f"on {hook_point} (best val FVU" in printed
    assert main(["train", "--hook_points", "blocks.[12].hook_mlp_out", "blocks.0.hook_attn_out", "--output_dir",
                 str(out), *SMALL]) == 0
    for hook_point in ("blocks.1.hook_mlp_out", "blocks.2.hook_mlp_out", "blocks.0.hook_attn_out"):
        assert load_sae(out / hook_point / "best_model").config.hook_point == hook_point
    assert sorted(p.name for p in out.iterdir()) == ["blocks.0.hook_attn_out", "blocks.1.hook_mlp_out",
                                                      "blocks.2.hook_mlp_out", "layer_0", "layer_1"]


def test_torchrun_ranks_collect_their_shares_and_train(tmp_path):
    from safetensors.torch import load_file

    ckpt = tmp_path / "base_checkpoints" / "d2"
    _nanochat_checkpoint(ckpt)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(STUBS), str(REPO)]), OMP_NUM_THREADS="1")
    flags = ["train", "--checkpoint", str(ckpt), "--layers", "0,1", *SMALL, "--num_activations", "65536"]
    one = subprocess.run([sys.executable, "-m", "fastsae.cli", *flags, "--output_dir", str(tmp_path / "one")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29517", "-m", "fastsae.cli", *flags, "--output_dir", str(tmp_path / "two")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    for layer in (0, 1):
        stores = [tmp_path / run / f"layer_{layer}" / "activations" for run in ("one", "two")]
        a, b = (json.loads((d / "manifest.json").read_text()) for d in stores)
        assert a["shards"] == b["shards"] and len(a["shards"]) == 22
        for shard in a["shards"]:  # the ranks' shards are the one process's, byte for byte
            x, y = (load_file(d / shard["file"]) for d in stores)
            assert all(torch.equal(x[k], y[k]) for k in x)
        sae = load_sae(tmp_path / "two" / f"layer_{layer}" / "best_model")
        assert sae.config.hook_point == f"blocks.{layer}.hook_resid_post"
        # Data parallel: each rank took its half of every batch the one process trained on, and
        # the gradients were averaged: the same SAE up to the rounding of the sums.
        alone = load_sae(tmp_path / "one" / f"layer_{layer}" / "final_model")
        together = load_sae(tmp_path / "two" / f"layer_{layer}" / "final_model")
        for (name, a), b in zip(alone.state_dict().items(), together.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=name)
    assert two.stdout.count("trained topk SAE") == 2  # printed by rank 0 only

    # --distribute-modules: rank 0 trains layer 0's SAE and rank 1 layer 1's, each alone on the
    # whole store: the same SAEs as the one-process run, bit for bit.
    split = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                            "29519", "-m", "fastsae.cli", *flags, "--distribute_modules", "--output_dir",
                            str(tmp_path / "split")], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert split.returncode == 0, split.stderr[-2000:]
    assert split.stdout.count("trained topk SAE") == 2  # one line from each rank
    for layer in (0, 1):
        weights = [load_file(tmp_path / run / f"layer_{layer}" / "best_model" / "sae_weights.safetensors")
                   for run in ("one", "split")]
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), layer
        config = json.loads((tmp_path / "split" / f"layer_{layer}" / "config.json").read_text())
        assert config["run"]["world_size"] == 1  # trained by one rank alone


def test_stream_trains_without_an_activation_store(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "--layer", "1", "--stream", "--stream_window", "2048", "--output_dir", str(out),
                 *SMALL]) == 0
    folder = out / "layer_1"
    assert not (folder / "activations").exists()  # nothing collected to disk
    sae = load_sae(folder / "best_model")
    assert sae.config.hook_point == "blocks.1.hook_resid_post"
    assert sae.metadata["num_tokens_collected"] == 4096 and sae.metadata["model_name"].endswith("all-MiniLM-L6-v2")
    printed = capsys.readouterr().out
    assert "on blocks.1.hook_resid_post (best val FVU" in printed
    val_fvus = [json.loads(line)["val_fvu"] for line in (folder / "metrics.jsonl").read_text().splitlines()
                if "val_fvu" in line]
    assert val_fvus and val_fvus[-1] < 1.0  # it learned from the stream (4096 tokens, 409 held out)


def test_stream_trains_several_layers_from_one_forward_each_as_it_would_alone(tmp_path, capsys):
    from safetensors.torch import load_file

    flags = ["--stream", "--stream_window", "2048", *SMALL]
    assert main(["train", "--layers", "0,1", "--output_dir", str(tmp_path / "together"), *flags]) == 0
    assert "trained topk SAE d_in=384 d_sae=384 on blocks.0.hook_resid_post" in capsys.readouterr().out
    for layer in (0, 1):
        assert main(["train", "--layer", str(layer), "--output_dir", str(tmp_path / f"alone{layer}"), *flags]) == 0
        a, b = (load_file(tmp_path / run / f"layer_{layer}" / "final_model" / "sae_weights.safetensors")
                for run in ("together", f"alone{layer}"))
        assert all(torch.equal(a[k], b[k]) for k in a), layer
        assert not (tmp_path / "together" / f"layer_{layer}" / "activations").exists()


MODES = {"data-parallel": [], "distribute-modules": ["--distribute_modules"],
         "stream": ["--stream", "--stream_window", "8192"],
         "stream-distribute-modules": ["--stream", "--stream_window", "8192", "--distribute_modules"]}


@pytest.mark.parametrize("mode", list(MODES))
def test_torchrun_training_stopped_and_resumed_equals_one_uninterrupted_run(tmp_path, mode):
    from safetensors.torch import load_file

    ckpt = tmp_path / "base_checkpoints" / "d2"
    _nanochat_checkpoint(ckpt)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(STUBS), str(REPO)]), OMP_NUM_THREADS="1")
    flags = ["train", "--checkpoint", str(ckpt), "--layers", "0,1", *SMALL, "--num_activations", "65536", *MODES[mode]]

    def torchrun(out, *extra, port):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                               str(port), "-m", "fastsae.cli", *flags, "--output_dir", str(out), *extra],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    def weights(run, layer):
        return load_file(tmp_path / run / f"layer_{layer}" / "final_model" / "sae_weights.safetensors")

    port = 29521 + 3 * list(MODES).index(mode)
    torchrun(tmp_path / "whole", port=port)
    assert "stopped at step 40" in torchrun(tmp_path / "parts", "--max_steps", "40", port=port + 1)
    torchrun(tmp_path / "parts", "--resume", port=port + 2)
    for layer in (0, 1):
        a, b = weights("whole", layer), weights("parts", layer)
        assert all(torch.equal(a[k], b[k]) for k in a), (mode, layer)
    if "--stream" in flags:
        # The ranks shared the model's forwards and each saw the one process's stream: with
        # --distribute-modules each SAE is the one process's bit for bit; data parallel, to the
        # rounding of the averaged gradients.
        one = subprocess.run([sys.executable, "-m", "fastsae.cli", *flags, "--output_dir", str(tmp_path / "one")],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert one.returncode == 0, one.stderr[-2000:]
        for layer in (0, 1):
            a, b = weights("one", layer), weights("whole", layer)
            for k in a:
                if "--distribute_modules" in flags:
                    assert torch.equal(a[k], b[k]), (layer, k)
                else:
                    torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=k)
        assert not (tmp_path / "whole" / "layer_0" / "activations").exists()


def test_stream_distribute_modules_needs_an_sae_per_rank(tmp_path):
    ckpt = tmp_path / "base_checkpoints" / "d2"
    _nanochat_checkpoint(ckpt)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(STUBS), str(REPO)]), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29540", "-m", "fastsae.cli", "train", "--checkpoint", str(ckpt), "--layer", "1", *SMALL,
                           "--stream", "--distribute_modules", "--output_dir", str(tmp_path / "out")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "--stream --distribute_modules needs at least one SAE per rank: 1 hook point(s) for 2 ranks" in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--layers", "0,9"], "--layers 9 is out of range: the model has 6 layers (0 to 5)"),
    (["--layer", "1", "--layers", "0"], "give one of --layer, --layers or --hook_points"),
    (["--hook_points", "blocks.*.hook_nothing"], "--hook_points 'blocks.*.hook_nothing' matches no hook point"),
    (["--hook_points", "blocks.1.hook_nothing"], "unknown hook point 'blocks.1.hook_nothing'"),
    (["--layers", "0,1", "--activations", "somewhere"], "--activations holds one hook point"),
    (["--layer", "1", "--stream", "--activations", "somewhere"], "--stream trains from the model's forward: it takes "
                                                                  "no --activations"),
])
def test_bad_hook_point_choices_are_one_line_errors(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["train", *args, "--output_dir", str(out), *SMALL]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()  # nothing left behind


def test_matryoshka_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "--layer", "1", "--activation", "matryoshka_batchtopk", "--matryoshka_sizes", "24,96",
                 "--output_dir", str(out), *SMALL]) == 0
    sae = load_sae(out / "layer_1" / "best_model")
    assert sae.config.activation == "matryoshka_batchtopk" and sae.config.matryoshka_sizes == (24, 96, 384)
    logged = [json.loads(line) for line in (out / "layer_1" / "metrics.jsonl").read_text().splitlines()]
    assert any("prefix_24_fvu" in r and "prefix_96_fvu" in r for r in logged)
    with pytest.raises(SystemExit):
        main(["train", "--layer", "1", "--matryoshka_sizes", "24,x", "--output_dir", str(out), *SMALL])
    assert "expected comma-separated positive widths (256,1024,4096), got '24,x'" in capsys.readouterr().err
    assert main(["train", "--layer", "1", "--matryoshka_sizes", "24", "--output_dir", str(tmp_path / "o2"),
                 *SMALL]) == 1
    assert "--matryoshka_sizes is for --activation matryoshka_batchtopk, not topk" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()  # refused before the model loads


def test_jumprelu_target_l0_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "--layer", "1", "--activation", "jumprelu", "--target_l0", "6", "--output_dir", str(out),
                 *SMALL]) == 0
    sae = load_sae(out / "layer_1" / "best_model")
    assert sae.config.target_l0 == 6.0 and sae.config.l0_coefficient == 1.0
    assert main(["train", "--layer", "1", "--target_l0", "6", "--output_dir", str(tmp_path / "o2"), *SMALL]) == 1
    assert "--target_l0 is for --activation jumprelu, not topk (--k sets the L0 of the TopK kinds)" in \
        capsys.readouterr().err
    assert not (tmp_path / "o2").exists()  # refused before the model loads


@pytest.mark.parametrize("value", ["x", "0,0", "-1", "3-1", ""])
def test_layers_value_is_checked_by_the_parser(tmp_path, capsys, value):
    with pytest.raises(SystemExit):
        main(["train", "--layers", value, "--output_dir", str(tmp_path), *SMALL])
    assert "expected block indices (0,2,4), ranges (0-3) or 'all'" in capsys.readouterr().err


def test_split_store_holds_out_the_last_whole_shards(tmp_path):
    from fastsae.corpus import Corpus
    from fastsae.store import collect_to_store, split_store

    gpt = nanochat("gpt")
    torch.manual_seed(0)
    texts = Corpus("numbers", lambda: [f"document number {i} " * (1 + i % 5) for i in range(40)], "numbers-40")
    model, tokenizer = gpt.GPT(gpt.GPTConfig()).eval(), nanochat("tokenizer").ByteTokenizer()
    store = collect_to_store(model, tokenizer, texts, "blocks.0.hook_resid_post", tmp_path, 300, shard_tokens=64,
                             progress=False)
    assert [s["num_tokens"] for s in store.shards] == [64, 64, 64, 64, 44]
    everything = store.load_all()

    # 0.25 of 300 tokens = 75: the last shard (44) is not enough, the last two (108) are
    train, val = split_store(store, 0.25)
    assert train.shards == store.shards[:3] and train.num_tokens == len(train) == 192
    assert torch.equal(torch.cat([train.load_all(), val]), everything)  # disjoint, and together the whole store
    seen = torch.cat([m["token_index"] for _, m in train.iter_batches(50, with_metadata=True)])
    assert sorted(seen.tolist()) == list(range(192))  # training batches never reach the held-out shards
    assert store.num_tokens == 300 and len(store.shards) == 5  # the store itself is not narrowed

    train, val = split_store(store, 0.99)  # at least one shard is always left to train on
    assert train.shards == store.shards[:1] and torch.equal(val, everything[64:])
    assert split_store(store, 0.0) == (store, None)


def test_seed_commands_from_a_nanochat_checkout(tmp_path):
    """Laid out as a user has it: a nanochat checkout (nanochat/ and its own scripts/, no
    __init__.py) with fastsae installed and nothing on PYTHONPATH; checkpoints under
    $NANOCHAT_BASE_DIR. The seed's commands and `fastsae train` run from the checkout."""
    import shutil

    checkout, base = tmp_path / "nanochat-checkout", tmp_path / "base"
    shutil.copytree(STUBS / "nanochat", checkout / "nanochat")
    (checkout / "scripts").mkdir()
    (checkout / "scripts" / "base_train.py").write_text("print('nanochat base_train ran')\n")
    _nanochat_checkpoint(base / "base_checkpoints" / "d2")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["NANOCHAT_BASE_DIR"] = str(base)

    def run(*args, python_flags=()):
        done = subprocess.run([sys.executable, *python_flags, *args], cwd=checkout, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    small = [*SMALL, "--num_activations", "2048", "--batch_size", "128", "--expansion_factor", "2"]
    run("-m", "scripts.sae_train", "--checkpoint", "base_checkpoints/d2", "--layer", "1", *small)
    cfg = json.loads((checkout / "sae_outputs" / "layer_1" / "best_model" / "cfg.json").read_text())
    assert cfg["model_name"] == "nanochat-d2-step7" and cfg["context_size"] == 64
    assert "nanochat base_train ran" in run("-m", "scripts.base_train").stdout  # nanochat's scripts still run
    run("-m", "scripts.sae_eval", "--sae_path", "sae_outputs/layer_1/best_model", "--checkpoint",
        "base_checkpoints/d2", "--num_tokens", "512", "--loss_batches", "1", "--device", "cpu")
    assert (checkout / "sae_eval" / "layer_1" / "eval_metrics.json").is_file()
    run("-m", "scripts.sae_viz", "--sae_path", "sae_outputs/layer_1/best_model", "--checkpoint",
        "base_checkpoints/d2", "--num_tokens", "512", "--top", "3", "--device", "cpu")
    assert (checkout / "sae_viz" / "layer_1" / "dashboard" / "index.html").is_file()
    # The console command: -P keeps the current directory off sys.path, as an entry-point script has it.
    run("-m", "fastsae.cli", "train", "--checkpoint", "base_checkpoints/d2", "--layer", "0", "--hook_type",
        "mlp_hidden", *small, python_flags=["-P"])
    hidden = load_sae(checkout / "sae_outputs" / "layer_0" / "best_model")
    assert hidden.config.hook_point == "blocks.0.hook_mlp_hidden" and hidden.d_in == 64


def test_eval_of_a_trained_sae_is_held_out_by_default(tmp_path, capsys):
    """fastsae train records its corpus and token count; fastsae eval on the same text skips
    those tokens (the loss-recovered batches too) unless --skip_tokens says otherwise."""
    from fastsae.corpus import iter_token_batches, load_text_corpus
    from fastsae.io import load_sae

    ckpt = tmp_path / "d2"
    _nanochat_checkpoint(ckpt)
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i}: " + "some words here " * (1 + i % 9)}) + "\n"
                              for i in range(300)))
    with stubs_on_path():  # fastsae train and eval import nanochat to load the checkpoint
        out = tmp_path / "out"
        assert main(["train", "--checkpoint", str(ckpt), "--layer", "1", "--corpus", str(corpus), "--output_dir",
                     str(out), *SMALL, "--num_activations", "2048", "--batch_size", "128"]) == 0
        sae_path = out / "layer_1" / "best_model"
        meta = load_sae(sae_path).metadata
        assert meta["num_tokens_collected"] >= 2048 and meta["corpus"]["name"] == "docs.jsonl"
        common = ["eval", "--sae_path", str(sae_path), "--checkpoint", str(ckpt), "--texts", str(corpus),
                  "--num_tokens", "512", "--loss_batches", "1", "--device", "cpu", "--context_length", "64"]
        capsys.readouterr()
        assert main([*common, "--output_dir", str(tmp_path / "held")]) == 0
        err = capsys.readouterr().err
        assert f"held out: past the first {meta['num_tokens_collected']} tokens" in err
        assert main([*common, "--output_dir", str(tmp_path / "start"), "--skip_tokens", "0"]) == 0
        assert "from token 0 (--skip_tokens)" in capsys.readouterr().err
    held = json.loads((tmp_path / "held" / "layer_1" / "eval_metrics.json").read_text())
    start = json.loads((tmp_path / "start" / "layer_1" / "eval_metrics.json").read_text())
    assert held["fvu"] != start["fvu"]  # other tokens

    ByteTokenizer = nanochat("tokenizer").ByteTokenizer
    texts = load_text_corpus(corpus)
    everything = [b for b in iter_token_batches(ByteTokenizer(), texts, 64, 1)]
    skipped = list(iter_token_batches(ByteTokenizer(), texts, 64, 1, skip_tokens=100))
    sizes = [int(b.attention_mask.sum()) for b in everything]
    first_kept = next(i for i in range(len(sizes)) if sum(sizes[:i]) >= 100)
    assert torch.equal(skipped[0].input_ids, everything[first_kept].input_ids)
    assert len(skipped) == len(everything) - first_kept
