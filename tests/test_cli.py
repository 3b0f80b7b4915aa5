"""The fastsae command: --version and info."""
import shutil
import subprocess
import sys
from pathlib import Path

import fastsae
from fastsae.cli import main


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert capsys.readouterr().out.strip() == f"fastsae {fastsae.__version__}"


def test_info_reports_versions_and_backends(capsys):
    import torch
    assert main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"torch    {torch.__version__}" in out
    assert "backend  topk_encode        torch" in out
    assert "backend  gated_encode       torch" in out
    assert "encoder  relu, jumprelu, gated" in out and "float32" in out
    assert "encoder  topk, batchtopk" in out and ("bfloat16" in out or "no bf16 unit" in out)
    assert "encoder  topk runtime, one row" in out and "float16 torch.mv" in out


def test_console_script_is_installed():
    exe = shutil.which("fastsae") or str(Path(sys.executable).parent / "fastsae")
    out = subprocess.run([exe, "info"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith(f"fastsae  {fastsae.__version__}")
