"""Checkpoints: atomic, checksummed writes, keep-last-K, run-folder hygiene, safetensors export.

Layout inside a run folder::

    checkpoints/step_00000200.pt   model, optimizer, schedule, step, RNG states, sampler, config, checksum
    checkpoints/step_00000400/     the same as a sharded torch.distributed.checkpoint folder
                                   (several processes; see training/checkpoint/sharded.py)
    checkpoints/latest             the name of the newest complete checkpoint (written last)

A checkpoint is written to a temporary file, fsynced and renamed, then ``latest`` is updated the
same way, so a crash at any moment leaves the previous checkpoint intact and pointed to. Reading
is in ``load.py`` (re-exported here): weights-only, checksum-verified, never runs code.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.checkpoint import faults, integrity
from training.checkpoint.load import (  # noqa: F401  (re-exported: the loader lives in load.py)
    CHECKPOINT_DIR,
    FORMAT_VERSION,
    LATEST,
    check_model_config,
    checkpoint_dir,
    checkpoint_to_resume,
    find_resume_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_latest,
    step_of,
)
from training.errors import CheckpointError

TMP_MARK = ".tmp-"


def _atomic_write(path: Path, write) -> None:
    """Write through a fresh temp file (never through a planted link), fsync, rename over ``path``."""
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        faults.point("atomic_write:before_rename")
        os.replace(tmp, path)  # replaces a link at ``path`` itself, never writes through it
        faults.point("atomic_write:after_rename")
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def write_failed(path: Path, error: OSError, run_dir: str | Path) -> CheckpointError:
    """A disk-full / permission error while writing ``path`` → a message naming it and what was kept."""
    kept = read_latest(run_dir)
    kept_text = (
        f"the previous checkpoint {kept} is intact and still named by latest"
        if kept and kept.exists()
        else "no earlier checkpoint exists"
    )
    reason = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EACCES: "permission denied",
        errno.EROFS: "the file system is read-only",
        errno.EPERM: "operation not permitted",
    }.get(error.errno, error.strerror or type(error).__name__)
    return CheckpointError(
        f"cannot write checkpoint {path}: {reason} ({type(error).__name__}: {error}); {kept_text}. "
        "Free space or fix permissions, then rerun the same command to resume."
    )


def checkpoint_folder(run_dir: str | Path) -> Path:
    """``run_dir/checkpoints``, created; refused if it is a symbolic link (outputs never go through links)."""
    folder = checkpoint_dir(run_dir)
    if folder.is_symlink():
        raise CheckpointError(
            f"{folder} is a symbolic link (to {os.readlink(folder)}); checkpoints are never written "
            "through links. Remove it, or put the whole run_dir on the other disk."
        )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write ``state`` (checksummed) as the checkpoint for ``step``, point ``latest`` at it, prune to ``keep_last``."""
    path = checkpoint_dir(run_dir) / f"step_{step:08d}.pt"
    payload = integrity.with_checksum({"format_version": FORMAT_VERSION, "step": step, **state})
    try:
        checkpoint_folder(run_dir)
        _atomic_write(path, lambda f: torch.save(payload, f))
    except OSError as e:
        raise write_failed(path, e, run_dir) from e
    point_latest_and_prune(run_dir, path, keep_last)
    return path


def point_latest_and_prune(run_dir: str | Path, path: Path, keep_last: int) -> None:
    """Point ``latest`` at a checkpoint that is complete on disk, then prune; ``path`` itself is never pruned.

    Kept: ``path`` and the newest ``keep_last - 1`` older ones. Checkpoints with a *higher* step than
    ``path`` belong to an abandoned continuation (the run resumed from an earlier one because they
    were unusable, or from an explicit older path) and are removed, so a fallback never picks them.
    """
    pointer = checkpoint_dir(run_dir) / LATEST
    try:
        _atomic_write(pointer, lambda f: f.write(path.name.encode()))
    except OSError as e:
        raise write_failed(pointer, e, run_dir) from e
    faults.point("prune:before")
    head = step_of(path)
    others = [p for p in list_checkpoints(run_dir) if p.name != path.name]
    older = [p for p in others if step_of(p) < head]
    keep = set(older[-(keep_last - 1) :]) if keep_last > 1 else set()
    for old in others:
        if old in keep:
            continue
        if step_of(old) > head:
            warnings.warn(f"removing {old}: it is newer than {path.name}, which this run continued from", stacklevel=2)
        remove_checkpoint(old)
        faults.point("prune:after_one")


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint so that a crash midway never leaves half of one: a folder is first renamed
    (atomically) to a temp name that :func:`sweep_stale` finishes removing at the next start."""
    if path.is_dir() and not path.is_symlink():
        doomed = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
        if doomed.exists():
            shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        faults.point("remove:renamed")
        shutil.rmtree(doomed, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sweep_stale(run_dir: str | Path) -> list[Path]:
    """Remove what interrupted writes left behind; returns what was removed.

    Temp files of dead processes (``.<name>.tmp-<pid>``) in the run folder and in ``checkpoints/``,
    and sharded folders whose save died before DCP wrote ``.metadata``.
    """
    removed = []
    for folder in (Path(run_dir), checkpoint_dir(run_dir)):
        if not folder.is_dir() or folder.is_symlink():
            continue
        for p in folder.iterdir():
            pid = p.name.rpartition(TMP_MARK)[2]
            if p.name.startswith(".") and TMP_MARK in p.name and pid.isdigit() and not _alive(int(pid)):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
            elif (
                folder.name == CHECKPOINT_DIR
                and p.is_dir()
                and not p.is_symlink()
                and p.name.startswith("step_")
                and not (p / integrity.MANIFEST).exists()
                and not (p / ".metadata").exists()
            ):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own pid in a stale name: a previous process that had the same pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def discard_all(run_dir: str | Path) -> Path | None:
    """``trainer.resume=restart``: move every checkpoint and ``latest`` to ``checkpoints/discarded/<n>/``."""
    found = list_checkpoints(run_dir)
    pointer = checkpoint_dir(run_dir) / LATEST
    if not found and not pointer.exists():
        return None
    base = checkpoint_dir(run_dir) / "discarded"
    n = 0
    while (base / str(n)).exists():
        n += 1
    target = base / str(n)
    target.mkdir(parents=True)
    for p in [*found, pointer] if pointer.exists() or pointer.is_symlink() else found:
        os.replace(p, target / p.name)
    return target


def replace_link(path: Path, keep_content: bool = False) -> None:
    """If ``path`` is a symbolic link, replace it by a regular file (warning), optionally with the target's bytes."""
    if not path.is_symlink():
        return
    target = os.readlink(path)
    content = None
    if keep_content:
        try:
            content = path.read_bytes()
        except OSError:
            content = None
    path.unlink()
    if content is not None:
        path.write_bytes(content)
    warnings.warn(
        f"{path} was a symbolic link (to {target}); replaced it by a regular file: outputs of a run are "
        "never written through links",
        stacklevel=2,
    )


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
    replace_link(path)
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
