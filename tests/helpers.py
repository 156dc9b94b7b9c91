"""Shared test helpers: tiny configs that train in seconds on CPU."""

from __future__ import annotations

import os
from pathlib import Path

from training.cli import compose

# One data cache for the whole session: the embedded corpus is tokenized once.
DATA_CACHE = Path(
    os.environ.get("SPARSE_TEST_DATA_CACHE", Path(__file__).resolve().parent.parent / ".cache" / "test-data")
)

TINY = [
    "model=dense_tiny",
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "data.seq_len=32",
    "data.tokenizer.kind=bytes",
    "trainer.batch_size=4",
    "trainer.max_steps=20",
    "trainer.log_every=1",
    "trainer.eval_every=10",
    "trainer.eval_batches=2",
    "trainer.checkpoint_every=10",
    "trainer.progress=false",
    "trainer.sample_tokens=16",
    "trainer.threads=1",
    "schedule.warmup_steps=2",
    "logger=none",
]


def tiny_config(run_dir: Path, *overrides: str):
    """A composed (not yet validated) config for a ~30K-parameter model on the embedded corpus."""
    return compose([*TINY, f"data.cache_dir={DATA_CACHE}", f"run_dir={run_dir}", *overrides])
