"""Autotune tables of the flash-attention backward kernels (flash_bwd_dq.py, flash_bwd_dkdv.py), with the
ptxas register / spill measurements that chose them; the ahead-of-time specs (aot_specs.py) read the same
tables. Each table entry is (config, largest padded head dim[, largest with ATOMIC_DQ]), pruned at launch
by kernels.attention.flash.prune_by_head_dim; fp32 inputs run on their own config only, and the interpreter
(INTERPRET) on one 16 × 16 config.
"""

from __future__ import annotations

from kernels import HAS_TRITON, INTERPRET

if HAS_TRITON:
    import triton


def _dq_configs():
    """(config, largest padded head dim) for dQ. Measured (bf16): the 4-warp 64 × 64 tile and the
    8-warp 128 × 64 tile are clean at d = 64 but spill at d = 128 on sm_80 (24 B, 40 B; 8-warp
    128 × 64 without pipelining: 668 B), so they are pruned there."""
    cfg = triton.Config
    return [
        (cfg({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3), 64),
        (cfg({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2), 64),
        (cfg({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=2), 128),
        (cfg({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=2), 128),
        (cfg({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2), 128),  # small: fp32 at d=128 fits here
    ]


def _dkdv_configs():
    """(config, largest padded head dim) for dK/dV. Two fp32 accumulators of BLOCK_N × d live
    across the whole query loop, with K and V (the A operands of two matmuls) beside them.
    Measured with ptxas (bf16, sm_90a / sm_80): 4 warps spill at d = 128 for every tile tried
    (24 - 940 B), BLOCK_M = 64 spills at both head dims (20 - 940 B), and software pipelining
    (num_stages = 2) adds 4 - 400 B; only BLOCK_M = 32 on 8 warps without pipelining is clean at
    d = 128, and BLOCK_N = 128 only up to d = 64 (at 128: 4 B on sm_90a, 460 B on sm_80).
    The single pass (ATOMIC_DQ) holds a dQ tile as well: BLOCK_M = 32 spills with it (72 B at
    d = 128 on sm_90a, 24 - 32 B at d = 64 on sm_80), so the third column (the largest head dim
    with ATOMIC_DQ) gives it only the 16-row config. The fp32 inputs at d = 128 fit shared memory in the
    64-key configs."""
    cfg = triton.Config
    return [
        (cfg({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8, num_stages=1), 64, 0),
        (cfg({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=8, num_stages=1), 128, 0),
        (cfg({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=8, num_stages=1), 0, 128),
    ]


def _interp_configs():
    return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]


def _fp32_configs():
    """(dQ, dK/dV) configs for fp32 inputs, the only ones they run on. Measured with ptxas at d = 128
    (sm_90a / sm_80): every table config spills in fp32 (dQ 64 × 32: 128 B; dK/dV 32 × 64: 480 B on
    sm_90a), as do dQ 32 × 64 (40 / 20 B), dQ 64 × 32 on 8 warps (248 B), dK/dV 16 × 64 (1,564 / 280 B),
    the dV-only dK/dV launch at 32 × 32 (16 B on sm_90a) and the single-output launches at 16 × 32 on 8 warps
    (capped at 128 registers: 24 - 40 B). Clean without pipelining: dQ 32 × 32 on 8 warps
    (146 / 154 registers) and dK/dV 16 × 32 on 4 warps (150 - 241) in every deterministic launch kind."""
    cfg = triton.Config
    return (
        cfg({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=8, num_stages=1),
        cfg({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1),
    )


if HAS_TRITON:
    DQ_TABLE, DKDV_TABLE = _dq_configs(), _dkdv_configs()
    FP32_DQ_CONFIG, FP32_DKDV_CONFIG = _fp32_configs()
    DQ_CONFIGS = [e[0] for e in DQ_TABLE] + [FP32_DQ_CONFIG]
    DKDV_CONFIGS = [e[0] for e in DKDV_TABLE] + [FP32_DKDV_CONFIG]
    ACTIVE_DQ_CONFIGS = _interp_configs() if INTERPRET else DQ_CONFIGS
    ACTIVE_DKDV_CONFIGS = _interp_configs() if INTERPRET else DKDV_CONFIGS
