"""Flash attention with decoupled key/value head maps and sparse query positions.

Public API (attention blocks and tests call exactly this):
    attention(q, k, v, *, causal=True, k_head=None, v_head=None, q_positions=None,
              softmax_scale=None, return_lse=False, backend="auto", deterministic=True) -> out (or (out, lse))
    last_row_attention_entropy(q, k, *, k_head=None, softmax_scale=None, backend="auto") -> ent (B, H)
"""

from kernels.attention.ops import (
    BACKENDS,
    ENTROPY_BACKENDS,
    attention,
    last_row_attention_entropy,
)
from kernels.attention.reference import attention_reference, last_row_entropy_reference

__all__ = [
    "BACKENDS",
    "ENTROPY_BACKENDS",
    "attention",
    "attention_reference",
    "last_row_attention_entropy",
    "last_row_entropy_reference",
]
