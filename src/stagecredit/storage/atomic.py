"""Atomic file writes: write to a temporary name beside the target, then rename.

A reader never sees a half-written file: either the old content or the new.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save as _safetensors_bytes


def _default_mode() -> int:
    """What ``open()`` would give a new file: 0o666 less the process umask (mkstemp uses 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n")


def atomic_save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor]) -> str:
    """Save tensors as safetensors atomically; return the file's sha256 (hex)."""
    data = _safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()
