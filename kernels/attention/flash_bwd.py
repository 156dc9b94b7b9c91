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

    from kernels.attention.flash import _load_rows, _query_positions, prune_by_head_dim

DELTA_BLOCK_M = 16 if INTERPRET else 64


def _dq_configs():
    """(config, largest padded head dim) for dQ. Measured (bf16): the 4-warp 64 × 64 tile and the
    8-warp 128 × 64 tile are clean at d = 64 but spill at d = 128 on sm_80 (24 B, 40 B; 8-warp
    128 × 64 without pipelining: 668 B), so they are pruned there."""
    cfg = triton.Config
    return [
        (cfg({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3), 64),
        (cfg({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2), 64),
        (cfg({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=2), 128),
        (cfg({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=2), 128),
        (cfg({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2), 128),  # small: fp32 at d=128 fits here
    ]


def _dkdv_configs():
    """(config, largest padded head dim) for dK/dV. Two fp32 accumulators of BLOCK_N × d live
    across the whole query loop, with K and V (the A operands of two matmuls) beside them.
    Measured with ptxas (bf16, sm_90a / sm_80): 4 warps spill at d = 128 for every tile tried
    (24 - 940 B), BLOCK_M = 64 spills at both head dims (20 - 940 B), and software pipelining
    (num_stages = 2) adds 4 - 400 B; only BLOCK_M = 32 on 8 warps without pipelining is clean at
    d = 128, and BLOCK_N = 128 only up to d = 64 (at 128: 4 B on sm_90a, 460 B on sm_80).
    The single pass (ATOMIC_DQ) holds a dQ tile as well: BLOCK_M = 32 spills with it (72 B at
    d = 128 on sm_90a, 24 - 32 B at d = 64 on sm_80), so the third column (the largest head dim
    with ATOMIC_DQ) gives it only the 16-row config. The fp32 inputs at d = 128 fit shared memory in the
    64-key configs."""
    cfg = triton.Config
    return [
        (cfg({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8, num_stages=1), 64, 0),
        (cfg({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=8, num_stages=1), 128, 0),
        (cfg({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=8, num_stages=1), 0, 128),
    ]


def _interp_configs():
    return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]


def _fp32_configs():
    """(dQ, dK/dV) configs for fp32 inputs, the only ones they run on. Measured with ptxas at d = 128
    (sm_90a / sm_80): every table config spills in fp32 (dQ 64 × 32: 128 B; dK/dV 32 × 64: 480 B on
    sm_90a), as do dQ 32 × 64 (40 / 20 B), dQ 64 × 32 on 8 warps (248 B), dK/dV 16 × 64 (1,564 / 280 B),
    the dV-only dK/dV launch at 32 × 32 (16 B on sm_90a) and the single-output launches at 16 × 32 on 8 warps
    (capped at 128 registers: 24 - 40 B). Clean without pipelining: dQ 32 × 32 on 8 warps
    (146 / 154 registers) and dK/dV 16 × 32 on 4 warps (150 - 241) in every deterministic launch kind."""
    cfg = triton.Config
    return (
        cfg({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=8, num_stages=1),
        cfg({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1),
    )


if HAS_TRITON:
    DQ_TABLE, DKDV_TABLE = _dq_configs(), _dkdv_configs()
    FP32_DQ_CONFIG, FP32_DKDV_CONFIG = _fp32_configs()
    DQ_CONFIGS = [e[0] for e in DQ_TABLE] + [FP32_DQ_CONFIG]
    DKDV_CONFIGS = [e[0] for e in DKDV_TABLE] + [FP32_DKDV_CONFIG]
    ACTIVE_DQ_CONFIGS = _interp_configs() if INTERPRET else DQ_CONFIGS
    ACTIVE_DKDV_CONFIGS = _interp_configs() if INTERPRET else DKDV_CONFIGS

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

    @triton.jit
    def _dq_block(
        dq,
        q,
        do,
        lse2,
        delta,
        pos,
        k_base,
        v_base,
        stride_ks,
        stride_vs,
        start_n,
        S,
        key_lim,
        scale_log2,
        offs_n,
        offs_d,
        offs_dv,
        D: tl.constexpr,
        DV: tl.constexpr,
        CAUSAL: tl.constexpr,
        MASKED: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr,
    ):
        """dQ += dS K for one key block: S, dP and dQ (3 matmuls). MASKED blocks check key bounds and
        causality, and load keys from `key_lim` on as zeros (unseen keys must not reach dQ via 0·inf)."""
        cols = start_n + offs_n
        col_ok = cols < S
        load_ok = cols < key_lim
        k = _load_rows(k_base + cols[:, None] * stride_ks + offs_d[None, :], load_ok, offs_d < D, MASKED, D != BLOCK_D)
        v = _load_rows(
            v_base + cols[:, None] * stride_vs + offs_dv[None, :], load_ok, offs_dv < DV, MASKED, DV != BLOCK_DV
        )
        p = tl.exp2(tl.dot(q, tl.trans(k)) * scale_log2 - lse2[:, None])
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        if MASKED:
            ok = col_ok[None, :]
            if CAUSAL:
                ok = ok & (cols[None, :] <= pos[:, None])
            ds = tl.where(ok, ds, 0.0)
        return dq + tl.dot(ds.to(k.dtype), k)

    @triton.autotune(
        configs=ACTIVE_DQ_CONFIGS,
        key=["D", "DV", "CAUSAL", "HAS_POS"],
        prune_configs_by={"early_config_prune": prune_by_head_dim(DQ_TABLE, FP32_DQ_CONFIG)},
    )
    @triton.jit
    def _attn_bwd_dq(
        q_ptr,
        k_ptr,
        v_ptr,
        do_ptr,
        dq_ptr,
        lse_ptr,
        delta_ptr,
        pos_ptr,
        k_head_ptr,
        v_head_ptr,
        first_bad_ptr,
        scale_log2,
        scale,
        T,
        S,
        H,
        stride_qb,
        stride_qt,
        stride_qh,
        stride_kb,
        stride_ks,
        stride_kh,
        stride_vb,
        stride_vs,
        stride_vh,
        stride_dob,
        stride_dot,
        stride_doh,
        stride_dqb,
        stride_dqt,
        stride_dqh,
        D: tl.constexpr,
        DV: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_POS: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """Grid (cdiv(T, BLOCK_M), B·H): dq_BTHd for one query block of one head."""
        # causal: later query blocks see more keys; launch them first so the tail of the grid is short
        if CAUSAL:
            pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        else:
            pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = pid_bh % H
        kh = tl.load(k_head_ptr + h).to(tl.int64)
        vh = tl.load(v_head_ptr + h).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        row_ok = offs_m < T
        q = _load_rows(
            q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
            row_ok,
            offs_d < D,
            True,
            D != BLOCK_D,
        )
        do = _load_rows(
            do_ptr + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_dv[None, :],
            row_ok,
            offs_dv < DV,
            True,
            DV != BLOCK_DV,
        )
        lse2 = tl.load(lse_ptr + pid_bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + pid_bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
        pos = _query_positions(pos_ptr, b, offs_m, row_ok, T, S, HAS_POS)
        if CAUSAL:  # keys [0, hi) are seen by some row; [0, full) by every row of the tile
            hi = tl.minimum(tl.max(tl.where(row_ok, pos, 0), 0) + 1, S)
            full = (tl.min(pos, 0) + 1) // BLOCK_N * BLOCK_N
        else:
            hi = S
            full = S // BLOCK_N * BLOCK_N
        k_base = k_ptr + b * stride_kb + kh * stride_kh
        v_base = v_ptr + b * stride_vb + vh * stride_vh
        key_lim = tl.minimum(tl.load(first_bad_ptr + pid_bh), S)

        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, full, BLOCK_N):
            dq = _dq_block(
                dq,
                q,
                do,
                lse2,
                delta,
                pos,
                k_base,
                v_base,
                stride_ks,
                stride_vs,
                start_n,
                S,
                key_lim,
                scale_log2,
                offs_n,
                offs_d,
                offs_dv,
                D,
                DV,
                CAUSAL,
                False,
                BLOCK_D,
                BLOCK_DV,
            )
        for start_n in range(full, hi, BLOCK_N):
            dq = _dq_block(
                dq,
                q,
                do,
                lse2,
                delta,
                pos,
                k_base,
                v_base,
                stride_ks,
                stride_vs,
                start_n,
                S,
                key_lim,
                scale_log2,
                offs_n,
                offs_d,
                offs_dv,
                D,
                DV,
                CAUSAL,
                True,
                BLOCK_D,
                BLOCK_DV,
            )
        dq_ptrs = dq_ptr + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :]
        tl.store(dq_ptrs, (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_d < D)[None, :])

    @triton.jit
    def _dkdv_block(
        dk,
        dv,
        k,
        v,
        q_base,
        do_base,
        lse_base,
        delta_base,
        dq_base,
        pos_ptr,
        b,
        start_m,
        cols,
        stride_qt,
        stride_dot,
        stride_dqt,
        T,
        S,
        scale_log2,
        scale,
        offs_m,
        offs_d,
        offs_dv,
        D: tl.constexpr,
        DV: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_POS: tl.constexpr,
        DO_DK: tl.constexpr,
        DO_DV: tl.constexpr,
        ATOMIC_DQ: tl.constexpr,
        MASKED: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr,
    ):
        """One query block into a key block's dK/dV, in transposed (keys × queries) tiles so dK and dV
        each come out of one matmul: S (always), dV += Pᵀ dO, dP, dK += dSᵀ Q, and with ATOMIC_DQ
        dQ += dS K added into the fp32 dQ buffer with atomics (FA2's single pass: 5 matmuls).
        MASKED blocks check query bounds and causality; mask-free blocks load whole tiles.
        Keys past S need no mask: their K/V rows are zero and their dK/dV rows are never stored."""
        rows = start_m + offs_m
        row_ok = rows < T
        if MASKED:
            lse2 = tl.load(lse_base + rows, mask=row_ok, other=0.0) * 1.4426950408889634
            live = row_ok & (lse2 == lse2)  # NaN-lse rows (non-finite inputs) load as zeros
        else:
            lse2 = tl.load(lse_base + rows) * 1.4426950408889634
            live = row_ok
        q = _load_rows(q_base + rows[:, None] * stride_qt + offs_d[None, :], live, offs_d < D, MASKED, D != BLOCK_D)
        do = _load_rows(
            do_base + rows[:, None] * stride_dot + offs_dv[None, :], live, offs_dv < DV, MASKED, DV != BLOCK_DV
        )
        p_t = tl.exp2(tl.dot(k, tl.trans(q)) * scale_log2 - lse2[None, :])
        if MASKED:
            ok = row_ok[None, :]
            if CAUSAL:
                pos = _query_positions(pos_ptr, b, rows, row_ok, T, S, HAS_POS)
                ok = ok & (cols[:, None] <= pos[None, :])
            p_t = tl.where(ok, p_t, 0.0)  # also zeroes the NaN of a masked NaN-lse row
        if DO_DV:
            dv += tl.dot(p_t.to(do.dtype), do)
        if DO_DK:
            if MASKED:
                delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
            else:
                delta = tl.load(delta_base + rows)
            ds_t = p_t * (tl.dot(v, tl.trans(do)) - delta[None, :])
            if MASKED:
                ds_t = tl.where(ok, ds_t, 0.0)
            dk += tl.dot(ds_t.to(q.dtype), q)
            if ATOMIC_DQ:
                dq_part = tl.dot(tl.trans(ds_t.to(k.dtype)), k) * scale
                tl.atomic_add(
                    dq_base + rows[:, None] * stride_dqt + offs_d[None, :],
                    dq_part,
                    mask=row_ok[:, None] & (offs_d < D)[None, :],
                    sem="relaxed",
                )
        return dk, dv

    @triton.autotune(
        configs=ACTIVE_DKDV_CONFIGS,
        key=["D", "DV", "CAUSAL", "HAS_POS", "DO_DK", "DO_DV", "ATOMIC_DQ"],
        prune_configs_by={"early_config_prune": prune_by_head_dim(DKDV_TABLE, FP32_DKDV_CONFIG)},
    )
    @triton.jit
    def _attn_bwd_dkdv(
        q_ptr,
        k_ptr,
        v_ptr,
        do_ptr,
        dk_ptr,
        dv_ptr,
        dq_ptr,
        lse_ptr,
        delta_ptr,
        pos_ptr,
        k_head_ptr,
        v_head_ptr,
        order_ptr,
        offsets_ptr,
        first_bad_ptr,
        scale_log2,
        scale,
        T,
        S,
        H,
        G,
        stride_qb,
        stride_qt,
        stride_qh,
        stride_kb,
        stride_ks,
        stride_kh,
        stride_vb,
        stride_vs,
        stride_vh,
        stride_dob,
        stride_dot,
        stride_doh,
        stride_dkb,
        stride_dks,
        stride_dkh,
        stride_dvb,
        stride_dvs,
        stride_dvh,
        stride_dqb,
        stride_dqt,
        stride_dqh,
        D: tl.constexpr,
        DV: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_POS: tl.constexpr,
        DO_DK: tl.constexpr,
        DO_DV: tl.constexpr,
        ATOMIC_DQ: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """Grid (cdiv(S, BLOCK_N), B·G): dK and/or dV rows of one key block of group g, summed over
        the query heads order[offsets[g]:offsets[g+1]] mapped to g. K/V rows from the head's first
        non-finite key on load as zeros (the rows that see them are NaN rows anyway)."""
        pid_n = tl.program_id(0)  # causal: early key blocks are seen by the most queries and go first
        pid_bg = tl.program_id(1)
        b = (pid_bg // G).to(tl.int64)
        g = (pid_bg % G).to(tl.int64)
        start_n = pid_n * BLOCK_N
        cols = start_n + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        col_ok = cols < S
        # query blocks [m_lo, m_mid) and [max(m_mid, t_full), T) are masked, [m_mid, t_full) mask-free
        t_full = T // BLOCK_M * BLOCK_M
        if CAUSAL and not HAS_POS:
            # default positions S - T + i increase: blocks before m_lo see none of these keys, blocks
            # from m_full on see all of them
            m_lo = tl.maximum(start_n - (S - T), 0) // BLOCK_M * BLOCK_M
            m_full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - (S - T), 0), BLOCK_M) * BLOCK_M
        elif CAUSAL:  # explicit positions have no order: every block is masked (one loop below)
            m_lo = 0
            m_full = t_full
        else:
            m_lo = 0
            m_full = 0
        m_mid = tl.maximum(tl.minimum(m_full, t_full), m_lo)

        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
        h_lo = tl.load(offsets_ptr + g)
        h_hi = tl.load(offsets_ptr + g + 1)
        for i in range(h_lo, h_hi):
            h = tl.load(order_ptr + i).to(tl.int64)
            kh = tl.load(k_head_ptr + h).to(tl.int64)
            bh = b * H + h
            load_ok = cols < tl.minimum(tl.load(first_bad_ptr + bh), S)
            k = _load_rows(
                k_ptr + b * stride_kb + kh * stride_kh + cols[:, None] * stride_ks + offs_d[None, :],
                load_ok,
                offs_d < D,
                True,
                D != BLOCK_D,
            )
            if DO_DK:  # dP needs the value head of this query head
                vh = tl.load(v_head_ptr + h).to(tl.int64)
                v = _load_rows(
                    v_ptr + b * stride_vb + vh * stride_vh + cols[:, None] * stride_vs + offs_dv[None, :],
                    load_ok,
                    offs_dv < DV,
                    True,
                    DV != BLOCK_DV,
                )
            else:
                v = k  # unused (no dP without dK)
            q_base = q_ptr + b * stride_qb + h * stride_qh
            dq_base = dq_ptr + b * stride_dqb + h * stride_dqh
            do_base = do_ptr + b * stride_dob + h * stride_doh
            lse_base = lse_ptr + bh * T
            delta_base = delta_ptr + bh * T
            if CAUSAL and HAS_POS:  # one masked loop: no mask-free code to hold registers for
                for start_m in range(0, T, BLOCK_M):
                    dk, dv = _dkdv_block(
                        dk,
                        dv,
                        k,
                        v,
                        q_base,
                        do_base,
                        lse_base,
                        delta_base,
                        dq_base,
                        pos_ptr,
                        b,
                        start_m,
                        cols,
                        stride_qt,
                        stride_dot,
                        stride_dqt,
                        T,
                        S,
                        scale_log2,
                        scale,
                        offs_m,
                        offs_d,
                        offs_dv,
                        D,
                        DV,
                        CAUSAL,
                        HAS_POS,
                        DO_DK,
                        DO_DV,
                        ATOMIC_DQ,
                        True,
                        BLOCK_D,
                        BLOCK_DV,
                    )
            else:
                for start_m in range(m_lo, m_mid, BLOCK_M):
                    dk, dv = _dkdv_block(
                        dk,
                        dv,
                        k,
                        v,
                        q_base,
                        do_base,
                        lse_base,
                        delta_base,
                        dq_base,
                        pos_ptr,
                        b,
                        start_m,
                        cols,
                        stride_qt,
                        stride_dot,
                        stride_dqt,
                        T,
                        S,
                        scale_log2,
                        scale,
                        offs_m,
                        offs_d,
                        offs_dv,
                        D,
                        DV,
                        CAUSAL,
                        HAS_POS,
                        DO_DK,
                        DO_DV,
                        ATOMIC_DQ,
                        True,
                        BLOCK_D,
                        BLOCK_DV,
                    )
                for start_m in range(m_mid, t_full, BLOCK_M):
                    dk, dv = _dkdv_block(
                        dk,
                        dv,
                        k,
                        v,
                        q_base,
                        do_base,
                        lse_base,
                        delta_base,
                        dq_base,
                        pos_ptr,
                        b,
                        start_m,
                        cols,
                        stride_qt,
                        stride_dot,
                        stride_dqt,
                        T,
                        S,
                        scale_log2,
                        scale,
                        offs_m,
                        offs_d,
                        offs_dv,
                        D,
                        DV,
                        CAUSAL,
                        HAS_POS,
                        DO_DK,
                        DO_DV,
                        ATOMIC_DQ,
                        False,
                        BLOCK_D,
                        BLOCK_DV,
                    )
                for start_m in range(tl.maximum(m_mid, t_full), T, BLOCK_M):
                    dk, dv = _dkdv_block(
                        dk,
                        dv,
                        k,
                        v,
                        q_base,
                        do_base,
                        lse_base,
                        delta_base,
                        dq_base,
                        pos_ptr,
                        b,
                        start_m,
                        cols,
                        stride_qt,
                        stride_dot,
                        stride_dqt,
                        T,
                        S,
                        scale_log2,
                        scale,
                        offs_m,
                        offs_d,
                        offs_dv,
                        D,
                        DV,
                        CAUSAL,
                        HAS_POS,
                        DO_DK,
                        DO_DV,
                        ATOMIC_DQ,
                        True,
                        BLOCK_D,
                        BLOCK_DV,
                    )
        if DO_DK:
            dk_ptrs = dk_ptr + b * stride_dkb + g * stride_dkh + cols[:, None] * stride_dks + offs_d[None, :]
            tl.store(dk_ptrs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=col_ok[:, None] & (offs_d < D)[None, :])
        if DO_DV:
            dv_ptrs = dv_ptr + b * stride_dvb + g * stride_dvh + cols[:, None] * stride_dvs + offs_dv[None, :]
            tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=col_ok[:, None] & (offs_dv < DV)[None, :])


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
    spilling (ptxas: 16 - 40 B at the one spill-free fp32 dK/dV tile, see _fp32_configs).
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
