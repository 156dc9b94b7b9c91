"""What every entry point needs before training or loading: the device, seeding, and the model for a config."""
from __future__ import annotations

from dataclasses import replace

import torch

from arch.model import LanguageModel
from training.config import RootConfig


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but no CUDA device is visible; use trainer.device=auto or cpu")
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
    if model_cfg.vocab_size is None:
        model_cfg.vocab_size = vocab_size
    elif model_cfg.vocab_size < vocab_size:
        raise ValueError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's {vocab_size} tokens")
    return LanguageModel(model_cfg)


def check_model_builds(root: RootConfig) -> None:
    """Build the model on the meta device (no memory, no data: a placeholder vocabulary) so that an
    option only a block's constructor can judge is reported before any data is prepared. Failures
    that are the meta device's, not the config's, are left for the real build."""
    try:
        with torch.device("meta"):
            LanguageModel(replace(root.model, vocab_size=root.model.vocab_size or 257))
    except (NotImplementedError, RuntimeError):
        pass
