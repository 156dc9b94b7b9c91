"""Multi-Head Mixture-of-Experts (MH-MoE; Wu, Huang, Wang, Ma, Dong, Wei, NeurIPS 2024).

Each token is projected (``W_mh``, Linear D→D), split into h sub-tokens of width D/h, and every
sub-token is routed independently to experts of width D/h; the sub-token outputs are concatenated
back to width D and merged by ``W_merge`` (Linear D→D), as in the official layer
(``yushuiwx/MH-MoE``, ``tools/torchscale-moe/torchscale/component/xmoe/mhmoe_layer.py``; METHODS.md §8.1
[CODE]): both projections have a bias, W_mh is Xavier-uniform with gain 1/√2 (its bias keeps
nn.Linear's default init), W_merge is Xavier-uniform with bias 0, and the balance loss is computed over
the N·h sub-tokens.

The outputs equal the official layer's only with ``renormalize=false`` (the official top-2 gate keeps
the raw softmax probabilities when no slot is dropped) and ``capacity_factor=1`` (its capacity
2·⌈S/E⌉ at k = 2); its balance loss counts each sub-token's top-1 choice before capacity drops,
which is ``balance_loss_counts=top1_before_drop``. The defaults here (renormalize=true, dropless,
all_slots) are this framework's and do not match it.

Routing, balancing, top-k and metrics are MoEFFN's, run on (B, T·h, D/h): this class only adds the
split and the merge, so every routing fix in MoEFFN applies here too. The experts run through the
same ``kernels.moe.expert_mlp`` call with N·h rows of width D/h.

Legend: B batch, T tokens, D d_model, h heads (sub-tokens per token), S = D/h sub-token width,
N = B·T tokens, E experts, F expert width, K top-k.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn

from arch.ffn.moe import MoEFFN
from arch.layers import ForwardContext, ModelShared
from arch.registry import Capabilities


class MultiHeadMoEFFN(MoEFFN):
    """MH-MoE: split into ``n_heads`` sub-tokens → MoE on width D/h → merge.

    ``expert_hidden=None`` sizes experts at (8/3·D)/top_k, as ``ffn=moe`` does for the full width:
    h sub-tokens × k experts × 3·(D/h)·F then activate the same FLOPs per token as a top-k MoE.
    """

    # Elastic widths are not offered (never validated for sub-token routing); no HF counterpart.
    capabilities = Capabilities(expert_banks=True, expert_parallel=True)

    def __init__(
        self,
        d_model: int,
        layer_idx: int,
        shared: ModelShared | None = None,
        *,
        n_heads: int = 4,
        n_experts: int = 8,
        top_k: int = 2,
        expert_hidden: int | None = None,
        scoring: Literal["softmax", "sigmoid"] = "softmax",
        renormalize: bool = True,
        router: Literal["linear", "xmoe", "xmoe_cosine"] = "linear",
        router_noise: float = 0.0,
        capacity_factor: float | None = None,
        balance_loss_coef: float = 0.01,
        balance_loss_counts: Literal["all_slots", "top1_before_drop"] = "all_slots",
        z_loss_coef: float = 0.0,
        bias_update_rate: float = 0.0,
        eval_top_k: int | None = None,
        backend: Literal["auto", "triton", "torch", "reference"] = "auto",
    ):
        if n_heads < 1 or d_model % n_heads:
            raise ValueError(f"ffn.n_heads={n_heads} must divide d_model={d_model}")
        if expert_hidden is None:  # the full-width MoE's default, not the sub-token width's
            dense_hidden = 32 * math.ceil(int(8 * d_model / 3) / 32)
            expert_hidden = max(8, round(dense_hidden / top_k))
        super().__init__(
            d_model // n_heads,
            layer_idx,
            shared,
            n_experts=n_experts,
            top_k=top_k,
            expert_hidden=expert_hidden,
            scoring=scoring,
            renormalize=renormalize,
            router=router,
            router_noise=router_noise,
            capacity_factor=capacity_factor,
            balance_loss_coef=balance_loss_coef,
            balance_loss_counts=balance_loss_counts,
            z_loss_coef=z_loss_coef,
            bias_update_rate=bias_update_rate,
            eval_top_k=eval_top_k,
            backend=backend,
        )
        self.n_heads, self.full_d_model = n_heads, d_model
        self.head_proj = nn.Linear(d_model, d_model, bias=True)  # W_mh ("multi_heads" in the official code)
        self.merge_proj = nn.Linear(d_model, d_model, bias=True)  # W_merge ("out_proj")
        self._init_projections()

    def _init_projections(self) -> None:
        nn.init.xavier_uniform_(self.head_proj.weight, gain=1 / math.sqrt(2))
        bound = 1 / math.sqrt(self.full_d_model)  # nn.Linear's default bias init, which the official code keeps
        nn.init.uniform_(self.head_proj.bias, -bound, bound)
        nn.init.xavier_uniform_(self.merge_proj.weight)
        nn.init.zeros_(self.merge_proj.bias)

    def init_parameters(self, std: float, residual_std: float) -> None:
        # The model's initialiser visits the projections (as nn.Linear) before this module; the
        # official init replaces its normal(0, std) draw.
        super().init_parameters(std, residual_std)
        if hasattr(self, "merge_proj"):  # MoEFFN.__init__ calls this before the projections exist
            self._init_projections()

    def forward(self, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, D = x_BTD.shape
        sub_BTxhS = self.head_proj(x_BTD).reshape(B, T * self.n_heads, D // self.n_heads)
        y_BTxhS = super().forward(sub_BTxhS, ctx)  # routing, experts, balance loss over N·h sub-tokens
        return self.merge_proj(y_BTxhS.reshape(B, T, D))

    @property
    def sub_tokens(self) -> int:  # MoEFFN.cost: router and k experts per sub-token
        return self.n_heads

    def projections(self) -> tuple[nn.Module, ...]:
        return (self.head_proj, self.merge_proj)
