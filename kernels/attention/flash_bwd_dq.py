"""The dQ pass of the deterministic flash-attention backward: one program per query block of one query
head walks the key blocks (a mask-free main loop, then the masked diagonal / tail) and issues S, dP and
dQ += dS K (3 matmuls per block pair). The launcher and the math are in flash_bwd.py; the autotune
table in flash_bwd_configs.py.
"""

from __future__ import annotations

from kernels import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    from kernels.attention.flash import _load_rows, _query_positions, prune_by_head_dim
    from kernels.attention.flash_bwd_configs import ACTIVE_DQ_CONFIGS, DQ_TABLE, FP32_DQ_CONFIG

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
