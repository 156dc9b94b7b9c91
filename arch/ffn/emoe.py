"""Elastic MoE (EMoE, Gu et al. 2025, arXiv 2509.21892): co-activation sampling and the hierarchical router loss.

Only reviews and abstracts of the paper were available (METHODS.md §1), so both pieces are
reconstructions [RECON] exposed as options of ``ffn=moe`` / ``ffn=emoe``:

- co-activation sampling: in training, with probability ρ per token, its k experts are drawn
  from its top-k_ideal candidates (uniformly, or ∝ router probability via Gumbel-top-k; optionally
  always keeping the top-1) instead of being the top-k. Exactly k experts still run per token.
- hierarchical router loss: KL(q ‖ sort(p)) with a geometric target q_r ∝ γ^r over ranks r, which
  rewards a sharp, clearly ranked router distribution, so that extra experts added at inference
  (k' > k) come from a meaningful ranking.

Legend: N tokens, E experts, K experts per token, C candidates (k_ideal).
"""

from __future__ import annotations

import torch


def coactivation_topk(
    selection_NE: torch.Tensor,
    probs_NE: torch.Tensor,
    k: int,
    k_ideal: int,
    prob: float,
    mode: str = "uniform",
    keep_top1: bool = False,
) -> torch.Tensor:
    """Expert ids (N, k): the top-k, except that a ρ-fraction of tokens sample k of their top-k_ideal.

    ``selection_NE`` ranks the candidates (scores + balance bias, masked); ``probs_NE`` weighs the
    proportional mode. Draws use the global torch RNG, which the trainer checkpoints.
    """
    N, E = selection_NE.shape
    k_ideal = min(k_ideal, E)
    candidates_NC = selection_NE.topk(k_ideal, dim=-1).indices
    if prob <= 0 or k_ideal <= k:
        return candidates_NC[:, :k]
    first = 1 if keep_top1 else 0
    pool_NP = candidates_NC[:, first:]
    if mode == "uniform":
        keys_NP = torch.rand(pool_NP.shape, device=selection_NE.device)
    elif mode == "proportional":  # Gumbel-top-k = sampling without replacement ∝ p
        gumbel = -torch.log(-torch.log(torch.rand(pool_NP.shape, device=selection_NE.device).clamp(1e-20, 1)))
        keys_NP = probs_NE.gather(1, pool_NP).clamp(min=1e-20).log() + gumbel
    else:
        raise ValueError(f"coactivation_mode={mode!r} is not one of ['uniform', 'proportional']")
    picked_NP = pool_NP.gather(1, keys_NP.topk(k - first, dim=-1).indices)
    sampled_NK = torch.cat([candidates_NC[:, :first], picked_NP], dim=1) if first else picked_NP
    use_sample_N1 = torch.rand(N, 1, device=selection_NE.device) < prob
    return torch.where(use_sample_N1, sampled_NK, candidates_NC[:, :k])


def hierarchical_router_loss(probs_NE: torch.Tensor, gamma: float) -> torch.Tensor:
    """KL(q ‖ p_sorted), q_r ∝ γ^r: zero when the sorted router distribution decays geometrically."""
    E = probs_NE.shape[-1]
    ranks = torch.arange(E, device=probs_NE.device, dtype=torch.float32)
    q_E = gamma**ranks
    q_E = q_E / q_E.sum()
    sorted_NE = probs_NE.sort(dim=-1, descending=True).values.clamp(min=1e-9)
    return (q_E * (q_E.log() - sorted_NE.log())).sum(-1).mean()
