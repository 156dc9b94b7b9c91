"""Plain-loop references for the group-gathered matmuls: one token, one selected group at a time.

Legend: N tokens, A selected groups per token (slots), G groups, K input width, M output width,
b block width (K/G for the input op, M/G for the output op).

Written from the definition only (slices of x and w per selected group), sharing no code with
the kernels or the torch backend. Slow (N·A tiny matmuls): tests only.
"""

from __future__ import annotations

import torch


def group_in_matmul_reference(x_NK, ids_NA, gates_NA, w_KM, n_groups):
    """y[n] = Σ_j gates[n, j] · x[n, blk(ids[n, j])] @ w[blk(ids[n, j]), :]; id -1 or outside [0, G) adds nothing."""
    N, K = x_NK.shape
    b = K // n_groups
    rows = []
    for n in range(N):
        y_M = torch.zeros(w_KM.shape[1], dtype=x_NK.dtype, device=x_NK.device)
        for j in range(ids_NA.shape[1]):
            e = int(ids_NA[n, j])
            if 0 <= e < n_groups:  # -1 and out-of-range ids are dropped (as dense_gates does)
                y_M = y_M + gates_NA[n, j].to(x_NK.dtype) * (x_NK[n, e * b : (e + 1) * b] @ w_KM[e * b : (e + 1) * b])
        rows.append(y_M)
    return torch.stack(rows) if rows else x_NK[:0, :1] * w_KM[:1] * 0


def group_out_matmul_reference(x_NK, ids_NA, gates_NA, w_KM, n_groups):
    """y[n, blk(ids[n, j])] += gates[n, j] · x[n] @ w[:, blk(ids[n, j])]; unselected blocks are 0;
    ids -1 or outside [0, G) add nothing."""
    N, M = x_NK.shape[0], w_KM.shape[1]
    b = M // n_groups
    rows = []
    for n in range(N):
        blocks = [torch.zeros(b, dtype=x_NK.dtype, device=x_NK.device) for _ in range(n_groups)]
        for j in range(ids_NA.shape[1]):
            e = int(ids_NA[n, j])
            if 0 <= e < n_groups:  # -1 and out-of-range ids are dropped (as dense_gates does)
                blocks[e] = blocks[e] + gates_NA[n, j].to(x_NK.dtype) * (x_NK[n] @ w_KM[:, e * b : (e + 1) * b])
        rows.append(torch.cat(blocks))
    return torch.stack(rows) if rows else x_NK[:0, :1] * w_KM[:1] * 0
