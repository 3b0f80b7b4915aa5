"""Atomic file writes: write to a temporary file beside the target, then rename it over.

A reader (or a resumed run) therefore never sees a half-written file, and a failed write
(disk full, a kill) leaves no temporary file behind. Files get the mode a plain ``open``
would give them (0666 less the umask), not mkstemp's 0600. This module imports nothing from
fastsae, so the hooks and the activation store can use it without pulling in the SAE models.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from safetensors.torch import save_file


def current_umask() -> int:
    """The process umask (read by setting it and putting it back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``, so a reader never sees a partial file.

    Any failure of the write (safetensors and matplotlib raise their own types for a full disk)
    becomes an OSError naming ``path``; the temporary file is removed either way.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except Exception as e:
        _remove(tmp)
        if isinstance(e, OSError) and e.filename:
            raise
        raise OSError(f"could not write {path}: {e}") from e
    except BaseException:
        _remove(tmp)
        raise
    return path


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def json_safe(obj):
    """``obj`` with every non-finite float replaced by None: strict JSON has no Infinity or NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(json_safe(obj), indent=2, default=str, allow_nan=False))


def atomic_save_tensors(path: str | Path, tensors: dict, metadata: dict | None = None) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


class DirectoryInUseError(RuntimeError):
    """Another process holds the lock on a directory."""


class DirectoryLock:
    """An exclusive lock on a directory for as long as a run writes into it.

    ``flock`` on ``{path}/.lock``: the operating system releases it when the process exits, a
    ``kill -9`` included, so a stale lock never blocks the next run. The file names the holder.
    """

    def __init__(self, path: str | Path, purpose: str = "a fastsae run"):
        self.path, self.purpose, self._fd = Path(path), purpose, None

    def __enter__(self) -> "DirectoryLock":
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise DirectoryInUseError(f"{self.path} is in use by {holder}; wait for it to finish or "
                                      "choose another output directory") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{self.purpose} (pid {os.getpid()})".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
