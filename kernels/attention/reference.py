"""Plain-torch reference attention and last-row entropy, written independently of the kernels.

Legend (shape suffixes):
    B batch   T queries   S keys   H query heads   Hk key heads   Hv value heads
    d query/key head dim   dv value head dim

Materialises the full T×S scores per head in fp32 (or fp64 when given fp64): slow, obviously
correct, and differentiable by autograd, so tests take gradients of it directly.
"""

from __future__ import annotations

import math

import torch


def attention_reference(q_BTHd, k_BSHkd, v_BSHvdv, k_head_H, v_head_H, pos_BT, causal: bool, scale: float):
    """softmax(scale · QKᵀ + mask) V, one query head at a time.

    `k_head_H` / `v_head_H` are explicit maps; `pos_BT` explicit key positions of the queries
    (query i sees key j iff j <= pos[b, i] when causal). Returns out_BTHdv and lse_BHT in the
    compute dtype (fp32 unless the inputs are fp64).
    """
    dt = torch.float64 if q_BTHd.dtype == torch.float64 else torch.float32
    q, k, v = q_BTHd.to(dt), k_BSHkd.to(dt), v_BSHvdv.to(dt)
    S = k.shape[1]
    keys_S = torch.arange(S, device=q.device)
    visible_BTS = keys_S[None, None, :] <= pos_BT[:, :, None] if causal else None
    outs, lses = [], []
    for h in range(q.shape[2]):
        kh, vh = int(k_head_H[h]), int(v_head_H[h])
        scores_BTS = scale * torch.einsum("btd,bsd->bts", q[:, :, h], k[:, :, kh])
        if visible_BTS is not None:
            scores_BTS = scores_BTS.masked_fill(~visible_BTS, float("-inf"))
        lses.append(torch.logsumexp(scores_BTS, dim=-1))
        outs.append(torch.softmax(scores_BTS, dim=-1) @ v[:, :, vh])
    return torch.stack(outs, dim=2), torch.stack(lses, dim=1)


def last_row_entropy_reference(q_BTHd, k_BSHkd, k_head_H, scale: float):
    """Ent_BH = −Σ_j p_j log p_j / log S for the last query row (it sees all S keys); 0 when S == 1."""
    S = k_BSHkd.shape[1]
    q_BHd = q_BTHd[:, -1].double()
    k_BSHd = k_BSHkd.double()[:, :, k_head_H.long()]
    scores_BHS = scale * torch.einsum("bhd,bshd->bhs", q_BHd, k_BSHd)
    logp_BHS = torch.log_softmax(scores_BHS, dim=-1)
    ent_BH = -(logp_BHS.exp() * logp_BHS).sum(-1)
    return (ent_BH / math.log(S) if S > 1 else torch.zeros_like(ent_BH)).float()
