"""Library attention backends: SDPA on expanded K/V heads, and flash-attn for plain GQA maps.

Legend (shape suffixes):
    B batch   T queries   S keys   H query heads   Hk key heads   Hv value heads
    d query/key head dim   dv value head dim

Both take inputs already validated by kernels.attention.ops (maps int64 on the device, explicit
positions pos_BT).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _visible_mask(pos_BT: torch.Tensor, S: int) -> torch.Tensor:
    """visible_B1TS: key j is visible to query i iff j <= pos[b, i] (broadcast over heads)."""
    keys_S = torch.arange(S, device=pos_BT.device)
    return (keys_S[None, None, :] <= pos_BT[:, :, None]).unsqueeze(1)


def attention_sdpa(
    q_BTHd,
    k_BSHkd,
    v_BSHvdv,
    k_head_H,
    v_head_H,
    pos_BT,
    causal: bool,
    scale: float,
    default_positions: bool,
    return_lse: bool,
    plain_gqa: bool = False,
):
    """Expand K/V to one head per query head with ``index_select`` (H/Hk times K's memory), then
    ``F.scaled_dot_product_attention``. Correct for every map and position set. With the default
    (contiguous GQA) maps, ``plain_gqa`` skips the copy and lets SDPA broadcast (``enable_gqa``).

    The lse is not exposed by SDPA, so ``return_lse`` recomputes it from explicit scores (T×S per
    head in memory); it is meant for checks, not for speed.
    """
    T, S = q_BTHd.shape[1], k_BSHkd.shape[1]
    q_BHTd = q_BTHd.transpose(1, 2)
    if plain_gqa:
        k_BHSd, v_BHSdv = k_BSHkd.transpose(1, 2), v_BSHvdv.transpose(1, 2)
    else:
        k_BHSd = k_BSHkd.index_select(2, k_head_H).transpose(1, 2)
        v_BHSdv = v_BSHvdv.index_select(2, v_head_H).transpose(1, 2)
    mask_B1TS, is_causal = None, False
    if causal and default_positions and T == S:
        is_causal = True  # lets SDPA pick its flash / memory-efficient kernels
    elif causal:
        mask_B1TS = _visible_mask(pos_BT, S)
    out_BHTdv = F.scaled_dot_product_attention(
        q_BHTd,
        k_BHSd,
        v_BHSdv,
        attn_mask=mask_B1TS,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=k_BHSd.shape[1] != q_BHTd.shape[1],
    )
    out_BTHdv = out_BHTdv.transpose(1, 2)
    if not return_lse:
        return out_BTHdv, None
    k_lse_BHSd = k_BSHkd.index_select(2, k_head_H).transpose(1, 2) if plain_gqa else k_BHSd
    scores_BHTS = scale * (q_BHTd.float() @ k_lse_BHSd.float().transpose(-1, -2))
    if causal:
        scores_BHTS = scores_BHTS.masked_fill(~_visible_mask(pos_BT, S), float("-inf"))
    return out_BTHdv, torch.logsumexp(scores_BHTS, dim=-1)


def attention_flash_attn(q_BTHd, k_BSHkd, v_BSHvdv, causal: bool, scale: float, return_lse: bool):
    """``flash_attn.flash_attn_func`` (FlashAttention-2). Only plain GQA maps, default positions,
    d == dv, fp16/bf16 on CUDA: the caller (ops) checks the maps and positions."""
    try:
        from flash_attn import flash_attn_func
    except ImportError as exc:
        raise ValueError(
            "backend='flash_attn' needs the flash-attn package (the 'gpu' extra); use backend='triton' or 'sdpa'"
        ) from exc
    if q_BTHd.device.type != "cuda" or q_BTHd.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"backend='flash_attn' needs fp16/bf16 CUDA tensors, got q {q_BTHd.dtype} on {q_BTHd.device}")
    if v_BSHvdv.shape[2] != k_BSHkd.shape[2] or v_BSHvdv.shape[3] != k_BSHkd.shape[3]:
        raise ValueError("backend='flash_attn' needs v with the same heads and head dim as k")
    # flash-attn aligns the causal mask to the bottom-right (query i at key S - T + i), like ours
    if return_lse:
        out_BTHd, lse_BHT, _ = flash_attn_func(
            q_BTHd, k_BSHkd, v_BSHvdv, softmax_scale=scale, causal=causal, return_attn_probs=True
        )
        return out_BTHd, lse_BHT
    return flash_attn_func(q_BTHd, k_BSHkd, v_BSHvdv, softmax_scale=scale, causal=causal), None
