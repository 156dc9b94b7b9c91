"""Checkpoints: atomic writes, keep-last-K, safe loading, resume discovery, safetensors export.

Layout inside a run folder::

    checkpoints/step_00000200.pt   model, optimizer, schedule, step, RNG states, sampler, config
    checkpoints/step_00000400/     the same as a sharded torch.distributed.checkpoint folder
                                   (several processes; see training/checkpoint/sharded.py)
    checkpoints/latest             the name of the newest complete checkpoint (written last)

A checkpoint is written to a temporary file, fsynced and renamed, then ``latest`` is updated the
same way, so a crash at any moment leaves the previous checkpoint intact and pointed to.
Loading always uses ``torch.load(weights_only=True)``: a checkpoint can never execute code.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.errors import CheckpointError  # noqa: F401  (re-exported: ckpt.CheckpointError)

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
_NAME = re.compile(r"^step_(\d{8,})(\.pt)?$")
FORMAT_VERSION = 1


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write ``state`` as the checkpoint for ``step``, point ``latest`` at it, prune to ``keep_last``."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:08d}.pt"
    payload = {"format_version": FORMAT_VERSION, "step": step, **state}
    _atomic_write(path, lambda f: torch.save(payload, f))
    point_latest_and_prune(run_dir, path, keep_last)
    return path


def point_latest_and_prune(run_dir: str | Path, path: Path, keep_last: int) -> None:
    """Point ``latest`` at a checkpoint that is complete on disk, then keep only the newest ``keep_last``."""
    _atomic_write(checkpoint_dir(run_dir) / LATEST, lambda f: f.write(path.name.encode()))
    for old in list_checkpoints(run_dir)[:-keep_last]:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints (files and sharded folders) in ``run_dir``, oldest first (by step number)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (weights only). Truncated/corrupt/foreign files raise CheckpointError.

    For a sharded (DCP) folder this returns its ``extra.pt`` (step, sampler, RNG, config) with
    ``"sharded": path``; the tensors are read later, straight into the (possibly sharded) model.
    """
    path = Path(path)
    if path.is_dir():
        from training.checkpoint.sharded import read_extra

        return {**read_extra(path), "sharded": path}
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip errors, unpickling errors, EOF: all mean "not a usable checkpoint"
        raise CheckpointError(
            f"checkpoint {path} is unreadable (truncated or corrupt; {type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from e
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not a checkpoint of this framework (format_version != {FORMAT_VERSION})")
    return state


def check_model_config(state: dict, model_config: dict, path: str | Path) -> None:
    """Refuse a checkpoint whose model config differs from the current run's, naming each difference."""
    saved = state.get("config", {}).get("model", {})
    diffs = _diff(saved, model_config)
    if diffs:
        listed = "; ".join(f"model.{k}: checkpoint has {a!r}, config has {b!r}" for k, a, b in diffs[:10])
        raise CheckpointError(f"checkpoint {path} was trained with a different model config: {listed}")


def _diff(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _diff(a.get(key, "<missing>"), b.get(key, "<missing>"), f"{prefix}{key}.")
        return out
    return [] if a == b else [(prefix.rstrip("."), a, b)]


def find_resume_checkpoint(run_dir: str | Path, model_config: dict | None = None) -> tuple[Path, dict] | None:
    """The newest usable checkpoint in ``run_dir``, or None if there is none.

    Tries the file named by ``latest`` first, then every other checkpoint newest-first; an
    unreadable one is reported and skipped, so a crash mid-write falls back to the previous one.
    A config mismatch is not skipped: it raises, since every checkpoint of the run would share it.
    """
    candidates = list(reversed(list_checkpoints(run_dir)))
    pointer = checkpoint_dir(run_dir) / LATEST
    if pointer.is_file():
        named = checkpoint_dir(run_dir) / pointer.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    for path in candidates:
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:
            warnings.warn(f"skipping {e}; trying the previous checkpoint", stacklevel=2)
            continue
        if model_config is not None:
            check_model_config(state, model_config, path)
        return path, state
    return None


def checkpoint_to_resume(run_dir: str | Path, mode: str, model_config: dict) -> tuple[Path, dict] | None:
    """What ``trainer.resume`` (auto | none | a path) asks to continue from, checked against the model config."""
    if mode == "none":
        if list_checkpoints(run_dir):
            raise CheckpointError(
                f"{run_dir} already holds checkpoints; continue it with trainer.resume=auto, "
                "or start fresh in a new run_dir (nothing was overwritten)"
            )
        return None
    if mode == "auto":
        return find_resume_checkpoint(run_dir, model_config)
    state = load_checkpoint(mode)
    check_model_config(state, model_config, mode)
    return Path(mode), state


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states as weights_only-loadable types."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def export_safetensors(model: torch.nn.Module | dict[str, Any], path: str | Path) -> Path:
    """Write a model's (or a full state dict's) tensors as safetensors: tied weights once, extra state left out."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors, seen = {}, set()
    state = model if isinstance(model, dict) else model.state_dict()
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue  # get_extra_state() payloads (schedules etc.) live in the checkpoint only
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if key in seen:
            continue  # a tied weight (e.g. lm_head = embed) is stored once
        seen.add(key)
        tensors[name] = value.detach().contiguous()
    save_file(tensors, str(path))
    return path
