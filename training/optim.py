"""AdamW with weight-decay groups, and learning-rate schedules as pure functions of the step.

A schedule that depends only on the step needs no state of its own to resume exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def build_optimizer(model: nn.Module, optim_cfg, device_type: str) -> torch.optim.Optimizer:
    """AdamW; decay only on ≥2-D weights (matrices), not on norms, biases or embeddings.

    Embedding tables are excluded because decaying rarely-seen token rows toward zero hurts
    more than it regularises (common practice in LLaMA/OLMo-style recipes).
    """
    decay, no_decay, seen = [], [], set()
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 and id(param) not in embedding_params else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": optim_cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=optim_cfg.lr,
        betas=tuple(optim_cfg.betas),
        eps=optim_cfg.eps,
        fused=device_type == "cuda",
    )


MAX_WARMUP_FRACTION = 0.5  # a warmup longer than this fraction of the run is rescaled …
RESCALED_WARMUP_FRACTION = 0.1  # … to this fraction (the default schedule's 50 of 500 steps)


def effective_warmup(schedule_cfg, max_steps: int) -> int:
    """The warmup steps a run uses: ``schedule.warmup_steps``, unless that is more than half of
    ``max_steps`` — a short run (a smoke test, a 6-step sweep point) would then never reach its peak lr —
    in which case 10 % of ``max_steps`` (at least 1 when warmup was asked for). See ``warmup_warning``."""
    warmup = schedule_cfg.warmup_steps
    if warmup > MAX_WARMUP_FRACTION * max_steps:
        return max(1, int(RESCALED_WARMUP_FRACTION * max_steps)) if warmup > 0 else 0
    return warmup


def warmup_warning(schedule_cfg, max_steps: int) -> str | None:
    """The line the trainer prints when ``effective_warmup`` rescaled the configured warmup."""
    used = effective_warmup(schedule_cfg, max_steps)
    if used == schedule_cfg.warmup_steps:
        return None
    return (
        f"warning: schedule.warmup_steps={schedule_cfg.warmup_steps} is more than half of "
        f"trainer.max_steps={max_steps}, "
        f"so the run would barely reach its peak lr; using {used} warmup steps "
        f"({RESCALED_WARMUP_FRACTION:.0%} of the run). Set schedule.warmup_steps <= "
        f"{int(MAX_WARMUP_FRACTION * max_steps)} "
        "to choose it yourself."
    )


def lr_at(step: int, peak_lr: float, max_steps: int, schedule_cfg) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    warmup = effective_warmup(schedule_cfg, max_steps)
    floor = peak_lr * schedule_cfg.min_lr_ratio
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    if schedule_cfg.name == "constant":
        return peak_lr
    if schedule_cfg.name == "cosine":
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return floor + (peak_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule_cfg.name == "wsd":
        decay_steps = max(1, int(round(schedule_cfg.decay_fraction * max_steps)))
        decay_start = max_steps - decay_steps
        if step < decay_start:
            return peak_lr
        return peak_lr + (floor - peak_lr) * min(1.0, (step - decay_start) / decay_steps)
    raise ValueError(f"schedule.name={schedule_cfg.name!r} is not one of ['cosine', 'wsd', 'constant']")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
