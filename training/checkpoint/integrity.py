"""Checksums that make a flipped bit in a checkpoint a named error instead of a silent wrong weight.

torch's zip reader does not check CRCs, so corruption in tensor data loads silently. Two kinds:

- single-file ``.pt``: ``payload["checksum"]`` is the SHA-256 of the payload's *content* (every
  tensor's dtype, shape and bytes, every key and plain value, in order), computed before the file
  is written and recomputed after ``torch.load``; the file stays a plain ``torch.load``-able dict.
- sharded folders: ``manifest.json`` (JSON, never unpickled) lists the SHA-256 and size of every
  other file of the folder; it is written last, atomically, so its presence marks a complete save.

SHA-256 runs at about 1–2 GB/s on one core (hashlib); a few-MB checkpoint costs milliseconds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from training.errors import CheckpointError, IncompleteCheckpointError

CHECKSUM_KEY = "checksum"
MANIFEST = "manifest.json"
_CHUNK = 1 << 22


def content_sha256(payload: Any) -> str:
    """SHA-256 over a checkpoint payload's content (tensors by dtype, shape and bytes)."""
    h = hashlib.sha256()
    _feed(h, payload)
    return h.hexdigest()


def _feed(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key, value in obj.items():
            _feed(h, key)
            _feed(h, value)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}".encode())
        for value in obj:
            _feed(h, value)
    else:  # str, int, float, bool, None, torch.Size, dtypes …: their repr is exact
        h.update(f"S{type(obj).__name__}:{obj!r}".encode())


def with_checksum(payload: dict[str, Any]) -> dict[str, Any]:
    return {**payload, CHECKSUM_KEY: content_sha256(payload)}


def verify_content(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """Check and strip ``state``'s content checksum; a mismatch raises CheckpointError naming ``path``."""
    expected = state.pop(CHECKSUM_KEY, None)
    if not isinstance(expected, str):
        raise CheckpointError(
            f"checkpoint {path} carries no content checksum (written by an older version of this "
            "framework, or not by it); it cannot be verified"
        )
    if content_sha256(state) != expected:
        raise CheckpointError(
            f"checkpoint {path} failed its checksum: its content changed after it was written "
            "(a flipped bit or a partial overwrite)"
        )
    return state


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def manifest_of(folder: Path, step: int, format_version: int) -> bytes:
    """``manifest.json`` bytes for every regular file in ``folder`` (except a previous manifest)."""
    files = {
        p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size}
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.is_symlink() and p.name != MANIFEST
    }
    return json.dumps({"format_version": format_version, "step": step, "files": files}, indent=1).encode()


def verify_folder(folder: Path, required: tuple[str, ...]) -> dict[str, Any]:
    """Check every file listed in ``folder/manifest.json`` (size, SHA-256); ``required`` must be listed."""
    path = folder / MANIFEST
    if not path.is_file():
        raise IncompleteCheckpointError(
            f"checkpoint {folder} is incomplete (no {MANIFEST}: the save was interrupted, "
            "or an older version of this framework wrote it)"
        )
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
        files = manifest["files"]
        assert isinstance(files, dict)
    except Exception as e:
        raise CheckpointError(f"checkpoint file {path} is not a valid manifest ({type(e).__name__}: {e})") from e
    for name in required:
        if name not in files:
            raise CheckpointError(f"checkpoint file {path} does not list {name}")
    for name, entry in files.items():
        file = folder / name
        if "/" in name or name in ("", ".", "..") or file.is_symlink() or not file.is_file():
            raise CheckpointError(f"checkpoint file {file} (listed in {path}) is missing or not a regular file")
        if file.stat().st_size != entry.get("bytes") or file_sha256(file) != entry.get("sha256"):
            raise CheckpointError(
                f"checkpoint file {file} failed its checksum (size or SHA-256 differs from {path}): "
                "it changed after it was written"
            )
    return manifest
