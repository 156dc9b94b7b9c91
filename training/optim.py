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


def lr_at(step: int, peak_lr: float, max_steps: int, schedule_cfg) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    warmup = schedule_cfg.warmup_steps
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
