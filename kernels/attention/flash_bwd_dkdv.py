"""The dK/dV pass of the flash-attention backward: one program per key block of one key (value) head
group loops over the group's query heads (a CSR list, flash_bwd.head_groups) and their query blocks, and
reduces dK = scale · Σ dSᵀ Q and dV = Σ Pᵀ dO in registers; with ATOMIC_DQ (FA2's single pass) it also adds
dQ += dS K into an fp32 buffer with atomics. The launcher and the math are in flash_bwd.py; the autotune
table in flash_bwd_configs.py.
"""

from __future__ import annotations

from kernels import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    from kernels.attention.flash import _load_rows, _query_positions, prune_by_head_dim
    from kernels.attention.flash_bwd_configs import ACTIVE_DKDV_CONFIGS, DKDV_TABLE, FP32_DKDV_CONFIG

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
