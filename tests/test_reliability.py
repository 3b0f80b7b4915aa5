"""Nothing lost on a kill, no silent wrong answers, files consistent under concurrency.

The crash checks run a real ``fastsae train`` process and kill it (SIGKILL, SIGTERM, a file
size limit standing in for a full disk); the rest call the API and the CLI directly.
"""
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastsae.cli import main
from fastsae.config import SAEConfig
from fastsae.files import DirectoryLock, atomic_write_text
from fastsae.io import load_sae, load_saes, save_sae
from fastsae.models import create_sae
from fastsae.trainer import SAETrainer

REPO = Path(__file__).resolve().parents[1]
STUBS = REPO / "tests" / "stubs"
# 2048 training rows of width 32, 16 steps an epoch: a few hundred steps take seconds.
TRAIN = ["--batch_size", "128", "--num_epochs", "40", "--expansion_factor", "4", "--k", "4", "--device", "cpu",
         "--quiet", "--val_split", "0.2"]


def train_process(stub_store, out, *extra, **popen):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "fastsae.cli", "train", "--layer", "1", "--activations", str(stub_store),
           "--output_dir", str(out), *TRAIN, *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def wait_for_checkpoint(out: Path, proc, timeout=120) -> None:
    deadline = time.time() + timeout
    while not list((out / "layer_1" / "checkpoints").glob("step_*")):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


def final_weights(out: Path) -> dict:
    return load_file(str(out / "layer_1" / "final_model" / "sae_weights.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(stub_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    proc = train_process(stub_store, out, "--max_steps", "400", "--save_every", "1000")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out


def checkpoint_state(out: Path, step: int) -> dict:
    return load_file(str(out / "layer_1" / "checkpoints" / f"step_{step}" / "state.safetensors"))


def assert_same_run(out: Path, reference: Path, step: int = 400) -> None:
    mine, theirs = checkpoint_state(out, step), checkpoint_state(reference, step)
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name
    steps = [r["step"] for r in map(json.loads, (out / "layer_1" / "metrics.jsonl").read_text().splitlines())
             if "fvu" in r]
    assert steps == sorted(set(steps)) and steps[-1] == step  # no step twice, none torn


def test_sigkill_then_resume_follows_the_uninterrupted_run(stub_store, uninterrupted, tmp_path):
    out = tmp_path / "run"
    proc = train_process(stub_store, out, "--max_steps", "400", "--save_every", "40")
    wait_for_checkpoint(out, proc)
    proc.kill()
    proc.wait()
    metrics = out / "layer_1" / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 3, "fv')  # the torn last line a kill can leave
    resumed = train_process(stub_store, out, "--max_steps", "400", "--save_every", "40", "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert_same_run(out, uninterrupted)


def test_sigterm_saves_a_checkpoint_at_a_step_boundary(stub_store, uninterrupted, tmp_path):
    out = tmp_path / "run"
    proc = train_process(stub_store, out, "--max_steps", "400", "--save_every", "10")
    wait_for_checkpoint(out, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped by signal SIGTERM" in err and "--resume" in err and "Traceback" not in err
    latest = max((out / "layer_1" / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))
    assert json.loads((latest / "trainer_state.json").read_text())["step"] == int(latest.name[5:]) < 400
    resumed = train_process(stub_store, out, "--max_steps", "400", "--save_every", "10", "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert_same_run(out, uninterrupted)


def test_full_disk_is_one_line_and_leaves_no_temporary_files(stub_store, tmp_path):
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    out = tmp_path / "run"
    proc = train_process(stub_store, out, "--max_steps", "20", "--save_every", "10", preexec_fn=limit_file_size)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert err.count("\n") == 1 and "fastsae train: error: could not save the step 10 checkpoint" in err
    assert "File too large" in err and "none was saved" in err
    left = [p.name for p in (out / "layer_1").rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.name]
    assert left == []


def test_resume_with_other_settings_is_refused(stub_store, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--layer", "1", "--activations", str(stub_store), "--output_dir", str(out), *TRAIN,
            "--max_steps", "3"]
    assert main(args) == 0
    changed = [*args, "--resume", "--k", "8", "--learning_rate", "1e-2", "--seed", "5"]
    assert main(changed) == 1
    err = capsys.readouterr().err
    assert "cannot resume" in err and "k: 4 -> 8" in err and "learning_rate: None -> 0.01" in err
    assert "seed: 0 -> 5" in err


def test_a_second_run_into_a_locked_folder_is_refused(stub_store, tmp_path, capsys):
    out = tmp_path / "run"
    with DirectoryLock(out / "layer_1", "fastsae train"):
        args = ["train", "--layer", "1", "--activations", str(stub_store), "--output_dir", str(out), *TRAIN]
        assert main(args) == 1
    err = capsys.readouterr().err
    assert f"{out / 'layer_1'} is in use by fastsae train (pid {os.getpid()})" in err
    assert not (out / "layer_1" / "metrics.jsonl").exists()


def test_resume_of_a_finished_run_says_so(stub_store, tmp_path, capsys):
    args = ["train", "--layer", "1", "--activations", str(stub_store), "--output_dir", str(tmp_path), *TRAIN,
            "--num_epochs", "1"]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    assert "already complete (step 16 of 16)" in capsys.readouterr().out


# ----------------------------------------------------------------------------- bad values

@pytest.mark.parametrize("argv,message", [
    (["train", "--layer", "1", "--num_epochs", "0"],
     "argument --num_epochs/--num-epochs: expected an integer >= 1, got '0'"),
    (["train", "--layer", "1", "--num_epochs", "-1"], "expected an integer >= 1, got '-1'"),
    (["train", "--layer", "1", "--batch_size", "-5"], "argument --batch_size/--batch-size: expected an integer >= 1"),
    (["train", "--layer", "1", "--max_steps", "0"], "argument --max_steps/--max-steps: expected an integer >= 1"),
    (["train", "--layer", "1", "--val_split", "2"], "argument --val_split/--val-split: expected a number in [0, 1)"),
    (["train", "--layer", "1", "--val_split", "-1"], "expected a number in [0, 1), got '-1'"),
    (["train", "--layer", "1", "--l1_coefficient", "-1"], "expected a number >= 0.0, got '-1'"),
    (["train", "--layer", "1", "--save_every", "0"], "expected an integer >= 1, got '0'"),
    (["train", "--layer", "1", "--k", "0"], "argument --k: expected an integer >= 1, got '0'"),
    (["train", "--layer", "1", "--k", "2.5"], "argument --k: expected an integer, got '2.5'"),
    (["train", "--layer", "1", "--learning_rate", "nan"], "expected a finite number, got 'nan'"),
    (["viz", "--sae_path", "x", "--top", "-3"], "argument --top: expected an integer >= 1, got '-3'"),
    (["demo", "--tokens", "0"], "expected an integer >= 1, got '0'"),
    (["eval", "--sae_dir", "x", "--num_tokens", "0"], "expected an integer >= 1, got '0'"),
])
def test_bad_numbers_are_one_argparse_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_k_above_the_width_fails_before_collection(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "--layer", "1", "--k", "99999", "--output_dir", str(out), "--quiet"]) == 1
    assert "k must be in [1, d_sae=3072], got 99999" in capsys.readouterr().err
    assert not out.exists()  # nothing collected, no empty folder left


@pytest.mark.parametrize("argv,message", [
    (["demo", "--layer", "9"], "layer must be in [0, 6)"),
    (["demo", "--k", "99999"], "k must be in [1, d_sae=3072], got 99999"),
])
def test_demo_mistakes_are_one_line(argv, message, tmp_path, capsys):
    assert main([*argv, "--output_dir", str(tmp_path / "demo")]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_one_absurd_row_stops_training_with_an_error(one_thread):
    torch.manual_seed(0)
    x = torch.randn(2048, 16)
    x[5] = 1e19
    config = SAEConfig(d_in=16, expansion_factor=2, k=4, batch_size=256, num_epochs=1, dtype="float32")
    trainer = SAETrainer(create_sae(config), config, x, device="cpu")
    with pytest.raises(FloatingPointError, match="the loss became NaN or Inf"):
        trainer.train(verbose=False)
    assert 0.5 < trainer.scale < 2  # the other rows still set the scale (1.0 for unit Gaussians)


def test_inf_in_validation_rows_is_an_error_and_no_best_model(tmp_path, one_thread):
    torch.manual_seed(0)
    x, val = torch.randn(1024, 16), torch.randn(256, 16)
    val[7, 3] = float("inf")
    config = SAEConfig(d_in=16, expansion_factor=2, k=4, batch_size=256, num_epochs=1, dtype="float32")
    trainer = SAETrainer(create_sae(config), config, x, val, device="cpu", save_dir=tmp_path)
    with pytest.raises(FloatingPointError, match="validation activations contain NaN or Inf"):
        trainer.train(verbose=False)
    assert not (tmp_path / "best_model").exists()


def test_evaluate_after_train_measures_the_raw_space_sae(one_thread):
    torch.manual_seed(0)
    x, val = torch.randn(2048, 16) * 7.0, torch.randn(512, 16) * 7.0
    config = SAEConfig(d_in=16, expansion_factor=2, k=4, batch_size=256, num_epochs=2, dtype="float32")
    trainer = SAETrainer(create_sae(config), config, x, val, device="cpu", log_every=1000)
    trainer.train(verbose=False)
    after = trainer.evaluate()
    with torch.no_grad():
        raw = trainer.sae.loss(val)["reconstruction"]
    truth = float((raw - val).pow(2).sum() / (val - val.mean(0)).pow(2).sum())
    assert after == pytest.approx(truth, rel=1e-4)
    assert after == pytest.approx(trainer.best_val_fvu, rel=1e-4)  # the last eval was at the last step


def test_non_finite_weights_are_never_saved(tmp_path):
    sae = create_sae(SAEConfig(d_in=8, expansion_factor=2, k=2))
    with torch.no_grad():
        sae.W_dec[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"weights \['W_dec'\] contain NaN or Inf"):
        save_sae(sae, save_path=tmp_path / "sae")
    assert not (tmp_path / "sae").exists()


# ----------------------------------------------------------------------------- files on disk

def saved_cfg(tmp_path):
    path = save_sae(create_sae(SAEConfig(d_in=8, expansion_factor=2, k=2)), save_path=tmp_path / "sae")
    return path, json.loads((path / "cfg.json").read_text())


def _with_config(cfg, **changes):
    return {**cfg, "fastsae": {**cfg["fastsae"], "config": {**cfg["fastsae"]["config"], **changes}}}


@pytest.mark.parametrize("edit,message", [
    (lambda cfg: [1, 2], "expected a JSON object, got list"),
    (lambda cfg: None, "expected a JSON object, got NoneType"),
    (lambda cfg: _with_config(cfg, k="16"), "k must be an integer >= 1, got '16'"),
    (lambda cfg: {k: v for k, v in cfg.items() if k not in ("fastsae", "d_in")}, "the field 'd_in' is missing"),
    (lambda cfg: {**{k: v for k, v in cfg.items() if k != "fastsae"}, "k": 0}, "k must be an integer >= 1, got 0"),
    (lambda cfg: _with_config(cfg, hook_point=5), "hook_point must be a dotted module name"),
    (lambda cfg: _with_config(cfg, hook_point=".."), "hook_point must be a dotted module name"),
    (lambda cfg: _with_config(cfg, d_sae=1_000_000), r"weight W_enc has shape \(8, 16\), expected \(8, 1000000\)"),
])
def test_bad_cfg_json_is_a_one_line_error(edit, message, tmp_path):
    path, cfg = saved_cfg(tmp_path)
    (path / "cfg.json").write_text(json.dumps(edit(cfg)))
    with pytest.raises(ValueError, match=message) as info:
        load_sae(path)
    assert "\n" not in str(info.value)


def test_one_broken_sae_does_not_hide_the_others(tmp_path):
    for layer, k in ((0, 2), (1, 3)):
        config = SAEConfig(d_in=8, expansion_factor=2, k=k, hook_point=f"blocks.{layer}.hook_resid_post")
        save_sae(create_sae(config), save_path=tmp_path / f"layer_{layer}" / "best_model")
    (tmp_path / "layer_1" / "best_model" / "cfg.json").write_text("[]")
    with pytest.warns(UserWarning, match="skipped .*layer_1.*expected a JSON object"):
        saes = load_saes(tmp_path)
    assert list(saes) == ["blocks.0.hook_resid_post"]


def test_store_with_a_path_like_hook_point_is_refused(stub_store, tmp_path):
    import shutil

    from fastsae.store import ActivationStore

    copy = tmp_path / "acts"
    shutil.copytree(stub_store, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "hook_point": ".."}))
    with pytest.raises(ValueError, match="manifest.json: hook_point must be a dotted module name"):
        ActivationStore(copy)


WRITER = """
import sys, torch
from fastsae.config import SAEConfig
from fastsae.io import save_sae
from fastsae.models import create_sae
saes = []
for k, fill in ((2, 1.0), (3, 2.0)):
    sae = create_sae(SAEConfig(d_in=64, expansion_factor=16, k=k))
    with torch.no_grad():
        sae.W_dec.fill_(fill)
    saes.append(sae)
for i in range(int(sys.argv[2])):
    save_sae(saes[i % 2], save_path=sys.argv[1])
"""


def test_a_reader_never_mixes_two_saves(tmp_path):
    """One process saves two different SAEs into one folder in turn; every load sees one of
    them whole: k=2 with W_dec all 1, or k=3 with W_dec all 2."""
    folder = tmp_path / "sae"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", WRITER, str(folder), "1"], env=env, check=True)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(folder), "400"], env=env)
    seen = set()
    try:
        while writer.poll() is None:
            sae = load_sae(folder)
            fill = float(sae.W_dec[0, 0].detach())
            assert (sae.config.k, fill) in ((2, 1.0), (3, 2.0))
            assert bool((sae.W_dec == fill).all())
            seen.add(sae.config.k)
    finally:
        writer.wait()
    assert writer.returncode == 0
    assert seen == {2, 3}  # the reader did overlap the writer


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_follow_the_umask(umask, mode, tmp_path):
    before = os.umask(umask)
    try:
        path = atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(before)
    assert path.stat().st_mode & 0o777 == mode


def test_pickled_hugging_face_weights_are_refused_in_one_line(tmp_path):
    from fastsae.sources import load_hf_model

    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ValueError, match=r"holds only pickled weights \(pytorch_model.bin\); fastsae loads "
                                         "safetensors weights only"):
        load_hf_model(tmp_path)


def test_a_binary_corpus_file_is_named(tmp_path):
    from fastsae.corpus import load_text_corpus

    bad = tmp_path / "data.txt"
    bad.write_bytes(b"hello \xff\xfe\x00 binary")
    with pytest.raises(ValueError, match=f"corpus file {bad} is not UTF-8 text"):
        load_text_corpus(bad)
