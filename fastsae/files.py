"""Atomic file writes: write to a temporary file beside the target, then rename it over.

A reader (or a resumed run) therefore never sees a half-written file. This module imports
nothing from fastsae, so the hooks and the activation store can use it without pulling in
the SAE models.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from safetensors.torch import save_file


def atomic_write(path: str | Path, write) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``, so a reader never sees a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def atomic_save_tensors(path: str | Path, tensors: dict, metadata: dict | None = None) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
