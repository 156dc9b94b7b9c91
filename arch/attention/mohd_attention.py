"""MoHD at the attention sublayer (scope ``hidden``, METHODS.md §3a [RECON] for D).

The attention input x (N, D) is split into G groups of D/G dimensions; a router keeps the
``n_shared`` groups and the top specialised ones, scales them (activation scaling), and the
projections read only those groups; the output projection writes only the active groups, which
group fusion then mixes before the residual add. Pair it with ``ffn: mohd`` at ``scope: hidden``
to sparsify both sublayer inputs. Routing options mean the same as in arch/ffn/mohd.py.

Projections run as an ordinary ``MultiHeadAttention`` on the gated input (x ⊙ c per group) with
its output masked to the active groups: the same numbers as gathering rows/columns of the
weights (``kernels.mohd``), without touching the attention module. The compute saving of the
gather is therefore not realised here; ``cost()`` still reports activated FLOPs.

Legend: B batch, T tokens, N = B·T, D d_model, G groups, A active groups, g = D/G.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from arch.attention.mha import MultiHeadAttention
from arch.cost import Cost, CostSetting, causal_attention_flops, linear_flops, numel
from arch.ffn.mohd import Fusion, GroupFusion, GroupRouter, Scaling
from arch.layers import ForwardContext, ModelShared
from kernels.mohd import dense_gates


class MoHDAttention(nn.Module):
    """Causal MHA/GQA whose input and output are restricted to routed sub-dimension groups of D."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        layer_idx: int,
        shared: ModelShared | None = None,
        *,
        n_groups: int = 8,
        n_active: int = 4,
        n_shared: int = 3,
        scoring: Literal["softmax", "sigmoid"] = "softmax",
        scaling: Scaling = "n_gate_sum",
        fusion: Fusion = "blockdiag",
        balance_loss_coef: float = 0.01,
        n_kv_heads: int | None = None,
        qk_norm: bool = False,
        bias: bool = False,
        backend: Literal["auto", "sdpa", "triton", "flash_attn", "reference"] = "auto",
    ):
        super().__init__()
        if d_model % n_groups:
            raise ValueError(f"attention.n_groups={n_groups} must divide d_model={d_model}")
        self.D, self.G, self.A, self.g, self.layer_idx = d_model, n_groups, n_active, d_model // n_groups, layer_idx
        self.balance_loss_coef = balance_loss_coef
        self.routing = GroupRouter(d_model, n_groups, n_active, n_shared, scoring, scaling)
        self.attn = MultiHeadAttention(
            d_model, n_heads, layer_idx, shared, n_kv_heads=n_kv_heads, qk_norm=qk_norm, bias=bias, backend=backend
        )
        self.fusion = GroupFusion(n_groups, self.g, fusion)

    def forward(self, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        r = self.routing(x_ND)
        self.routing.add_losses_and_metrics(
            r, ctx, self.balance_loss_coef, f"mohd_attn/layer{self.layer_idx}", self.training
        )
        ctx.state[f"mohd_routing/{self.layer_idx}"] = r  # for ffn.share_routing
        coef_NG = dense_gates(r.ids_NA, r.coef_NA, self.G).to(x_ND.dtype)
        x_in = (x_ND.view(-1, self.G, self.g) * coef_NG[..., None]).view(B, T, D)
        o_NGg = self.attn(x_in, ctx).reshape(-1, self.G, self.g)
        return self.fusion(o_NGg, r.active_NG).reshape(B, T, D)

    def cost(self, setting: CostSetting) -> Cost:
        """The projections read (q, k, v) and write (o) only the A of G active groups of D; scores run on
        every head, and the cache holds every key/value head (the projections output all of them)."""
        mha, active_share = self.attn, self.A / self.G
        projection_weights = self.D * (mha.wq.out_features + mha.wkv.out_features + mha.wo.in_features)
        inactive = projection_weights * (1 - active_share) + self.fusion.inactive_count(self.A)
        return Cost(
            {id(self): numel(self) - inactive},
            matmul_flops=linear_flops(self.routing)
            + linear_flops(mha) * active_share
            + self.fusion.active_flops(self.A),
            attention_flops=causal_attention_flops(mha.n_heads, mha.head_dim, setting.seq_len),
            kv_bytes=2 * mha.n_kv_heads * mha.head_dim * setting.dtype_bytes,
        )

    def inactive_parameters(self) -> int:
        a = self.attn
        proj = self.D * (a.wq.out_features + a.wkv.out_features + a.wo.in_features)
        return round(proj * (self.G - self.A) / self.G) + self.fusion.inactive_count(self.A)
