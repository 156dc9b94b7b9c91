"""The one checkpoint loader: resume, evaluation, sampling, export, consolidation and merging all read here.

What it guarantees, for a single ``step_XXXXXXXX.pt`` file and for a sharded (DCP) folder alike:

- nothing is unpickled with arbitrary globals: ``.pt`` files and ``extra.pt`` load with
  ``torch.load(weights_only=True)``, DCP ``.metadata`` through an allowlist unpickler and DCP
  items through a weights-only planner (``safe_pickle.py``);
- every byte that is used is verified against the checksum written with it (``integrity.py``);
- a failure raises :class:`CheckpointError` naming the file and what is wrong with it.

Resume discovery (``trainer.resume=auto``) tries the checkpoint ``latest`` names, then every other
one newest-first; if there are checkpoints but none is usable it stops and names each of them
(``trainer.resume=restart`` starts again from step 0, moving them aside).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from training.checkpoint import integrity
from training.checkpoint.safe_pickle import METADATA, dcp_load, read_metadata
from training.errors import CheckpointError, IncompleteCheckpointError

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
EXTRA = "extra.pt"
FORMAT_VERSION = 2  # 2: content checksums (single file) and manifest.json (sharded folders)
_NAME = re.compile(r"^step_(\d{8,})(\.pt)?$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def step_of(path: Path) -> int:
    match = _NAME.match(Path(path).name)
    if not match:
        raise ValueError(f"{path} is not named step_XXXXXXXX[.pt]")
    return int(match.group(1))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints (files and sharded folders) in ``run_dir``, oldest first (by step number)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def read_latest(run_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names, or None (missing); a garbage pointer is reported and ignored."""
    pointer = checkpoint_dir(run_dir) / LATEST
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        warnings.warn(
            f"ignoring {pointer}: not a readable UTF-8 checkpoint name ({type(e).__name__}); "
            "trying every checkpoint newest-first",
            stacklevel=3,
        )
        return None
    if not _NAME.match(name):
        warnings.warn(
            f"ignoring {pointer}: {name[:80]!r} is not a checkpoint name; trying every checkpoint newest-first",
            stacklevel=3,
        )
        return None
    return checkpoint_dir(run_dir) / name


# ----------------------------------------------------------------------------- one checkpoint
def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and verify one checkpoint. Truncated/corrupt/foreign/tampered files raise CheckpointError.

    For a sharded (DCP) folder this returns its ``extra.pt`` (step, sampler, RNG, config) with
    ``"sharded": path``, after verifying every file of the folder and parsing its metadata safely;
    the tensors are read later (:func:`load_model_weights`, ``sharded.load_dcp``).
    """
    path = Path(path)
    if path.is_dir():
        return _load_folder(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    state = _torch_load(path)
    if not isinstance(state, dict) or state.get("format_version") not in (1, FORMAT_VERSION) or "model" not in state:
        raise CheckpointError(
            f"checkpoint {path} is not a checkpoint of this framework (format_version != {FORMAT_VERSION})"
        )
    if state["format_version"] == 1:
        warnings.warn(f"checkpoint {path} predates checksums (format_version 1): it is loaded unverified", stacklevel=2)
        return state
    return integrity.verify_content(state, path)


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip errors, refused globals, EOF: all mean "not a usable checkpoint"
        raise CheckpointError(
            f"checkpoint {path} is unreadable (truncated or corrupt; "
            f"{type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from e


def _load_folder(path: Path) -> dict[str, Any]:
    manifest = integrity.verify_folder(path, required=(METADATA, EXTRA))
    metadata = read_metadata(path)
    unlisted = sorted({info.relative_path for info in metadata.storage_data.values()} - set(manifest["files"]))
    if unlisted:
        raise CheckpointError(
            f"checkpoint file {path / METADATA} references {unlisted}, which {path / integrity.MANIFEST} does not cover"
        )
    extra = _torch_load(path / EXTRA)
    if not isinstance(extra, dict) or extra.get("format_version") != FORMAT_VERSION or "step" not in extra:
        raise CheckpointError(
            f"checkpoint file {path / EXTRA} is not a checkpoint of this framework (format_version != {FORMAT_VERSION})"
        )
    return {**extra, "sharded": path}


def load_model_weights(state: dict[str, Any], model: torch.nn.Module) -> None:
    """A loaded checkpoint's model weights into an unsharded model (evaluation, export, merging)."""
    if "sharded" not in state:
        model.load_state_dict(state["model"])
        return
    import torch.distributed as dist

    model_sd = model.state_dict()
    dcp_load({"model": model_sd}, state["sharded"], no_dist=not (dist.is_available() and dist.is_initialized()))
    model.load_state_dict(model_sd)


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


# ----------------------------------------------------------------------------- discovery
class NoUsableCheckpointError(CheckpointError):
    """A run folder has checkpoints and none of them can be used."""


def find_resume_checkpoint(run_dir: str | Path, model_config: dict | None = None) -> tuple[Path, dict] | None:
    """The newest usable checkpoint in ``run_dir``, or None if there is none at all.

    Tries the one named by ``latest`` first, then every other checkpoint newest-first; an unusable one
    is reported and skipped. If every checkpoint is unusable this raises NoUsableCheckpointError
    naming each; a sharded save that never finished (no manifest) is skipped and counts as absent.
    A config mismatch raises at once (every checkpoint of the run would share it).
    """
    candidates = list(reversed(list_checkpoints(run_dir)))
    named = read_latest(run_dir)
    if named is not None and named in candidates:
        candidates.remove(named)
        candidates.insert(0, named)
    elif named is not None:
        warnings.warn(
            f"{checkpoint_dir(run_dir) / LATEST} names {named.name}, which does not exist; "
            "trying every checkpoint newest-first",
            stacklevel=2,
        )
    failures = []
    for path in candidates:
        try:
            state = load_checkpoint(path)
        except IncompleteCheckpointError as e:  # an interrupted save: never a checkpoint, not a failure
            warnings.warn(f"skipping {e}", stacklevel=2)
            continue
        except CheckpointError as e:
            warnings.warn(f"skipping {e}; trying the previous checkpoint", stacklevel=2)
            failures.append(str(e))
            continue
        if model_config is not None:
            check_model_config(state, model_config, path)
        return path, state
    if failures:
        listed = "\n  ".join(failures)
        raise NoUsableCheckpointError(
            f"no usable checkpoint in {checkpoint_dir(run_dir)}; every one failed:\n  {listed}\n"
            "Nothing was changed. Continue from a copy you trust with trainer.resume=<path>, or start again from "
            "step 0 with trainer.resume=restart (moves these to checkpoints/discarded/)."
        )
    return None


def checkpoint_to_resume(run_dir: str | Path, mode: str, model_config: dict) -> tuple[Path, dict] | None:
    """What ``trainer.resume`` (auto | none | restart | a path) asks to continue from, checked against the config."""
    if mode == "none":
        if list_checkpoints(run_dir):
            raise CheckpointError(
                f"{run_dir} already holds checkpoints; continue it with trainer.resume=auto, "
                "or start fresh in a new run_dir (nothing was overwritten)"
            )
        return None
    if mode == "restart":
        return None
    if mode == "auto":
        return find_resume_checkpoint(run_dir, model_config)
    state = load_checkpoint(mode)
    check_model_config(state, model_config, mode)
    return Path(mode), state


def resolve_target(target: str | Path) -> tuple[Path, dict]:
    """(checkpoint path, loaded state) for a run folder, its ``checkpoints/`` folder, a ``.pt`` file or a DCP folder."""
    target = Path(target)
    if not target.exists():
        raise CheckpointError(
            f"{target} does not exist (give a run folder, a step_XXXXXXXX.pt file or a sharded step_XXXXXXXX folder)"
        )
    is_run = target.is_dir() and not _NAME.match(target.name) and not (target / METADATA).exists()
    if not is_run:
        return target, load_checkpoint(target)
    run_dir = target.parent if target.name == CHECKPOINT_DIR else target
    found = find_resume_checkpoint(run_dir)
    if found is None:
        raise CheckpointError(f"no checkpoint in {checkpoint_dir(run_dir)}")
    return found
