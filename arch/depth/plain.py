"""The plain depth scheme: n_layers distinct blocks, run once each, in order."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from arch.cost import Cost, CostSetting, block_cost
from arch.layers import ForwardContext, ModelShared
from arch.registry import Capabilities


class PlainDepth(nn.Module):
    """Runs ``blocks[0] … blocks[n_layers-1]``. Other depth schemes (loops, ITT, SGT) share this interface:
    built from ``(n_layers, make_block, shared)`` and called as ``depth(x, ctx)``, and answer ``cost(setting)``."""

    capabilities = Capabilities(hf_export=())

    def __init__(self, n_layers: int, make_block: Callable[[int], nn.Module], shared: ModelShared | None = None):
        super().__init__()
        self.blocks = nn.ModuleList(make_block(i) for i in range(n_layers))

    def forward(self, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        active = ctx.elastic.active_layers  # elastic depth: skipped blocks pass the residual through
        for i, block in enumerate(self.blocks):
            if active is None or i in active:
                x_BTD = block(x_BTD, ctx)
        return x_BTD

    def cost(self, setting: CostSetting) -> Cost:
        """Each block that runs (elastic depth skips some), once."""
        total = Cost()
        for i, block in enumerate(self.blocks):
            if setting.runs(i):
                total = total + block_cost(block, setting)
        return total
