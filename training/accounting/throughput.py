"""The trainer's throughput bookkeeping: tokens/s, training FLOPs/token and MFU of each train log row.

The trainer runs each train step through ``time_step`` and, under elastic training, reports what
it trained (``count_trained``); ``row`` turns the steps since the last log row into that row's
numbers and starts the next window. FLOPs come from ``training.accounting.account`` (the one FLOP
counter), the MFU denominator from ``training.accounting.hardware``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from arch.layers import FULL_MODEL, ElasticSetting
from training.accounting.account import account
from training.accounting.hardware import peak_flops
from training.config_schema import RootConfig


class Throughput:
    """Throughput of one training run's train steps, one window per train log row."""

    def __init__(self, model: nn.Module, root: RootConfig, flops_per_token: float, device: torch.device, world: int):
        t, self.seq_len = root.trainer, root.data.seq_len
        self.model, self.device, self.world = model, device, world
        self.tokens_per_step = t.batch_size * t.grad_accum * self.seq_len  # global: all ranks together
        self.flops_per_token = flops_per_token
        # Elastic training: training FLOPs/token of the sub-networks trained since the last log row (sum, steps)
        self._trained_flops = [0.0, 0]
        self._flops_cache: dict[tuple, float] = {}
        self.peak_flops = peak_flops(device)
        # Throughput counts time spent in train steps only (not eval, checkpoints or logging).
        self.window_time, self.window_steps, self.tokens_per_s = 0.0, 0, 0.0

    def count_trained(self, sub_model: ElasticSetting, also_full: bool) -> None:
        """What an elastic step trains costs: the sub-network (+ the full model with mode=full_plus_sub)."""
        self._trained_flops[0] += self._train_flops_per_token(sub_model) + (
            self._train_flops_per_token(FULL_MODEL) if also_full else 0.0
        )
        self._trained_flops[1] += 1

    def time_step(self, train_step: Callable[[], dict | None]) -> dict | None:
        """Run ``train_step`` and add its time to the window (a skipped non-finite step, None: time, no step)."""
        step_start = time.perf_counter()
        metrics = train_step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.window_time += time.perf_counter() - step_start
        if metrics is not None:
            self.window_steps += 1
        return metrics

    def _train_flops_per_token(self, setting: ElasticSetting) -> float:
        """Training FLOPs/token of one sub-network, cached until the next log row (which clears it, so that
        depth schemes whose cost changes during training are re-read). Settings come from the host sampler."""
        mask = setting.expert_mask_E
        key = (setting.active_layers, None if mask is None else tuple(mask.tolist()), setting.top_k)
        if key not in self._flops_cache:
            self._flops_cache[key] = account(self.model, self.seq_len, setting, training=True).train_flops_per_token
        return self._flops_cache[key]

    def row(self, metrics: dict, nonfinite_skipped: int) -> dict[str, Any]:
        """The train log row: ``metrics`` and the throughput of the steps since the last row (a new window starts)."""
        tokens_per_s = self.window_steps * self.tokens_per_step / self.window_time
        step_time = self.window_time / self.window_steps
        self.tokens_per_s = tokens_per_s
        self.window_time, self.window_steps = 0.0, 0
        # Recomputed each log row: growing/looped depth schemes change their FLOPs during training. Under elastic
        # training the row's number is the mean over the steps since the last row of what each step trained (its
        # sub-network, plus the full model with mode=full_plus_sub), so Σ rows × tokens is the FLOPs spent.
        trained_sum, trained_steps = self._trained_flops
        self._flops_cache.clear()
        if trained_steps:
            self.flops_per_token = trained_sum / trained_steps
            self._trained_flops = [0.0, 0]
        else:
            self.flops_per_token = self._train_flops_per_token(FULL_MODEL)
        # tokens_per_s counts all ranks together; MFU is per GPU (achieved per device / its peak).
        world = self.world
        row = {
            **metrics,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": tokens_per_s / world,
            "step_time_s": step_time,
            "flops_per_token": self.flops_per_token,
        }
        achieved_per_device = tokens_per_s / world * self.flops_per_token
        if self.peak_flops:
            row["mfu"] = achieved_per_device / self.peak_flops
        else:
            row["gflops_per_s_per_device"] = achieved_per_device / 1e9
        if self.device.type == "cuda":
            row["cuda_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if nonfinite_skipped:
            row["nonfinite_skipped"] = nonfinite_skipped
        return row
