"""Reading safetensors files with errors that name the file and what is wrong."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load as _safetensors_load


class RunFileError(RuntimeError):
    """A file of a recorded run is missing, corrupted or inconsistent."""


def load_tensors(path: str | Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Load a safetensors file, checking its sha256 when the manifest recorded one."""
    path = Path(path)
    if not path.is_file():
        raise RunFileError(f"missing run file: {path}")
    data = path.read_bytes()
    if sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise RunFileError(
                f"corrupted run file: {path} (sha256 {actual[:12]}… does not match the "
                f"manifest's {sha256[:12]}…); re-record the run or restore the file"
            )
    try:
        return _safetensors_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise RunFileError(f"corrupted run file: {path} is not a readable safetensors file ({exc})") from exc
