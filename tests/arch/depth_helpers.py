"""A tiny LanguageModel with a given depth scheme, shared by the looped-depth tests."""

import torch

from arch.model import LanguageModel
from training.config_schema import ModelConfig


def model(depth: dict, seed: int = 0, **overrides) -> LanguageModel:
    torch.manual_seed(seed)
    options = dict(vocab_size=97, d_model=32, n_layers=4, n_heads=4, max_seq_len=64, depth=depth)
    return LanguageModel(ModelConfig(**{**options, **overrides}))
