"""Plain-loop reference for the expert MLP: one token, one slot at a time.

Legend (shape suffixes):
    N tokens   k slots/token   E experts   D model width   F expert hidden width
    H = 2F (SwiGLU: columns [:F] gate projection, [F:] up projection) or F (GELU)

Written from the definition only and sharing no code with the kernels or the torch backend, so
the tests compare two independent implementations. Slow (N·k tiny matmuls): tests only.
"""

from __future__ import annotations

import math

import torch


def _expert(x_D: torch.Tensor, w_in_DH: torch.Tensor, w_out_FD: torch.Tensor, activation: str) -> torch.Tensor:
    """One expert on one token: (D,) → (D,)."""
    h_H = x_D @ w_in_DH
    if activation == "swiglu":
        F = w_out_FD.shape[0]
        gate_F, up_F = h_H[:F], h_H[F:]
        a_F = gate_F * torch.sigmoid(gate_F) * up_F
    else:  # exact (erf) GELU, not the tanh approximation
        a_F = 0.5 * h_H * (1.0 + torch.erf(h_H / math.sqrt(2.0)))
    return a_F @ w_out_FD


def expert_mlp_reference(x_ND, expert_ids_NK, expert_weights_NK, w_in_EDH, w_out_EFD, activation="swiglu"):
    """y[n] = Σ_j expert_weights[n, j] · expert_{ids[n, j]}(x[n]); slots with id -1 (or outside [0, E)) add nothing."""
    N, k = expert_ids_NK.shape
    D = x_ND.shape[1]
    # an exact 0 that depends on every input (sums of empty slices: NaN-free), so the output stays
    # in the graph, with zero gradients, when no slot is kept or there are no tokens
    anchor = sum(t.reshape(-1)[:0].sum().to(x_ND.dtype) for t in (x_ND, expert_weights_NK, w_in_EDH, w_out_EFD))
    rows = []
    for n in range(N):
        y_D = torch.zeros(D, dtype=x_ND.dtype, device=x_ND.device) + anchor
        for j in range(k):
            e = int(expert_ids_NK[n, j])
            if e < 0 or e >= w_in_EDH.shape[0]:  # -1 and out-of-range ids add nothing (as the op drops them)
                continue
            y_D = y_D + expert_weights_NK[n, j].to(x_ND.dtype) * _expert(x_ND[n], w_in_EDH[e], w_out_EFD[e], activation)
        rows.append(y_D)
    if not rows:
        return torch.zeros(0, D, dtype=x_ND.dtype, device=x_ND.device) + anchor
    return torch.stack(rows)
