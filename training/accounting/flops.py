"""FLOP accounting for MFU and throughput reporting.

Forward FLOPs per token = 2 × (parameters used by a token in matmuls) + attention score/value
FLOPs; training = 3 × forward (backward ≈ 2 × forward). Blocks with data-dependent compute
(experts, loops) report their own matmul FLOPs through ``flops_per_token(seq_len)``; plain
linear layers are counted from their weights.

The full per-token accounting (total and active parameters, attention FLOPs, KV-cache bytes,
elastic sub-networks, training FLOPs with no-grad recurrence) is ``training.accounting.account``; this
walker remains the block-level helper the depth schemes' ``flops_per_token`` use.
"""
from __future__ import annotations

import torch.nn as nn

# Dense bf16 peak FLOP/s (no sparsity) by GPU name substring, for MFU.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "RTX 4090": 165e12,
    "V100": 125e12,
}


def forward_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Forward FLOPs per token of the whole model (embedding lookup is free; the LM head is not)."""
    total = 0.0
    counted_by_parent: set[int] = set()
    for module in model.modules():
        if id(module) in counted_by_parent:
            continue
        custom = getattr(module, "flops_per_token", None)
        if custom is not None and module is not model:
            total += custom(seq_len)
            if getattr(module, "counts_own_linears", False):
                counted_by_parent.update(id(m) for m in module.modules())
                continue
        if isinstance(module, nn.Linear):
            total += 2 * module.in_features * module.out_features
    return total


def peak_flops(device) -> float | None:
    """Peak bf16 FLOP/s of a CUDA device from the table, or None (CPU / unknown GPU)."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None
