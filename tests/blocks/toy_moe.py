"""A test-only routed FFN: the whole of what adding a block takes (tests/training/test_new_block.py).

Top-k routing over ``n_experts`` two-matrix ReLU experts (D → hidden → D), gathered per expert so
the compute is the routed compute. It declares its capabilities (expert banks and elastic widths,
no expert parallelism, no Hugging Face export) and answers its own cost; nothing else in the
framework names it.

Legend: B batch, T tokens, N = B·T, D d_model, E experts, K experts per token, F expert width.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from arch.cost import Cost, CostSetting, ExpertUse, linear_flops, numel
from arch.layers import ForwardContext, ModelShared
from arch.registry import Capabilities


class ToyMoEFFN(nn.Module):
    """y = Σ_k g_k · W2_e relu(W1_e x) over the top-k experts e of a linear router."""

    capabilities = Capabilities(expert_banks=True, elastic_width=True)

    def __init__(
        self,
        d_model: int,
        layer_idx: int,
        shared: ModelShared | None = None,
        *,
        n_experts: int = 4,
        top_k: int = 2,
        hidden: int = 16,
    ):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"ffn.top_k={top_k} must be in [1, n_experts={n_experts}]")
        self.E, self.top_k, self.F, self.D = n_experts, top_k, hidden, d_model
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.w1_EDF = nn.Parameter(torch.randn(n_experts, d_model, hidden) * 0.02)
        self.w2_EFD = nn.Parameter(torch.randn(n_experts, hidden, d_model) * 0.02)

    def forward(self, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x_ND = x_BTD.reshape(-1, self.D)
        scores_NE = self.router(x_ND).softmax(-1)
        selection_NE, k = scores_NE, min(ctx.elastic.top_k or self.top_k, self.E)
        if ctx.elastic.expert_mask_E is not None:  # elastic width: only the subset is routable
            mask_E = ctx.elastic.expert_mask_E.to(x_ND.device)
            selection_NE, k = scores_NE.masked_fill(~mask_E, float("-inf")), min(k, int(mask_E.sum()))
        ids_NK = selection_NE.topk(k, dim=-1).indices
        gates_NK = scores_NE.gather(1, ids_NK)
        y_ND = torch.zeros_like(x_ND)
        for e in range(self.E):  # a loop over experts: fine for a test block
            rows_S, slot_S = (ids_NK == e).nonzero(as_tuple=True)
            h_SF = torch.relu(x_ND[rows_S] @ self.w1_EDF[e])
            y_ND = y_ND.index_add(0, rows_S, gates_NK[rows_S, slot_S, None] * (h_SF @ self.w2_EFD[e]))
        return y_ND.view_as(x_BTD)

    def cost(self, setting: CostSetting) -> Cost:
        """The router in full, k experts of 2·D·F weights (4·D·F FLOPs) each."""
        routable = self.E if setting.routable_experts is None else setting.routable_experts
        k = min(setting.top_k or self.top_k, routable)
        per_expert = 2 * self.D * self.F
        return Cost(
            {id(self): numel(self.router)},
            experts={id(self): ExpertUse(k, per_expert, routable)},
            dropped={id(self): (self.E - routable) * per_expert},
            matmul_flops=linear_flops(self.router) + k * 2 * per_expert,
        )
