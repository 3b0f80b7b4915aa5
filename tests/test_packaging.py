"""The checkout's top-level kernels/ folder never shadows Hugging Face's ``kernels`` package."""
import importlib.machinery
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_kernels_from_the_checkout_root_is_the_installed_package():
    # `python -m ...` from the root puts the root first on sys.path, as `python -m pytest` does.
    installed = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if Path(p or ".").resolve() != ROOT])
    out = subprocess.run(
        [sys.executable, "-c", "import kernels, fastsae.kernels as f; print(kernels.__file__); print(f.__file__)"],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    expected = installed.origin if installed is not None else str(ROOT / "kernels" / "__init__.py")
    assert Path(out[0]).resolve() == Path(expected).resolve()
    assert Path(out[1]).resolve() == ROOT / "kernels" / "__init__.py"


def test_transformers_imports_its_hub_kernels_from_the_checkout_root():
    # transformers >= 5 imports `kernels` while loading any model class.
    result = subprocess.run([sys.executable, "-c", "import transformers.modeling_utils"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
