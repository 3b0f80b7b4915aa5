"""One CLI vocabulary: both spellings and the old names everywhere, defaults in every --help,
status lines instead of bars in a log, --quiet for silence."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastsae.cli import build_parser

REPO = Path(__file__).resolve().parents[1]


def parse(argv):
    return build_parser().parse_args(argv)


@pytest.mark.parametrize("spelling", ["--output_dir", "--output-dir"])
@pytest.mark.parametrize("command", [["train", "--layer", "1"], ["eval", "--sae_dir", "s"], ["viz", "--sae_path", "s"],
                                     ["demo"]])
def test_every_command_takes_both_spellings(command, spelling):
    assert parse([*command, spelling, "here"]).output_dir == "here"


@pytest.mark.parametrize("flag", ["--num_activations", "--num-activations", "--num_tokens", "--num-tokens", "--tokens"])
def test_token_budget_has_one_set_of_names(flag):
    assert parse(["train", "--layer", "1", flag, "5000"]).num_activations == 5000
    assert parse(["eval", "--sae_dir", "s", flag, "5000"]).num_tokens == 5000
    assert parse(["demo", flag, "5000"]).max_tokens == 5000


@pytest.mark.parametrize("flag", ["--expansion_factor", "--expansion-factor", "--width"])
def test_width_names(flag):
    assert parse(["train", "--layer", "1", flag, "4"]).expansion_factor == 4
    assert parse(["demo", flag, "4"]).expansion_factor == 4


@pytest.mark.parametrize("name,kind", [("resid_pre", "resid_pre"), ("resid_post", "resid_post"),
                                       ("attn_out", "attn_out"), ("mlp_out", "mlp_out"),
                                       ("mlp_hidden", "mlp_hidden"), ("attn", "attn_out"), ("mlp", "mlp_out")])
def test_hook_types_are_the_readme_names_with_the_seed_aliases(name, kind):
    from fastsae.cli_train import HOOK_TYPES

    assert HOOK_TYPES[parse(["train", "--layer", "1", "--hook-type", name]).hook_type] == kind


@pytest.mark.parametrize("command", ["train", "eval", "viz", "demo"])
def test_help_shows_defaults(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = capsys.readouterr().out
    assert "(default:" in text
    if command == "train":
        flat = " ".join(text.split())  # as wrapped to the terminal's width
        assert "(default: 4096)" in flat and "(default: resid_post; mlp_in for a transcoder)" in flat


def _train(stub_store, out, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "fastsae.cli", "train", "--layer", "1", "--activations", str(stub_store),
           "--output_dir", str(out), "--batch_size", "256", "--num_epochs", "1", "--expansion_factor", "2", "--k", "4",
           "--device", "cpu", *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


def test_a_log_gets_plain_lines_and_quiet_gets_none(stub_store, tmp_path):
    logged = _train(stub_store, tmp_path / "a").stderr  # stderr is a pipe here, not a terminal
    assert "\r" not in logged
    assert "activations:" in logged and "train SAE: 8/8 (100%) step" in logged
    assert _train(stub_store, tmp_path / "b", "--quiet").stderr == ""


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_on_a_cpu_machine_is_one_plain_note(stub_store, tmp_path, capsys):
    from fastsae.cli import main

    assert main(["train", "--layer", "1", "--activations", str(stub_store), "--output_dir", str(tmp_path),
                 "--batch_size", "256", "--num_epochs", "1", "--k", "4", "--device", "cuda", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "fastsae train: note: device 'cuda' was requested but CUDA is not available; training on CPU" in err
    assert "Warning" not in err and ".py:" not in err
