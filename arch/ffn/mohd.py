"""Mixture of Hidden-Dimensions (MoHD; Chen et al., ICML 2025, arXiv 2412.05644), METHODS.md §3.

Sub-dimension groups of a hidden vector: ``n_shared`` groups are always on, a router switches on
the top (n_active − n_shared) specialised groups per token, activation scaling rescales the
active groups, and group fusion mixes them. Almost everything is a reconstruction [RECON/2ND]:
only the abstract is public; the third-party reading (METHODS §3a) is the default.

Two readings of "hidden dimension" (``scope``):
    ffn     the FFN intermediate width F = G·g is split into G groups (third-party code):
              h = x @ W_in[:, active blocks]   (each group block is [gate g | up g])
              a = fuse(silu(h_gate) · h_up)    (zero on inactive groups)
              y = Σ_active c_e · a[blk e] @ W_out[blk e, :]      c = gate · α
    hidden  the model width D = G·g at the FFN input is split (METHODS §3a [RECON] for D):
              h = Σ_active c_e · x[blk e] @ W_in[blk e, :]   (gather the active input groups)
              y = fuse(SwiGLU(h) @ W_out[:, active blocks])  (scatter back to the active groups)
            This covers the FFN sublayer only; ``attention: mohd_mha`` (arch/attention/
            mohd_attention.py) applies the same routing to the attention sublayer's input.

The matmuls go through ``kernels.mohd`` (Triton group-gated GEMMs on CUDA; a dense masked
matmul on CPU, which is what BLAS does fastest there).

Legend: B batch, T tokens, N = B·T, D d_model, G groups, A active groups, S specialised groups
(G − n_shared), g group width, F FFN intermediate width, c = 2g ([gate | up] block).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as Fn

from arch.cost import Cost, CostSetting, linear_flops, numel
from arch.ffn.router import LinearRouter, routing_metrics, switch_balance_loss
from arch.layers import ForwardContext, ModelShared, autocast_operands
from kernels.mohd import dense_gates, group_in_matmul, group_out_matmul

Scaling = Literal["n_gate_sum", "renormalize", "inverse_density", "gate"]
Fusion = Literal["none", "blockdiag", "monarch"]


@dataclass
class GroupRouting:
    ids_NA: torch.Tensor  # active group ids: the n_shared shared ones, then the routed ones
    coef_NA: torch.Tensor  # gate · α per active group (activation scaling applied)
    probs_NG: torch.Tensor  # router scores over all groups
    active_NG: torch.Tensor  # 1.0 on active groups, else 0.0


class GroupRouter(nn.Module):
    """Shared + top-k specialised sub-dimension groups with activation scaling [RECON].

    gate = router score of each active group (shared groups "kept as-is", third-party code).
    ``scaling`` sets c = gate · α: ``n_gate_sum`` α = G·Σ_active gate (the third-party
    "activation-flow scaling", default); ``renormalize`` α = A / Σ_active gate (coefficients
    average 1); ``inverse_density`` c = G / A (no router weighting: the router learns from the
    balance loss only); ``gate`` α = 1. ``scoring``: softmax or sigmoid over the G groups.
    """

    def __init__(self, d_model: int, n_groups: int, n_active: int, n_shared: int, scoring: str, scaling: str):
        super().__init__()
        if not 0 <= n_shared <= n_active <= n_groups:
            raise ValueError(f"ffn MoHD needs 0 <= n_shared={n_shared} <= n_active={n_active} <= n_groups={n_groups}")
        self.G, self.A, self.n_shared, self.scoring, self.scaling = n_groups, n_active, n_shared, scoring, scaling
        self.router = LinearRouter(d_model, n_groups)

    def forward(self, x_ND: torch.Tensor) -> GroupRouting:
        logits_NG = self.router(x_ND)
        probs_NG = logits_NG.softmax(-1) if self.scoring == "softmax" else logits_NG.sigmoid()
        N, k = x_ND.shape[0], self.A - self.n_shared
        shared_NA = torch.arange(self.n_shared, device=x_ND.device).expand(N, self.n_shared)
        routed_NA = probs_NG[:, self.n_shared :].detach().topk(k, dim=-1).indices + self.n_shared
        ids_NA = torch.cat([shared_NA, routed_NA], dim=1)
        gate_NA = probs_NG.gather(1, ids_NA)
        if self.scaling == "n_gate_sum":
            coef_NA = gate_NA * (self.G * gate_NA.sum(-1, keepdim=True))
        elif self.scaling == "renormalize":
            coef_NA = gate_NA * (self.A / gate_NA.sum(-1, keepdim=True).clamp(min=1e-9))
        elif self.scaling == "inverse_density":
            coef_NA = torch.full_like(gate_NA, self.G / self.A)
        else:
            coef_NA = gate_NA
        active_NG = dense_gates(ids_NA, torch.ones_like(gate_NA), self.G)
        return GroupRouting(ids_NA, coef_NA, probs_NG, active_NG)

    def add_losses_and_metrics(
        self, r: GroupRouting, ctx: ForwardContext, coef: float, prefix: str, training: bool
    ) -> None:
        """Switch balance loss S·Σ_i f_i·P_i over the specialised groups (third-party code, w = 1e-2)."""
        S, k = self.G - self.n_shared, self.A - self.n_shared
        if S == 0 or k == 0:  # nothing is routed
            return
        p_NS = r.probs_NG[:, self.n_shared :]
        p_NS = p_NS / p_NS.sum(-1, keepdim=True).clamp(min=1e-9)
        spec_NK = r.ids_NA[:, self.n_shared :] - self.n_shared
        if training and coef > 0:
            ctx.add_aux_loss("mohd_balance_loss", coef * switch_balance_loss(p_NS, spec_NK, S))
        if not ctx.collect_metrics:
            return
        metrics = routing_metrics(p_NS, spec_NK, S)
        for key in ("load", "load_entropy", "max_load_ratio", "min_load_ratio", "dead_experts"):
            ctx.add_metric(f"{prefix}/{key}", metrics[key])


class GroupFusion(nn.Module):
    """Cheap structured mixing of the active groups, identity at init [RECON].

    ``blockdiag``: u[e] = h[e] @ B1[e], one b×b block per group (the third-party substitute; it
    mixes within a group only). ``monarch``: then v[:, j] = B2[j] @ u[:, j] over groups, a Monarch
    matrix (block-diagonal, transpose permutation, block-diagonal) whose second factor mixes
    across groups. Inputs and outputs are restricted to the token's active groups, so inactive
    groups stay exactly zero and the next projection stays sparse.
    """

    def __init__(self, n_groups: int, width: int, kind: str):
        super().__init__()
        self.kind, self.G, self.b = kind, n_groups, width
        eye = torch.eye(width).expand(n_groups, width, width)
        self.w1_Gbb = nn.Parameter(eye.clone()) if kind != "none" else None
        self.w2_bGG = (
            nn.Parameter(torch.eye(n_groups).expand(width, n_groups, n_groups).clone()) if kind == "monarch" else None
        )

    def init_parameters(self, std: float, residual_std: float) -> None:
        if self.w1_Gbb is not None:
            self.w1_Gbb.data.copy_(torch.eye(self.b).expand_as(self.w1_Gbb))
        if self.w2_bGG is not None:
            self.w2_bGG.data.copy_(torch.eye(self.G).expand_as(self.w2_bGG))

    def forward(self, h_NGb: torch.Tensor, active_NG: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return h_NGb
        mask_NG1 = active_NG.to(h_NGb.dtype)[..., None]
        u_NGb = torch.einsum("ngi,gij->ngj", h_NGb * mask_NG1, self.w1_Gbb.to(h_NGb.dtype))
        if self.kind == "monarch":
            u_NGb = torch.einsum("ngj,jfg->nfj", u_NGb, self.w2_bGG.to(h_NGb.dtype))
        return u_NGb * mask_NG1

    def active_flops(self, n_active: int) -> float:
        """Activated FLOPs: the blocks of the active groups (and the A×A part of each B2[j])."""
        if self.kind == "none":
            return 0.0
        return 2 * n_active * self.b**2 + (2 * self.b * n_active**2 if self.kind == "monarch" else 0)

    def inactive_count(self, n_active: int) -> int:
        if self.kind == "none":
            return 0
        return (self.G - n_active) * self.b**2 + (self.b * (self.G**2 - n_active**2) if self.kind == "monarch" else 0)


class MoHDFFN(nn.Module):
    """MoHD SwiGLU FFN (see the module docstring for the two scopes).

    ``hidden_dim=None`` sets F = G·⌈width_multiplier · dense F / G⌉ (dense F = 8/3·D rounded up to
    32). scope ``ffn``: A/G of F is active per token, so ``width_multiplier = G/A`` matches the
    dense FFN's activated parameters. scope ``hidden``: D must be divisible by G.
    ``share_routing`` (scope hidden): reuse the routing of this layer's ``mohd_mha`` attention
    instead of routing the FFN input again (whether the paper routes per sublayer is unknown).
    """

    def __init__(
        self,
        d_model: int,
        layer_idx: int,
        shared: ModelShared | None = None,
        *,
        scope: Literal["ffn", "hidden"] = "ffn",
        n_groups: int = 16,
        n_active: int = 8,
        n_shared: int = 6,
        hidden_dim: int | None = None,
        width_multiplier: float = 2.0,
        scoring: Literal["softmax", "sigmoid"] = "softmax",
        scaling: Scaling = "n_gate_sum",
        fusion: Fusion = "blockdiag",
        balance_loss_coef: float = 0.01,
        share_routing: bool = False,
        backend: Literal["auto", "triton", "torch", "reference"] = "auto",
    ):
        super().__init__()
        dense_hidden = 32 * math.ceil(int(8 * d_model / 3) / 32)
        F = hidden_dim or n_groups * math.ceil(width_multiplier * dense_hidden / n_groups)
        grouped = F if scope == "ffn" else d_model
        if grouped % n_groups:
            raise ValueError(
                f"ffn.n_groups={n_groups} must divide the grouped width "
                f"({'hidden_dim' if scope == 'ffn' else 'd_model'}={grouped})"
            )
        if share_routing and scope != "hidden":
            raise ValueError("ffn.share_routing=true needs ffn.scope=hidden (the attention routes D-groups)")
        self.scope, self.D, self.F, self.G, self.A, self.g = scope, d_model, F, n_groups, n_active, grouped // n_groups
        self.layer_idx, self.backend, self.balance_loss_coef, self.share_routing = (
            layer_idx,
            backend,
            balance_loss_coef,
            share_routing,
        )
        self.routing = GroupRouter(d_model, n_groups, n_active, n_shared, scoring, scaling)
        # scope ffn: columns of w_in are G blocks of [gate g | up g]; scope hidden: [gate F | up F]
        self.w_in_DH = nn.Parameter(torch.empty(d_model, 2 * F))
        self.w_out_FD = nn.Parameter(torch.empty(F, d_model))
        self.fusion = GroupFusion(n_groups, self.g, fusion)
        self.init_parameters(0.02, 0.02)

    def init_parameters(self, std: float, residual_std: float) -> None:
        nn.init.normal_(self.w_in_DH, 0.0, std)
        nn.init.normal_(self.w_out_FD, 0.0, residual_std)

    def forward(self, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        if self.share_routing:
            key = f"mohd_routing/{self.layer_idx}"
            if key not in ctx.state:
                raise ValueError(
                    "ffn.share_routing=true needs model.attention=mohd_mha with the same n_groups in this layer"
                )
            r = ctx.state[key]
        else:
            r = self.routing(x_ND)
            self.routing.add_losses_and_metrics(
                r, ctx, self.balance_loss_coef, f"mohd/layer{self.layer_idx}", self.training
            )
        y_ND = self._ffn_scope(x_ND, r) if self.scope == "ffn" else self._hidden_scope(x_ND, r)
        return y_ND.view(B, T, D)

    def _ffn_scope(self, x_ND, r: GroupRouting):
        N, G = x_ND.shape[0], self.G
        x_ND, w_in_DH, w_out_FD = autocast_operands(x_ND, self.w_in_DH, self.w_out_FD)  # kernels outside autocast
        ones_NA = torch.ones_like(r.coef_NA, dtype=x_ND.dtype)
        h_NGc = group_out_matmul(x_ND, r.ids_NA, ones_NA, w_in_DH, G, self.backend).view(N, G, 2, self.g)
        a_NGg = self.fusion(Fn.silu(h_NGc[:, :, 0]) * h_NGc[:, :, 1], r.active_NG).to(x_ND.dtype)
        return group_in_matmul(a_NGg.reshape(N, self.F), r.ids_NA, r.coef_NA.to(x_ND.dtype), w_out_FD, G, self.backend)

    def _hidden_scope(self, x_ND, r: GroupRouting):
        N, G = x_ND.shape[0], self.G
        x_ND, w_in_DH, w_out_FD = autocast_operands(x_ND, self.w_in_DH, self.w_out_FD)  # kernels outside autocast
        h_NH = group_in_matmul(x_ND, r.ids_NA, r.coef_NA.to(x_ND.dtype), w_in_DH, G, self.backend)
        gate_NF, up_NF = h_NH.chunk(2, dim=-1)
        a_NF = (Fn.silu(gate_NF) * up_NF).contiguous()
        ones_NA = torch.ones_like(r.coef_NA, dtype=x_ND.dtype)
        o_NGg = group_out_matmul(a_NF, r.ids_NA, ones_NA, w_out_FD, G, self.backend).view(N, G, self.g)
        return self.fusion(o_NGg, r.active_NG).reshape(N, self.D)

    def cost(self, setting: CostSetting) -> Cost:
        """The A of G active groups of W_in / W_out and of the fusion; the router (2·D·G) unless the
        attention's routing is reused (``share_routing``)."""
        active_share = self.A / self.G
        inactive = 3 * self.D * self.F * (1 - active_share) + self.fusion.inactive_count(self.A)
        if self.share_routing:
            inactive += numel(self.routing)
        router_flops = 0.0 if self.share_routing else linear_flops(self.routing)
        return Cost(
            {id(self): numel(self) - inactive},
            matmul_flops=router_flops + 2 * 3 * self.D * self.F * active_share + self.fusion.active_flops(self.A),
        )

    def inactive_parameters(self) -> int:
        """Parameters a token does not use: the inactive groups' share of W_in/W_out and of fusion."""
        return round(3 * self.D * self.F * (self.G - self.A) / self.G) + self.fusion.inactive_count(self.A)


def parameter_counts(model: nn.Module, exclude_embeddings: bool = False) -> dict[str, int]:
    """Total and per-token activated parameters of a model with MoHD blocks (any module with
    ``inactive_parameters()``); a dense model has activated == total."""
    total = (
        model.num_parameters(exclude_embeddings)
        if hasattr(model, "num_parameters")
        else sum(p.numel() for p in model.parameters())
    )
    inactive = sum(m.inactive_parameters() for m in model.modules() if hasattr(m, "inactive_parameters"))
    return {"total": total, "activated": total - inactive}
