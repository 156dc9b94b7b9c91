"""Causal multi-head self-attention with RoPE: MHA, GQA (n_kv_heads < n_heads) and MQA (n_kv_heads=1).

Legend: B batch, T query length, S key length, D d_model, H query heads, Hk key/value heads, d head dim.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from arch.cost import Cost, CostSetting, causal_attention_flops, linear_flops, numel
from arch.layers import ForwardContext, ModelShared, RMSNorm, apply_rope
from arch.registry import Capabilities
from kernels.attention import attention


class MultiHeadAttention(nn.Module):
    """Pre-projection → RoPE → scaled dot-product attention → output projection.

    Options (YAML keys): ``n_kv_heads`` (None = n_heads), ``qk_norm`` (RMSNorm on q and k per
    head), ``bias`` (biases on the projections), ``backend`` (via
    ``kernels.attention.attention``: ``auto`` = the Triton flash kernel on CUDA, SDPA on CPU;
    ``sdpa``, ``triton``, ``flash_attn``, ``reference``).
    """

    capabilities = Capabilities(hf_export=("n_kv_heads", "qk_norm", "bias", "backend"))

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        layer_idx: int,
        shared: ModelShared | None = None,
        *,
        n_kv_heads: int | None = None,
        qk_norm: bool = False,
        bias: bool = False,
        backend: Literal["auto", "sdpa", "triton", "flash_attn", "reference"] = "auto",
    ):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not divisible by attention.n_kv_heads={n_kv_heads}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, d_model // n_heads
        self.layer_idx, self.backend = layer_idx, backend
        self.wq = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.wkv = nn.Linear(d_model, 2 * n_kv_heads * self.head_dim, bias=bias)
        self.wo = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        self.wo.is_residual_projection = True  # scaled init (GPT-2): std / sqrt(2 * n_layers)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else None

    def forward(self, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q_BTHd = self.wq(x_BTD).view(B, T, self.n_heads, self.head_dim)
        k_BTHd, v_BTHd = self.wkv(x_BTD).view(B, T, 2, self.n_kv_heads, self.head_dim).unbind(2)
        if self.q_norm is not None:
            q_BTHd, k_BTHd = self.q_norm(q_BTHd), self.k_norm(k_BTHd)
        q_BTHd = apply_rope(q_BTHd, ctx.cos_TF, ctx.sin_TF)
        k_BTHd = apply_rope(k_BTHd, ctx.cos_TF, ctx.sin_TF)
        if ctx.state.get("sgt_stash_qk"):  # SGT's entropy statistic reuses this pass's q (last row) and k
            ctx.state[("sgt_qk", self.layer_idx)] = (q_BTHd[:, -1:].detach(), k_BTHd.detach())
        if ctx.kv_cache is not None:
            k_BTHd, v_BTHd = ctx.kv_cache.update(ctx.next_cache_slot(), k_BTHd, v_BTHd)
        # T < S (decoding with a cache): query i sits at key position S - T + i, the kernel's default.
        out_BTHd = attention(q_BTHd, k_BTHd, v_BTHd, causal=True, backend=self.backend)
        return self.wo(out_BTHd.reshape(B, T, -1))

    def cost(self, setting: CostSetting) -> Cost:
        """Projections, causal QKᵀ + PV over all H heads, and n_kv_heads keys and values in the cache."""
        return Cost(
            {id(self): numel(self)},
            matmul_flops=linear_flops(self),
            attention_flops=causal_attention_flops(self.n_heads, self.head_dim, setting.seq_len),
            kv_bytes=2 * self.n_kv_heads * self.head_dim * setting.dtype_bytes,
        )
