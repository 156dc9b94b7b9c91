"""Routers for mixture-of-experts layers: scores, top-k selection, balancing losses, routing metrics.

Legend: N tokens (B·T), D d_model, E experts, K experts per token, R reduced router dim (X-MoE).

References: Switch Transformer (Fedus et al. 2021) load-balance loss; ST-MoE (Zoph et al. 2022)
router z-loss; DeepSeek-V3 (2024) auxiliary-loss-free bias balancing and sequence-wise balance
loss; X-MoE (Chi et al. 2022) low-dimensional routing, as torchscale computes it and as the paper writes it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from arch.cost import Cost, CostSetting, dense_cost, linear_flops, numel


class LinearRouter(nn.Module):
    """logits = x W_rᵀ: the standard dot-product router."""

    def __init__(self, d_model: int, n_experts: int):
        super().__init__()
        self.proj = nn.Linear(d_model, n_experts, bias=False)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.proj(x_ND).float()

    def cost(self, setting: CostSetting) -> Cost:
        """2·D·E per token."""
        return dense_cost(self)


class XMoERouter(nn.Module):
    """X-MoE routing (Chi et al., NeurIPS 2022) as torchscale's ``Top2Gate(use_xmoe=True)`` computes it [CODE]:

        logits = (W_red x) · normalize(e_i, eps=1e-4)ᵀ        W_red: D → R (R = 16), e ∈ R^{E×R}

    The token projection is not normalised and there is no temperature. The expert embeddings
    (orthogonal init, gain 0.32) are rescaled to L2 norm 1.5 before every forward in the official code;
    here right after construction and after every optimizer step (``after_optimizer_step``), which
    is the same for every forward and never mutates a tensor that autograd saved (a looped layer
    calls its router several times per step).
    """

    def __init__(self, d_model: int, n_experts: int, reduced_dim: int = 16):
        super().__init__()
        self.reduce = nn.Linear(d_model, reduced_dim, bias=False)
        self.expert_embed_ER = nn.Parameter(torch.empty(n_experts, reduced_dim))
        self.init_parameters(0.0, 0.0)

    def init_parameters(self, std: float, residual_std: float) -> None:
        nn.init.orthogonal_(self.expert_embed_ER, gain=0.32)  # torchscale xmoe init
        self.rescale_expert_embeddings()

    @torch.no_grad()
    def rescale_expert_embeddings(self) -> None:
        norm_E1 = self.expert_embed_ER.norm(p=2.0, dim=1, keepdim=True)
        self.expert_embed_ER.mul_(1.5 / norm_E1)

    def after_optimizer_step(self, step: int) -> None:
        self.rescale_expert_embeddings()

    def cost(self, setting: CostSetting) -> Cost:
        return _reduced_router_cost(self)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        h_NR = self.reduce(x_ND).float()
        e_ER = F.normalize(self.expert_embed_ER.float(), p=2.0, dim=1, eps=1e-4)
        return h_NR @ e_ER.T


class XMoECosineRouter(nn.Module):
    """The X-MoE paper's form (``router=xmoe_cosine``): logits = cos(W_red x, e_i) / τ, with both sides
    normalised and a learnable temperature τ (init 0.3, stored as log τ to stay positive). Not what the
    official torchscale code computes (see ``XMoERouter``); kept as a named variant."""

    def __init__(self, d_model: int, n_experts: int, reduced_dim: int = 16, temperature: float = 0.3):
        super().__init__()
        self.reduce = nn.Linear(d_model, reduced_dim, bias=False)
        self.expert_embed_ER = nn.Parameter(torch.empty(n_experts, reduced_dim))
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        nn.init.orthogonal_(self.expert_embed_ER, gain=0.32)

    def init_parameters(self, std: float, residual_std: float) -> None:
        nn.init.orthogonal_(self.expert_embed_ER, gain=0.32)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        h_NR = F.normalize(self.reduce(x_ND).float(), dim=-1)
        e_ER = F.normalize(self.expert_embed_ER.float(), dim=-1)
        return h_NR @ e_ER.T / self.log_temperature.exp()

    def cost(self, setting: CostSetting) -> Cost:
        return _reduced_router_cost(self)


def _reduced_router_cost(router: nn.Module) -> Cost:
    """X-MoE routers: the D → R reduction (2·D·R) and the scores against the E expert embeddings (2·R·E)."""
    return Cost(
        {id(router): numel(router)}, matmul_flops=linear_flops(router.reduce) + 2 * router.expert_embed_ER.numel()
    )


def build_router(kind: str, d_model: int, n_experts: int, reduced_dim: int, temperature: float) -> nn.Module:
    """``router`` option → module: linear | xmoe (official torchscale) | xmoe_cosine (the paper's form)."""
    if kind == "linear":
        return LinearRouter(d_model, n_experts)
    if kind == "xmoe":
        return XMoERouter(d_model, n_experts, reduced_dim)
    if kind == "xmoe_cosine":
        return XMoECosineRouter(d_model, n_experts, reduced_dim, temperature)
    raise ValueError(f"ffn.router={kind!r} is not one of ['linear', 'xmoe', 'xmoe_cosine']")


def drop_second_experts(ids_NK: torch.Tensor, probs_NE: torch.Tensor) -> torch.Tensor:
    """X-MoE / torchscale ``second_expert_policy='random'`` [CODE]: in training each token keeps its second
    expert with probability min(1, 2·p₂) (p₂ its router probability), else the slot becomes -1 (empty)."""
    if ids_NK.shape[1] < 2:
        return ids_NK
    p2_N = probs_NE.gather(1, ids_NK[:, 1:2]).squeeze(1)
    keep_N = 2 * p2_N > torch.rand_like(p2_N)
    out_NK = ids_NK.clone()
    out_NK[:, 1] = torch.where(keep_N, ids_NK[:, 1], torch.full_like(ids_NK[:, 1], -1))
    return out_NK


def expert_counts(ids_NK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(E,) float slots routed to each expert; dropped slots (-1) are not counted.

    A scatter into E+1 bins (bin E collects the -1 slots) has a fixed output shape, so unlike
    boolean indexing or ``bincount`` it needs no host sync and traces under torch.compile.
    """
    bins_M = torch.where(ids_NK >= 0, ids_NK, n_experts).reshape(-1).long()
    ones_M = torch.ones_like(bins_M, dtype=torch.float)
    return torch.zeros(n_experts + 1, device=ids_NK.device).scatter_add_(0, bins_M, ones_M)[:n_experts]


def switch_balance_loss(probs_NE: torch.Tensor, ids_NK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """E · Σ_e f_e · P_e: f_e the fraction of the given slots (ids ≥ 0) on e, P_e the mean router probability.

    Which slots count is the caller's choice (``balance_loss_counts``): all k slots after capacity drops,
    or each token's top-1 choice before any drop, as the official X-MoE and MH-MoE codes count
    (``me · ce`` with ``ce`` = the mean of the top-1 one-hot mask: E²·mean_e(me·ce) = E·Σ_e f_e·P_e)."""
    counts_E = expert_counts(ids_NK, n_experts)
    f_E = counts_E / counts_E.sum().clamp(min=1)
    return n_experts * (f_E * probs_NE.mean(0)).sum()


def sequence_balance_loss(probs_BTE: torch.Tensor, ids_BTK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """The Switch loss computed within each sequence, then averaged (DeepSeek-V3's sequence-wise loss)."""
    losses = [switch_balance_loss(probs_BTE[b], ids_BTK[b], n_experts) for b in range(probs_BTE.shape[0])]
    return torch.stack(losses).mean()


def z_loss(logits_NE: torch.Tensor) -> torch.Tensor:
    """mean(logsumexp(logits)²): keeps router logits small (ST-MoE)."""
    return torch.logsumexp(logits_NE, dim=-1).square().mean()


def apply_capacity(ids_NK: torch.Tensor, n_experts: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop slots beyond each expert's capacity (→ -1). Earlier choices (rank 0 first) win, then token order.

    Returns (ids_NK with drops, number of dropped slots).
    """
    N, K = ids_NK.shape
    flat_M = ids_NK.T.reshape(-1)  # rank-major: every token's first choice before any second choice
    onehot_ME = F.one_hot(flat_M.clamp(min=0), n_experts) * (flat_M >= 0).unsqueeze(1)
    position_M = (onehot_ME.cumsum(0) * onehot_ME).sum(1) - 1  # position in its expert's queue
    keep_M = (position_M < capacity) & (flat_M >= 0)
    dropped = ((flat_M >= 0) & ~keep_M).sum()
    kept_M = torch.where(keep_M, flat_M, torch.full_like(flat_M, -1))
    return kept_M.view(K, N).T.contiguous(), dropped


def routing_metrics(probs_NE: torch.Tensor, ids_NK: torch.Tensor, n_experts: int) -> dict[str, torch.Tensor]:
    """How evenly the routed slots spread over the experts, and how decided each token's router is
    (detached device tensors: the trainer converts them to numbers on log steps only).

    load            (E,) fraction of the routed slots on each expert (sums to 1)
    load_entropy    entropy of ``load`` / log E: 1 = perfectly balanced, 0 = every slot on one expert
    max_load_ratio  max load / mean load (1 = balanced; E = everything on one expert)
    min_load_ratio  min load / mean load (0 when some expert received no slot)
    dead_experts    number of experts that received no slot
    router_entropy  mean over tokens of the router distribution's entropy / log E: 1 = a uniform (undecided)
                    router for every token, whatever the load; small = confident routing
    """
    with torch.no_grad():
        counts_E = expert_counts(ids_NK, n_experts)
        load_E = counts_E / counts_E.sum().clamp(min=1)
        mean_load = 1.0 / n_experts
        log_E = math.log(n_experts) if n_experts > 1 else 1.0
        load_entropy = -(load_E * load_E.clamp(min=1e-12).log()).sum() / log_E
        router_entropy = -(probs_NE * probs_NE.clamp(min=1e-12).log()).sum(-1).mean() / log_E
        return {
            "load": load_E,
            "load_entropy": load_entropy,
            "max_load_ratio": load_E.max() / mean_load,
            "min_load_ratio": load_E.min() / mean_load,
            "dead_experts": (counts_E == 0).sum().float(),
            "router_entropy": router_entropy,
        }


LOAD_METRICS = ("load", "load_entropy", "max_load_ratio", "min_load_ratio", "dead_experts", "router_entropy")


def cluster_variance_loss(probs_NE: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """MoEC intra-cluster variance constraint [RECON]: Σ_c Var_{e∈c}(P_e) on batch-mean probabilities P_e.

    Experts are clustered contiguously (cluster c = experts [c·E/C, (c+1)·E/C)). Pulling the mean
    routing probabilities of a cluster's experts together makes the cluster share its data
    (Xie et al., AAAI 2023; only the abstract was available, METHODS.md §8.3).
    """
    P_CS = probs_NE.mean(0).view(n_clusters, -1)
    return P_CS.var(dim=-1, unbiased=False).sum()


def cluster_dropout_mask(
    n_tokens: int, n_experts: int, n_clusters: int, k: int, rate: float, device=None
) -> torch.Tensor:
    """MoEC cluster-level expert dropout [RECON]: (N, E) bool, True = expert dropped for that token.

    Each expert is dropped with probability ``rate`` independently per token, except that every
    cluster keeps at least one expert and every token keeps at least k experts, so routing can
    always fall back on a surviving expert of the same cluster and never loses a token's experts.
    """
    keys_NE = torch.rand(n_tokens, n_experts, device=device)
    drop_NE = keys_NE < rate
    keys_NCS = keys_NE.view(n_tokens, n_clusters, n_experts // n_clusters)
    keep_NE = F.one_hot(keys_NCS.argmax(-1), n_experts // n_clusters).bool().view(n_tokens, n_experts)
    keep_NE |= torch.zeros_like(drop_NE).scatter(1, keys_NE.topk(k, dim=-1).indices, True)
    return drop_NE & ~keep_NE
