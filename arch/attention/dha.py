"""Decoupled-Head Attention (DHA; Chen et al. 2024, arXiv 2406.06567; METHODS.md §4, §9.4).

Every layer keeps H query heads but has its own number of key heads g_K and value heads g_V,
chosen independently (they may differ from each other and between layers). Query head h reads
key head ``k_map[h]`` and value head ``v_map[h]``; the maps need not be contiguous groups. The
maps go to ``kernels.attention.attention`` as ``k_head`` / ``v_head``, so the Triton path never
expands K or V, and the KV cache holds only the g_K + g_V shared heads.

``HeadFusionAttention`` is the fusion stage of the MHA → DHA conversion (``recipes/dha/fusion.py``).

Legend: B batch, T query length, S key length, D d_model, H query heads, Gk key heads (g_K),
Gv value heads (g_V), d head dim, c fusion-weight channels (1 or d).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from arch.cost import Cost, CostSetting, causal_attention_flops, linear_flops, numel
from arch.layers import ForwardContext, ModelShared, RMSNorm, apply_rope
from arch.registry import ConfigError
from kernels.attention import attention


def contiguous_map(n_heads: int, n_groups: int) -> list[int]:
    """GQA's contiguous map h → ⌊h·g/H⌋; every group is non-empty for any 1 <= g <= H."""
    return [h * n_groups // n_heads for h in range(n_heads)]


def check_head_map(map_H, n_heads: int, n_groups: int, where: str) -> list[int]:
    """Validate a query-head → shared-head map: H ints in [0, g), every shared head used by a query."""
    if (
        not isinstance(map_H, (list, tuple))
        or len(map_H) != n_heads
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in map_H)
    ):
        raise ConfigError(f"{where}={map_H!r} must be a list of {n_heads} integers (one shared head per query head)")
    if any(not 0 <= i < n_groups for i in map_H):
        raise ConfigError(
            f"{where}={list(map_H)} has values outside [0, {n_groups}); the layer has {n_groups} shared heads"
        )
    unused = sorted(set(range(n_groups)) - set(map_H))
    if unused:
        raise ConfigError(
            f"{where}={list(map_H)} never uses shared heads {unused}: each of the {n_groups} heads needs a query head"
        )
    return [int(i) for i in map_H]


def layer_heads(counts, maps, n_heads: int, n_layers: int, layer_idx: int, key: str) -> tuple[int, list[int]]:
    """(g, query → shared-head map) of one layer from the per-layer YAML options ``<key>_heads`` / ``<key>_maps``.

    counts: None (every layer MHA), an int (every layer), or a per-layer list of ints / None (= H).
    maps: None (contiguous maps), or a per-layer list of maps / None. A map with a null count
    infers g = max(map) + 1.
    """
    where_c, where_m = f"model.attention.{key}_heads", f"model.attention.{key}_maps"
    count = _per_layer(counts, n_layers, layer_idx, where_c)
    map_H = _per_layer(maps, n_layers, layer_idx, where_m)
    if count is None:
        count = n_heads if map_H is None else max(map_H) + 1 if isinstance(map_H, (list, tuple)) and map_H else 0
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= n_heads:
        raise ConfigError(
            f"{where_c}[{layer_idx}]={count!r} must be an integer in [1, n_heads={n_heads}] or null (= n_heads, MHA)"
        )
    if map_H is None:
        return count, contiguous_map(n_heads, count)
    return count, check_head_map(map_H, n_heads, count, f"{where_m}[{layer_idx}]")


def _per_layer(value, n_layers: int, layer_idx: int, where: str):
    if value is None or isinstance(value, int):
        return value
    if not isinstance(value, (list, tuple)) or len(value) != n_layers:
        raise ConfigError(
            f"{where}={value!r} must be null, an int, or a list with one entry per layer ({n_layers} layers)"
        )
    return value[layer_idx]


class DecoupledHeadAttention(nn.Module):
    """Causal self-attention with H query heads, g_K shared key heads and g_V shared value heads.

    Options (YAML keys, per-layer lists of length n_layers): ``k_heads`` / ``v_heads`` (g_K, g_V;
    null = n_heads), ``k_maps`` / ``v_maps`` (query-head → key/value-head maps; null = contiguous),
    ``qk_norm``, ``bias``, ``backend`` (as in ``mha``). Conversions write explicit maps.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        layer_idx: int,
        shared: ModelShared | None = None,
        *,
        k_heads: int | list | None = None,
        v_heads: int | list | None = None,
        k_maps: list | None = None,
        v_maps: list | None = None,
        qk_norm: bool = False,
        bias: bool = False,
        backend: Literal["auto", "sdpa", "triton", "reference"] = "auto",
    ):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        n_layers = shared.n_layers if shared is not None else layer_idx + 1
        self.n_k_heads, k_map = layer_heads(k_heads, k_maps, n_heads, n_layers, layer_idx, "k")
        self.n_v_heads, v_map = layer_heads(v_heads, v_maps, n_heads, n_layers, layer_idx, "v")
        self.n_heads, self.head_dim, self.layer_idx, self.backend = n_heads, d_model // n_heads, layer_idx, backend
        # Maps are config, not weights: non-persistent, rebuilt from the YAML on load.
        self.register_buffer("k_head_H", torch.tensor(k_map, dtype=torch.long), persistent=False)
        self.register_buffer("v_head_H", torch.tensor(v_map, dtype=torch.long), persistent=False)
        self.wq = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        # One GEMM for keys and values: rows [0, Gk·d) are the key heads, the rest the value heads.
        self.wkv = nn.Linear(d_model, (self.n_k_heads + self.n_v_heads) * self.head_dim, bias=bias)
        self.wo = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        self.wo.is_residual_projection = True
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else None

    def forward(self, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q_BTHd = self.wq(x_BTD).view(B, T, self.n_heads, self.head_dim)
        kv_BTGd = self.wkv(x_BTD).view(B, T, self.n_k_heads + self.n_v_heads, self.head_dim)
        k_BTGkd, v_BTGvd = kv_BTGd.split([self.n_k_heads, self.n_v_heads], dim=2)
        if self.q_norm is not None:
            q_BTHd, k_BTGkd = self.q_norm(q_BTHd), self.k_norm(k_BTGkd)
        q_BTHd = apply_rope(q_BTHd, ctx.cos_TF, ctx.sin_TF)
        k_BTGkd = apply_rope(k_BTGkd, ctx.cos_TF, ctx.sin_TF)
        if ctx.kv_cache is not None:  # only the shared heads are cached: (g_K + g_V)·d per token
            k_BTGkd, v_BTGvd = ctx.kv_cache.update(ctx.next_cache_slot(), k_BTGkd, v_BTGvd)
        out_BTHd = attention(
            q_BTHd, k_BTGkd, v_BTGvd, causal=True, k_head=self.k_head_H, v_head=self.v_head_H, backend=self.backend
        )
        return self.wo(out_BTHd.reshape(B, T, -1))

    def kv_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """KV-cache bytes one token costs in this layer: (g_K + g_V)·d·bytes."""
        return (self.n_k_heads + self.n_v_heads) * self.head_dim * bytes_per_element

    def cost(self, setting: CostSetting) -> Cost:
        """Projections (g_K + g_V shared heads in wkv), causal QKᵀ + PV over all H query heads,
        and the g_K + g_V shared heads in the cache."""
        return Cost(
            {id(self): numel(self)},
            matmul_flops=linear_flops(self),
            attention_flops=causal_attention_flops(self.n_heads, self.head_dim, setting.seq_len),
            kv_bytes=self.kv_bytes_per_token(setting.dtype_bytes),
        )


def kv_bytes_per_token(model: nn.Module, bytes_per_element: int = 2) -> dict:
    """KV-cache bytes per token of every layer's attention (any block: its own ``cost()``) and their total.

    Returns {"per_layer": [bytes of layer 0, 1, …], "total": Σ}. bytes_per_element 2 = bf16/fp16.
    One call per layer; depth schemes that run a layer several times cache more (see its ``cost()``).
    """
    setting = CostSetting(1, training=False, dtype_bytes=bytes_per_element)
    layers = [int(block.attn.cost(setting).kv_bytes) for block in model.depth.blocks]
    return {"per_layer": layers, "total": sum(layers)}


class HeadFusionAttention(nn.Module):
    """An MHA layer during DHA's fusion stage (METHODS.md §4(a) stage 2; parameterisation [RECON]).

    Key head i uses Ŵ^K_i = Σ_{j ∈ G^K(i)} ω^K_ij ⊙ W^K_j (values likewise with their own groups),
    ω = identity at the start, so the layer equals the wrapped MHA layer exactly. ``granularity``
    ``scalar`` gives one ω per head pair, ``channel`` one per pair and output channel ([RECON]).
    ``disagreement()`` measures how far the heads of each group are from agreeing.
    """

    def __init__(
        self,
        mha: nn.Module,
        k_groups_H: list[int],
        v_groups_H: list[int],
        granularity: Literal["scalar", "channel"] = "scalar",
    ):
        super().__init__()
        if mha.n_kv_heads != mha.n_heads:
            raise ValueError(f"fusion needs an MHA layer (n_kv_heads == n_heads), got n_kv_heads={mha.n_kv_heads}")
        if granularity not in ("scalar", "channel"):
            raise ConfigError(f"granularity={granularity!r} is invalid; allowed: ['scalar', 'channel']")
        H, d = mha.n_heads, mha.head_dim
        self.n_heads, self.head_dim, self.layer_idx, self.backend = H, d, mha.layer_idx, mha.backend
        self.wq, self.wkv, self.wo, self.q_norm, self.k_norm = mha.wq, mha.wkv, mha.wo, mha.q_norm, mha.k_norm
        self.groups = {"k": list(k_groups_H), "v": list(v_groups_H)}
        c = 1 if granularity == "scalar" else d
        for kind, groups_H in self.groups.items():
            g_H = torch.tensor(groups_H)
            self.register_buffer(f"{kind}_same_HH", (g_H[:, None] == g_H[None, :]).float(), persistent=False)
            setattr(self, f"omega_{kind}_HHc", nn.Parameter(torch.eye(H)[:, :, None].repeat(1, 1, c)))

    def fused_heads(self, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Ŵ (H, d, D) and bias (H, d) of the key (kind "k") or value ("v") heads."""
        H, d = self.n_heads, self.head_dim
        index = 0 if kind == "k" else 1
        w_HdD = self.wkv.weight.view(2, H, d, -1)[index]
        omega_HHc = getattr(self, f"omega_{kind}_HHc") * getattr(self, f"{kind}_same_HH")[:, :, None]
        fused_HdD = torch.einsum("ijc,jcD->icD", omega_HHc, w_HdD)
        if self.wkv.bias is None:
            return fused_HdD, None
        return fused_HdD, torch.einsum("ijc,jc->ic", omega_HHc, self.wkv.bias.view(2, H, d)[index])

    def forward(self, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        (wk_HdD, bk_Hd), (wv_HdD, bv_Hd) = self.fused_heads("k"), self.fused_heads("v")
        # Same (2·H·d, D) layout as MHA's wkv: at ω = I the GEMM is bit-for-bit MHA's.
        weight = torch.cat([wk_HdD, wv_HdD]).flatten(0, 1)
        bias = None if bk_Hd is None else torch.cat([bk_Hd, bv_Hd]).flatten()
        q_BTHd = self.wq(x_BTD).view(B, T, self.n_heads, self.head_dim)
        k_BTHd, v_BTHd = F.linear(x_BTD, weight, bias).view(B, T, 2, self.n_heads, self.head_dim).unbind(2)
        if self.q_norm is not None:
            q_BTHd, k_BTHd = self.q_norm(q_BTHd), self.k_norm(k_BTHd)
        q_BTHd = apply_rope(q_BTHd, ctx.cos_TF, ctx.sin_TF)
        k_BTHd = apply_rope(k_BTHd, ctx.cos_TF, ctx.sin_TF)
        if ctx.kv_cache is not None:
            k_BTHd, v_BTHd = ctx.kv_cache.update(ctx.next_cache_slot(), k_BTHd, v_BTHd)
        out_BTHd = attention(q_BTHd, k_BTHd, v_BTHd, causal=True, backend=self.backend)
        return self.wo(out_BTHd.reshape(B, T, -1))

    def disagreement(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ_groups Σ_{i∈G} ‖Ŵ_i − mean_G Ŵ‖², Σ_i ‖Ŵ_i‖²) over key and value heads (weights and biases).

        Σ_{i,i'∈G} ‖Ŵ_i − Ŵ_i'‖² = 2|G| Σ_{i∈G} ‖Ŵ_i − mean_G‖², so this is METHODS.md's pairwise
        fusion loss up to a per-group factor. The second term normalises it (relative disagreement).
        """
        spread, energy = 0.0, 0.0
        for kind in ("k", "v"):
            w_HdD, b_Hd = self.fused_heads(kind)
            flat_HF = w_HdD.flatten(1) if b_Hd is None else torch.cat([w_HdD.flatten(1), b_Hd], dim=1)
            same_HH = getattr(self, f"{kind}_same_HH")
            mean_HF = (same_HH @ flat_HF) / same_HH.sum(1, keepdim=True)  # each head's group mean
            spread = spread + (flat_HF - mean_HF).pow(2).sum()
            energy = energy + flat_HF.pow(2).sum()
        return spread, energy

    def cost(self, setting: CostSetting) -> Cost:
        """MHA's cost (all H key and value heads); fusing the head weights costs per forward, not per
        token, and is not counted (``setting.notes`` says so)."""
        setting.note("DHA fusion stage: fusing the head weights costs per forward, not per token; not counted")
        return Cost(
            {id(self): numel(self)},
            matmul_flops=linear_flops(self),
            attention_flops=causal_attention_flops(self.n_heads, self.head_dim, setting.seq_len),
            kv_bytes=2 * self.n_heads * self.head_dim * setting.dtype_bytes,
        )
