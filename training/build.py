"""What every entry point needs before training or loading: the device, seeding, and the model for a config."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from arch.model import LanguageModel
from training.config import ConfigError
from training.config_schema import RootConfig


def resolve_device(name: str, key: str = "trainer.device") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}=cuda but no CUDA device is visible; allowed here: {key}=auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(root: RootConfig, vocab_size: int) -> LanguageModel:
    """The model for a validated config, with the vocabulary filled in from the tokenizer."""
    model_cfg = root.model
    check_vocab(root, vocab_size)
    if model_cfg.vocab_size is None:
        model_cfg.vocab_size = vocab_size
    return LanguageModel(model_cfg)


def check_vocab(root: RootConfig, vocab_size: int) -> None:
    """ConfigError when model.vocab_size cannot hold every id the tokenizer produces."""
    if root.model.vocab_size is not None and root.model.vocab_size < vocab_size:
        raise ConfigError(
            f"model.vocab_size={root.model.vocab_size} is smaller than the tokenizer's {vocab_size} tokens; "
            f"allowed: null (from the tokenizer) or >= {vocab_size}"
        )


def check_model_builds(root: RootConfig) -> None:
    """Build the model on the meta device (no memory, no data: a placeholder vocabulary) so that an
    option only a block's constructor can judge is reported before any data is prepared. Failures
    that are the meta device's, not the config's, are left for the real build. A constructor's
    ValueError / TypeError becomes a ConfigError (the block's message names the option)."""
    try:
        with torch.device("meta"):
            LanguageModel(replace(root.model, vocab_size=root.model.vocab_size or 257))
    except (NotImplementedError, RuntimeError):
        pass
    except ConfigError:
        raise
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise ConfigError(f"model: {e}") from None


def check_runtime(root: RootConfig, world: int = 1) -> None:
    """What the config schema cannot know: the machine, the files named, the process count.

    Called by ``training.cli.preflight`` before Hydra writes the run folder (and again, in part,
    by the Trainer). Raises ConfigError naming the key, the value and what is allowed.
    """
    t = root.trainer
    resolve_device(t.device)
    check_writable_folder("run_dir", root.run_dir)
    check_writable_folder("data.cache_dir", root.data.cache_dir)
    _check_resume(t.resume, root.run_dir)
    if t.batch_size % world:
        raise ConfigError(
            f"trainer.batch_size={t.batch_size} is the global batch and must be divisible by the {world} processes"
        )
    if world > 1 and t.expert_parallel > 1 and world % t.expert_parallel:
        raise ConfigError(f"trainer.expert_parallel={t.expert_parallel} must divide the {world} processes")
    if world > 1 and (t.parallel == "fsdp" or t.expert_parallel > 1) and t.checkpoint_format == "torch":
        raise ConfigError(
            "trainer.checkpoint_format=torch writes one file from rank 0 and cannot hold a sharded "
            "model (trainer.parallel=fsdp or expert_parallel>1); allowed: auto or dcp"
        )
    if root.logger.name == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError(
                "logger=wandb needs the wandb package (pip install wandb); allowed without it: logger=none"
            ) from None
    check_model_builds(root)


def check_writable_folder(key: str, folder: str) -> None:
    """ConfigError unless `folder` is, or can be created as, a folder this process may write in."""
    path = Path(folder).expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ConfigError(f"{key}={folder}: {existing} is a file, not a folder; allowed: a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{key}={folder}: {existing} is not writable by this user; allowed: a folder you can write in"
        )


def _check_resume(resume: str, run_dir: str) -> None:
    """trainer.resume: auto, none (refused when run_dir already holds checkpoints), or a readable checkpoint."""
    from training.checkpoint import files as ckpt
    from training.errors import CheckpointError

    if resume in ("auto", "restart"):
        return  # the trainer picks the latest valid checkpoint of run_dir, or (restart) moves them aside
    if resume == "none":
        found = ckpt.list_checkpoints(run_dir)
        if found:
            raise ConfigError(
                f"trainer.resume=none but run_dir={run_dir} already holds checkpoints ({found[-1].name} ...); "
                "allowed: trainer.resume=auto to continue it, or a new run_dir (nothing was overwritten)"
            )
        return
    if not Path(resume).expanduser().exists():
        raise ConfigError(
            f"trainer.resume={resume}: no such checkpoint; allowed: auto, none, restart, or an existing "
            "step_XXXXXXXX.pt file or checkpoint folder"
        )
    try:
        ckpt.load_checkpoint(Path(resume).expanduser())  # the one safe loader: refuses what it cannot verify
    except CheckpointError as e:
        raise ConfigError(f"trainer.resume={resume}: {e}") from None
