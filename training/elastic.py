"""ERNIE 5.0-style elastic training (METHODS.md §7): sample a sub-network per optimizer step.

Each step independently samples depth (full with ``depth_full_prob``, else a random number of
layers), width (all experts with ``width_full_prob``, else a random subset of a configured size,
enforced by masking router logits before top-k) and sparsity (the configured top-k with
``topk_full_prob``, else a smaller k from a range). The draw is seeded by (seed, step), so every
rank and every resumed run gets the same sub-network without communication.

[RECON] choices, all options: which layers a reduced depth keeps (``depth_drop``: ``tail`` keeps
the first d layers, ``random`` a random sorted subset); the expert subset is shared by all layers;
``mode=single`` trains one configuration per step, ``full_plus_sub`` the full model and one sampled
sub-model in the same step with summed losses (the digest's "single backward" reading).
"""

from __future__ import annotations

import numpy as np
import torch

from arch.layers import FULL_MODEL, ElasticSetting

_STREAM = 0xE1A5  # separates this RNG stream from the data sampler's


def sample_setting(
    cfg, step: int, seed: int, n_layers: int, n_experts: int | None, top_k: int | None
) -> ElasticSetting:
    """The sub-network for optimizer step ``step`` (FULL_MODEL when every dimension draws "full")."""
    rng = np.random.default_rng([seed, step, _STREAM])
    u_depth, u_width, u_topk = rng.random(3)
    active_layers = None
    if u_depth >= cfg.depth_full_prob and n_layers > cfg.depth_min:
        depth = int(rng.integers(cfg.depth_min, n_layers))  # strictly fewer than all layers
        if cfg.depth_drop == "tail":
            active_layers = tuple(range(depth))
        else:
            active_layers = tuple(sorted(rng.choice(n_layers, size=depth, replace=False).tolist()))
    expert_mask = None
    if n_experts and u_width >= cfg.width_full_prob:
        sizes = list(cfg.subset_sizes) or [max(1, n_experts // 2)]
        size = int(sizes[rng.integers(len(sizes))])
        subset = rng.choice(n_experts, size=min(size, n_experts), replace=False)
        expert_mask = torch.zeros(n_experts, dtype=torch.bool)
        expert_mask[torch.from_numpy(subset)] = True
    k = None
    if top_k and u_topk >= cfg.topk_full_prob and top_k > cfg.topk_min:
        k_max = cfg.topk_max if cfg.topk_max is not None else top_k - 1
        k = int(rng.integers(cfg.topk_min, k_max + 1))
    setting = ElasticSetting(active_layers, expert_mask, k)
    return FULL_MODEL if setting.is_full else setting


def describe(setting: ElasticSetting, n_layers: int, n_experts: int | None, top_k: int | None) -> dict[str, float]:
    """Numbers for metrics.jsonl: depth, routable experts and k of a setting."""
    return {
        "elastic/depth": len(setting.active_layers) if setting.active_layers is not None else n_layers,
        "elastic/experts": int(setting.expert_mask_E.sum()) if setting.expert_mask_E is not None else (n_experts or 0),
        "elastic/top_k": setting.top_k if setting.top_k is not None else (top_k or 0),
    }
