"""Training windows and eval batches from token streams (the memmaps of :mod:`training.data.shards`).

WindowSampler draws random windows of seq_len + 1 tokens, seeded per (step, micro_step) so a resumed
or re-sharded run reads exactly the batches it would have; iter_eval_batches walks the val split in
order. Targets the mask leaves unscored are IGNORE_INDEX.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

IGNORE_INDEX = -100  # cross_entropy's default ignore_index: unscored targets


def _windows(tokens: np.ndarray, mask: np.ndarray | None, starts: np.ndarray, seq_len: int):
    """x, y (len(starts), seq_len) int64 from windows of seq_len + 1 tokens; y = -100 where unscored."""
    index = starts[:, None] + np.arange(seq_len + 1)
    window = torch.from_numpy(np.asarray(tokens[index]).astype(np.int64))
    x, y = window[:, :-1], window[:, 1:].clone()
    if mask is not None:
        scored = torch.from_numpy(np.asarray(mask[index[:, :-1]]).astype(np.bool_))
        y[~scored] = IGNORE_INDEX
    return x.contiguous(), y


class WindowSampler:
    """Random windows of seq_len+1 tokens for training; stateless in the step so resume is exact.

    The starts of batch (step, micro_step) come from numpy's rng seeded with (seed, step, micro_step),
    so a batch depends only on those integers. `align` > 1 makes starts multiples of it.
    `batch_size` is the global batch; with `world` > 1 processes, rank `rank` gets rows
    [rank·b, (rank+1)·b) of it, b = batch_size / world, so the ranks together see exactly the batch
    one process would (and a run can be resumed on a different number of processes).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        mask: np.ndarray | None,
        seq_len: int,
        batch_size: int,
        seed: int,
        align: int = 1,
        rank: int = 0,
        world: int = 1,
    ):
        if batch_size % world:
            raise ValueError(f"batch_size={batch_size} (global) must be divisible by the number of processes {world}")
        if mask is not None and len(mask) != len(tokens):
            raise ValueError(f"mask length {len(mask)} != tokens length {len(tokens)}")
        if len(tokens) < seq_len + 1:
            raise ValueError(f"seq_len={seq_len} needs at least {seq_len + 1} tokens, got {len(tokens)}")
        self.tokens, self.mask = tokens, mask
        self.seq_len, self.batch_size, self.seed, self.align = int(seq_len), int(batch_size), int(seed), int(align)
        self.num_starts = (len(tokens) - (seq_len + 1)) // self.align + 1
        self.rank, self.local_batch = int(rank), int(batch_size) // int(world)
        self.position = -1

    def get_batch(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: (batch_size, seq_len) int64; y is x shifted by one, -100 where the mask says unscored."""
        rng = np.random.default_rng([self.seed, int(step), int(micro_step)])
        starts = rng.integers(0, self.num_starts, size=self.batch_size) * self.align
        starts = starts[self.rank * self.local_batch : (self.rank + 1) * self.local_batch]
        self.position = int(step)
        return _windows(self.tokens, self.mask, starts, self.seq_len)

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "align": self.align,
            "position": self.position,
        }

    def load_state_dict(self, d: dict) -> None:
        for key in ("seq_len", "batch_size"):
            if int(d[key]) != getattr(self, key):
                raise ValueError(f"sampler state has {key}={d[key]} but this run uses {key}={getattr(self, key)}")
        self.seed, self.position = int(d["seed"]), int(d.get("position", -1))


def iter_eval_batches(
    tokens: np.ndarray, mask: np.ndarray | None, seq_len: int, batch_size: int, max_batches: int | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic non-overlapping windows (stride seq_len) from the start of `tokens`.

    Yields x, y of shape (<= batch_size, seq_len); the last batch may be smaller.
    """
    starts = np.arange(0, len(tokens) - seq_len, seq_len)
    for batch_index, first in enumerate(range(0, len(starts), batch_size)):
        if max_batches is not None and batch_index >= max_batches:
            return
        yield _windows(tokens, mask, starts[first : first + batch_size], seq_len)
