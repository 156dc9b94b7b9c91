"""Dense SwiGLU feed-forward (Shazeer 2020), the LLaMA MLP.

Legend: B batch, T tokens, D d_model, F hidden width.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from arch.cost import Cost, CostSetting, dense_cost
from arch.layers import ForwardContext, ModelShared
from arch.registry import Capabilities


class SwiGLUMLP(nn.Module):
    """y = W_down(silu(W_gate x) * W_up x).

    Options: ``hidden_dim`` (None → 8/3·D rounded up to ``multiple_of``), ``bias``.
    """

    capabilities = Capabilities(hf_export=("hidden_dim", "multiple_of", "bias"))

    def __init__(
        self,
        d_model: int,
        layer_idx: int,
        shared: ModelShared | None = None,
        *,
        hidden_dim: int | None = None,
        multiple_of: int = 32,
        bias: bool = False,
    ):
        super().__init__()
        if hidden_dim is None:
            hidden_dim = multiple_of * -(-int(8 * d_model / 3) // multiple_of)
        if hidden_dim <= 0:
            raise ValueError(f"ffn.hidden_dim must be positive, got {hidden_dim}")
        self.hidden_dim = hidden_dim
        self.w_gate_up = nn.Linear(d_model, 2 * hidden_dim, bias=bias)
        self.w_down = nn.Linear(hidden_dim, d_model, bias=bias)
        self.w_down.is_residual_projection = True

    def forward(self, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        gate_BTF, up_BTF = self.w_gate_up(x_BTD).chunk(2, dim=-1)
        return self.w_down(F.silu(gate_BTF) * up_BTF)

    def cost(self, setting: CostSetting) -> Cost:
        """Dense: every token reads all three matrices."""
        return dense_cost(self)
