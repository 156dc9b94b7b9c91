"""MoHD kernels: matmuls over the active column blocks (sub-dimension groups) of a token.

Public API:
    group_in_matmul(x, ids, gates, w, n_groups, backend="auto")  -> Σ_j gate · x[blk] @ w[blk, :]
    group_out_matmul(x, ids, gates, w, n_groups, backend="auto") -> gate · x @ w[:, blk] into blk
"""

from kernels.mohd.ops import BACKENDS, GroupInMatmul, GroupOutMatmul, dense_gates, group_in_matmul, group_out_matmul
from kernels.mohd.reference import group_in_matmul_reference, group_out_matmul_reference

__all__ = [
    "BACKENDS",
    "GroupInMatmul",
    "GroupOutMatmul",
    "dense_gates",
    "group_in_matmul",
    "group_in_matmul_reference",
    "group_out_matmul",
    "group_out_matmul_reference",
]
