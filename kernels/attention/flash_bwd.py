"""Triton flash-attention backward in the FlashAttention-2 shape, for decoupled key/value head maps.

Legend (shape suffixes):
    B batch   T queries   S keys   H query heads   Hk key heads   Hv value heads   G heads of a group
    d query/key head dim   dv value head dim   M/N query/key block rows (BLOCK_M / BLOCK_N)

    δ_BHT = rowsum(dO ∘ O)                         (_attn_bwd_delta)
    P = exp(scale·QKᵀ − lse),  dP = dO Vᵀ,  dS = P ∘ (dP − δ)
    dK[g] = scale · Σ_{h: k_head[h]=g} dSₕᵀ Qₕ      (_attn_bwd_dkdv: one program per key block / group)
    dV[g] = Σ_{h: v_head[h]=g} Pₕᵀ dOₕ
    dQ = scale · dS K                              (_attn_bwd_dq: one program per query block / head)

Matrix multiplies per (query block, key block) pair. FlashAttention-2 needs five distinct
products: S = QKᵀ, dV += Pᵀ dO, dP = dO Vᵀ, dK += dSᵀ Q, dQ += dS K. Its single pass reaches five
by adding every key block's dQ share into one fp32 buffer with float atomics, whose summation
order (and so the rounding of dQ) changes from run to run. The default keeps results
deterministic (no atomics), in two passes:
    dK/dV pass  (key blocks outer, query blocks inner): S, dP, dV += Pᵀ dO, dK += dSᵀ Q   = 4
    dQ pass     (query blocks outer, key blocks inner): S, dP, dQ += dS K                  = 3
so each of the five FA2 products is issued once, and S and dP a second time in the dQ pass (7
in all: the deterministic two-kernel variant of FA2, as in Triton's fused-attention tutorial);
the recomputation is what determinism costs. ``deterministic=False`` runs FA2's single pass:
the dK/dV pass also issues dQ += dS K and adds it with fp32 atomics (ATOMIC_DQ), there is no
dQ pass, and the count is exactly FA2's 5. With decoupled maps (k_head != v_head) dK and dV are
grouped differently: the dK launch issues S, dP, dK (3; 4 with ATOMIC_DQ) and the dV launch
S, dV (2), plus the dQ pass's 3 in the deterministic mode (8 or 6 in all).

Causal masking is applied only where it can matter: each pass walks its inner blocks in a
masked part (blocks on the diagonal, and ragged tails), and a mask-free main loop over blocks
that every (query, key) pair of the tile may see, as the forward does. With explicit
``q_positions`` (any order) the dK/dV pass masks every block; the dQ pass still splits by the
tile's smallest position.

Many query heads share one key (value) head, so dK (dV) is a sum over query heads. It is reduced
*inside* the program that owns a key block of one key head and loops over that head's query heads
(a CSR list: heads sorted by map, plus offsets), so neither atomics nor a per-query-head buffer
is needed, and K/V are never expanded.

Non-finite inputs: rows whose forward output is NaN (kernels.attention.ops documents when) carry
a NaN lse and give NaN gradients wherever they reach. Masked blocks keep everything else clean:
the dQ pass loads keys from the first non-finite one (``first_bad_BH``) on as zeros, the dK/dV
pass loads NaN-lse rows as zeros, and both zero P and dS outside the mask after the matmuls, so a
value a row may not see never reaches a gradient through 0·inf.

Files: this module holds the δ preprocess, ``head_groups`` and the ``flash_bwd`` launcher; the dQ kernel
is in flash_bwd_dq.py, the dK/dV kernel in flash_bwd_dkdv.py, their autotune tables (and the ptxas
measurements behind them) in flash_bwd_configs.py.
"""

from __future__ import annotations

import torch

from kernels import HAS_TRITON, INTERPRET
from kernels.attention.flash import (
    LOG2E,
    _strides,
    block_dim,
    first_nonfinite_key,
    last_dim_contiguous,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from kernels.attention.flash_bwd_dkdv import _attn_bwd_dkdv
    from kernels.attention.flash_bwd_dq import _attn_bwd_dq

DELTA_BLOCK_M = 16 if INTERPRET else 64

if HAS_TRITON:

    @triton.jit
    def _attn_bwd_delta(
        o_ptr,
        do_ptr,
        delta_ptr,
        T,
        H,
        stride_ob,
        stride_ot,
        stride_oh,
        stride_dob,
        stride_dot,
        stride_doh,
        DV: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        """Grid (cdiv(T, BLOCK_M), B·H): δ_BHT = Σ_dv O·dO in fp32."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_dv = tl.arange(0, BLOCK_DV)
        mask = (offs_m < T)[:, None] & (offs_dv < DV)[None, :]
        o = tl.load(
            o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_dv[None, :], mask=mask, other=0.0
        )
        do = tl.load(
            do_ptr + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_dv[None, :],
            mask=mask,
            other=0.0,
        )
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(delta_ptr + pid_bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)


def head_groups(map_H: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of query heads by group: order_H (heads sorted by map, stable), offsets_G1 (int32).
    Device ops only (``searchsorted`` on the sorted map; ``bincount`` would sync on CUDA); groups
    no head maps to get an empty range."""
    sorted_H, order_H = torch.sort(map_H.long(), stable=True)
    bounds_G1 = torch.arange(n_groups + 1, device=map_H.device)
    offsets_G1 = torch.searchsorted(sorted_H, bounds_G1)
    return order_H.to(torch.int32), offsets_G1.to(torch.int32)


def flash_bwd(
    do_BTHdv,
    q_BTHd,
    k_BSHkd,
    v_BSHvdv,
    out_BTHdv,
    lse_BHT,
    k_head_H,
    v_head_H,
    pos_BT,
    causal: bool,
    scale: float,
    shared_map: bool,
    first_bad_BH=None,
    deterministic: bool = True,
):
    """Launch the backward; returns dq_BTHd, dk_BSHkd, dv_BSHvdv in the inputs' dtypes.

    `shared_map`: k_head == v_head elementwise (and Hk == Hv), so dK and dV share one launch.
    `first_bad_BH`: as for flash_fwd (computed here when not given).
    `deterministic=False`: FA2's single pass (dQ added with fp32 atomics inside the dK launch, no
    dQ pass): 5 matmuls per block pair, but the summation order of dQ varies run to run. fp32 inputs
    always take the deterministic two passes: no fp32 tile holds the single pass's extra dQ tile without
    spilling (ptxas: 16 - 40 B at the one spill-free fp32 dK/dV tile, see flash_bwd_configs._fp32_configs).
    """
    do_BTHdv, q_BTHd, k_BSHkd, v_BSHvdv = (last_dim_contiguous(x) for x in (do_BTHdv, q_BTHd, k_BSHkd, v_BSHvdv))
    B, T, H, d = q_BTHd.shape
    S, Hk, Hv, dv = k_BSHkd.shape[1], k_BSHkd.shape[2], v_BSHvdv.shape[2], v_BSHvdv.shape[3]
    deterministic = deterministic or q_BTHd.dtype == torch.float32
    dq_BTHd = torch.empty_like(q_BTHd)
    dk_BSHkd = torch.empty(B, S, Hk, d, device=k_BSHkd.device, dtype=k_BSHkd.dtype)
    dv_BSHvdv = torch.empty(B, S, Hv, dv, device=v_BSHvdv.device, dtype=v_BSHvdv.dtype)
    if B == 0 or T == 0:
        return dq_BTHd.zero_(), dk_BSHkd.zero_(), dv_BSHvdv.zero_()
    has_pos = pos_BT is not None
    pos_arg = pos_BT if has_pos else k_head_H  # never read when HAS_POS is False
    if first_bad_BH is None:
        first_bad_BH = first_nonfinite_key(k_BSHkd, v_BSHvdv, k_head_H, v_head_H)
    shapes = dict(D=d, DV=dv, CAUSAL=causal, HAS_POS=has_pos, BLOCK_D=block_dim(d), BLOCK_DV=block_dim(dv))

    delta_BHT = torch.empty(B, H, T, device=q_BTHd.device, dtype=torch.float32)
    _attn_bwd_delta[(triton.cdiv(T, DELTA_BLOCK_M), B * H)](
        out_BTHdv,
        do_BTHdv,
        delta_BHT,
        T,
        H,
        *_strides(out_BTHdv),
        *_strides(do_BTHdv),
        DV=dv,
        BLOCK_DV=block_dim(dv),
        BLOCK_M=DELTA_BLOCK_M,
    )

    if deterministic:
        _attn_bwd_dq[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)](
            q_BTHd,
            k_BSHkd,
            v_BSHvdv,
            do_BTHdv,
            dq_BTHd,
            lse_BHT,
            delta_BHT,
            pos_arg,
            k_head_H,
            v_head_H,
            first_bad_BH,
            scale * LOG2E,
            scale,
            T,
            S,
            H,
            *_strides(q_BTHd),
            *_strides(k_BSHkd),
            *_strides(v_BSHvdv),
            *_strides(do_BTHdv),
            *_strides(dq_BTHd),
            **shapes,
        )
        dq_acc_BTHd = delta_BHT  # never written (ATOMIC_DQ is False): a placeholder fp32 pointer
        dq_strides = (0, 0, 0)
    else:
        dq_acc_BTHd = torch.zeros(B, T, H, d, device=q_BTHd.device, dtype=torch.float32)
        dq_strides = _strides(dq_acc_BTHd)

    # (map, groups, DO_DK, DO_DV): one fused launch, or dK grouped by k_head then dV by v_head
    launches = [(k_head_H, Hk, True, True)]
    if not shared_map:
        launches = [(k_head_H, Hk, True, False), (v_head_H, Hv, False, True)]
    for map_H, G, do_dk, do_dv in launches:
        order_H, offsets_G1 = head_groups(map_H, G)
        _attn_bwd_dkdv[lambda meta, G=G: (triton.cdiv(S, meta["BLOCK_N"]), B * G)](
            q_BTHd,
            k_BSHkd,
            v_BSHvdv,
            do_BTHdv,
            dk_BSHkd,
            dv_BSHvdv,
            dq_acc_BTHd,
            lse_BHT,
            delta_BHT,
            pos_arg,
            k_head_H,
            v_head_H,
            order_H,
            offsets_G1,
            first_bad_BH,
            scale * LOG2E,
            scale,
            T,
            S,
            H,
            G,
            *_strides(q_BTHd),
            *_strides(k_BSHkd),
            *_strides(v_BSHvdv),
            *_strides(do_BTHdv),
            *_strides(dk_BSHkd),
            *_strides(dv_BSHvdv),
            *dq_strides,
            DO_DK=do_dk,
            DO_DV=do_dv,
            ATOMIC_DQ=do_dk and not deterministic,
            **shapes,
        )
    if not deterministic:
        dq_BTHd = dq_acc_BTHd.to(q_BTHd.dtype)
    return dq_BTHd, dk_BSHkd, dv_BSHvdv
