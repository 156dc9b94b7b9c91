"""Peak FLOP/s of the accelerators, for model FLOPs utilisation (MFU = achieved / peak).

The trainer's achieved FLOP/s are tokens/s × ``train_flops_per_token`` from
``training.accounting.account`` (the one FLOP counter); this table supplies the denominator.
"""

from __future__ import annotations

# Dense bf16 peak FLOP/s (no sparsity) by GPU name substring.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "RTX 4090": 165e12,
    "V100": 125e12,
}


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
