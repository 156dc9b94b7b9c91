"""Triton flash-attention forward with decoupled key/value head maps and arbitrary query positions.

Legend (shape suffixes):
    B batch   T queries   S keys   H query heads   Hk key heads   Hv value heads
    d query/key head dim   dv value head dim   M/N query/key block rows (BLOCK_M / BLOCK_N)

One program owns BLOCK_M queries of one (batch, query head). It reads K from key head
``k_head[h]`` and V from value head ``v_head[h]`` straight from the un-expanded (B, S, Hk, d) /
(B, S, Hv, dv) tensors, so decoupled maps never materialise expanded K/V. Online softmax in the
exp2 domain (FlashAttention-2); the T×S score matrix never exists in memory. The log-sum-exp
(natural log) is written per query row for the backward, which recomputes P from it.

Causal masking is by position: query row i may see key j iff j <= pos[i], where pos comes from
``q_positions`` (token-sparse queries) or defaults to S - T + i. The key loop is split into a
mask-free part (key blocks every row in the tile may see) and a masked tail.

Non-finite inputs (the contract is documented once, in kernels.attention.ops.attention): a row
whose query, or a key/value it may see, holds NaN or ±inf is written as all-NaN (out and lse). The
first non-finite key position per (batch, query head) comes in as ``first_bad_BH`` (S when none):
rows at or past it are flagged, and masked blocks load keys from it on as zeros, so a key a row
may not see never reaches it through 0·inf; the mask-free loop needs no check at all (a non-finite
query makes every score of its row non-finite, which IEEE arithmetic carries to a NaN row).
Positions outside [0, S) (checked on the host only when cheap, see ops) give NaN rows too.

Only pointer arithmetic is used (no ``tl.make_block_ptr``: removed in newer Triton).
"""

from __future__ import annotations

import torch

from kernels import HAS_TRITON, INTERPRET

if HAS_TRITON:
    import triton
    import triton.language as tl

LOG2E = 1.4426950408889634


def _fwd_configs():
    """(config, largest padded head dim it may run at) for the forward, as the autotuner sees them
    on a GPU (compiled and ptxas-checked for sm_80 / sm_90a by the static gates, aot_specs.py).
    Measured (bf16): BLOCK_M = 128 on 4 warps spills at d = 128 on both archs (196 - 880 B: a
    128 × d fp32 accumulator plus Q and the score tile), so 128-row tiles use 8 warps; the
    128 × 128 and 64 × 64 tiles are clean at d = 64 but spill at d = 128 on sm_80 (64 B, 4 B),
    so they are pruned there (``configs_for``). Configs whose shared memory does not fit (fp32 at
    d = 128) fail to compile and the autotuner skips them; the last one always fits."""
    cfg = triton.Config
    return [
        (cfg({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3), 128),
        (cfg({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2), 64),
        (cfg({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3), 64),
        (cfg({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2), 128),  # small: fp32 at d=128 fits here
    ]


def _config_key(c) -> tuple:
    return tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages


def _limit(entry, atomic: bool) -> int:
    """Largest padded head dim of a table entry (config, max_d[, max_d with ATOMIC_DQ])."""
    return entry[2] if atomic and len(entry) > 2 else entry[1]


def configs_for(table, block_d: int, atomic: bool = False) -> list:
    """The configs of a (config, max padded head dim[, max with ATOMIC_DQ]) table that the
    autotuner may pick at `block_d` (for the dK/dV kernel: with or without ATOMIC_DQ)."""
    return [e[0] for e in table if block_d <= _limit(e, atomic)]


def prune_by_head_dim(table, fp32_config=None):
    """An autotune ``early_config_prune`` keeping the configs `table` allows at the launch's padded
    head dim (max of BLOCK_D and BLOCK_DV); configs not in the table (the interpreter's) stay.
    ``fp32_config``: the one config fp32 inputs run on (every larger fp32 tile spills), and that 16-bit
    inputs never get."""
    entries = {_config_key(e[0]): e for e in table}
    fp32_key = _config_key(fp32_config) if fp32_config is not None else None

    def prune(configs, named_args, **kwargs):
        if fp32_key is not None:
            fp32 = [c for c in configs if _config_key(c) == fp32_key]
            if fp32 and getattr(named_args.get("q_ptr"), "dtype", None) == torch.float32:
                return fp32
            configs = [c for c in configs if _config_key(c) != fp32_key] or configs
        block_d = max(kwargs["BLOCK_D"], kwargs.get("BLOCK_DV", 0))
        atomic = bool(kwargs.get("ATOMIC_DQ", False))
        kept = [
            c for c in configs if _config_key(c) not in entries or block_d <= _limit(entries[_config_key(c)], atomic)
        ]
        return kept or configs[-1:]

    return prune


def _interp_configs():
    # the interpreter cannot autotune and each program costs milliseconds: one small config
    return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]


def block_dim(d: int) -> int:
    """Padded head-dim tile width: a power of two, at least 16 (the minimum tl.dot size)."""
    return max(16, triton.next_power_of_2(d))


if HAS_TRITON:
    FWD_TABLE = _fwd_configs()
    FWD_CONFIGS = [e[0] for e in FWD_TABLE]
    ACTIVE_FWD_CONFIGS = _interp_configs() if INTERPRET else FWD_CONFIGS

    @triton.jit
    def _load_rows(ptrs, row_ok, col_ok, ROW_MASK: tl.constexpr, COL_MASK: tl.constexpr):
        """Load a tile, masking rows and/or padded head-dim columns only where needed."""
        if ROW_MASK and COL_MASK:
            x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        elif ROW_MASK:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        elif COL_MASK:
            x = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
        return x

    @triton.jit
    def _query_positions(pos_ptr, b, offs_m, row_ok, T, S, HAS_POS: tl.constexpr):
        """pos_M: each query's key position (q_positions[b] or S - T + i); rows >= T get S - 1
        so they never empty a softmax row (their results are not stored). Explicit positions are
        clamped to [0, S) so no loop bound leaves the key range (the forward flags those rows)."""
        if HAS_POS:
            pos = tl.load(pos_ptr + b * T + offs_m, mask=row_ok, other=0).to(tl.int32)
            pos = tl.minimum(tl.maximum(pos, 0), S - 1)
        else:
            pos = S - T + offs_m
        return tl.where(row_ok, pos, S - 1)

    @triton.jit
    def _fwd_block(
        acc,
        m_i,
        l_i,
        q,
        k_base,
        v_base,
        stride_ks,
        stride_vs,
        start_n,
        pos,
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
        """One key block of the online softmax. MASKED blocks check key bounds and causality, and
        load keys from `key_lim` (the first non-finite one) on as zeros."""
        cols = start_n + offs_n
        col_ok = cols < S
        load_ok = cols < key_lim
        k = _load_rows(k_base + cols[:, None] * stride_ks + offs_d[None, :], load_ok, offs_d < D, MASKED, D != BLOCK_D)
        v = _load_rows(
            v_base + cols[:, None] * stride_vs + offs_dv[None, :], load_ok, offs_dv < DV, MASKED, DV != BLOCK_DV
        )
        s = tl.dot(q, tl.trans(k)) * scale_log2  # (M, N) scores in log2 units
        if MASKED:
            ok = col_ok[None, :]
            if CAUSAL:
                ok = ok & (cols[None, :] <= pos[:, None])
            s = tl.where(ok, s, float("-inf"))
        # every row has seen key 0 before any fully-masked block, so m_new is finite (no NaN)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return acc, m_new, l_i

    @triton.autotune(
        configs=ACTIVE_FWD_CONFIGS,
        key=["D", "DV", "CAUSAL", "HAS_POS"],
        prune_configs_by={"early_config_prune": prune_by_head_dim(FWD_TABLE)},
    )
    @triton.jit
    def _attn_fwd(
        q_ptr,
        k_ptr,
        v_ptr,
        o_ptr,
        lse_ptr,
        pos_ptr,
        k_head_ptr,
        v_head_ptr,
        first_bad_ptr,
        scale_log2,
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
        stride_ob,
        stride_ot,
        stride_oh,
        D: tl.constexpr,
        DV: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_POS: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """Grid (cdiv(T, BLOCK_M), B·H). Writes o_BTHdv and lse_BHT (natural log, fp32)."""
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
        pos = _query_positions(pos_ptr, b, offs_m, row_ok, T, S, HAS_POS)
        k_base = k_ptr + b * stride_kb + kh * stride_kh
        v_base = v_ptr + b * stride_vb + vh * stride_vh
        first_bad = tl.load(first_bad_ptr + pid_bh)
        key_lim = tl.minimum(first_bad, S)

        if CAUSAL:  # keys [0, hi) are seen by some row; [0, full) by every row of the tile
            hi = tl.minimum(tl.max(tl.where(row_ok, pos, 0), 0) + 1, S)
            full = (tl.min(pos, 0) + 1) // BLOCK_N * BLOCK_N
        else:
            hi = S
            full = S // BLOCK_N * BLOCK_N

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        for start_n in range(0, full, BLOCK_N):
            acc, m_i, l_i = _fwd_block(
                acc,
                m_i,
                l_i,
                q,
                k_base,
                v_base,
                stride_ks,
                stride_vs,
                start_n,
                pos,
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
            acc, m_i, l_i = _fwd_block(
                acc,
                m_i,
                l_i,
                q,
                k_base,
                v_base,
                stride_ks,
                stride_vs,
                start_n,
                pos,
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

        # NaN rows: a non-finite key/value at a position the row sees, or a position outside [0, S)
        if CAUSAL:
            bad = first_bad <= pos
        else:
            bad = (first_bad < S) | (offs_m < 0)
        if HAS_POS:
            raw = tl.load(pos_ptr + b * T + offs_m, mask=row_ok, other=0)
            bad = bad | (raw < 0) | (raw >= S)
        acc = tl.where(bad[:, None], float("nan"), acc / l_i[:, None])
        o_ptrs = o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_dv[None, :]
        tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_dv < DV)[None, :])
        lse = tl.where(bad, float("nan"), (m_i + tl.log2(l_i)) / 1.4426950408889634)  # back to natural log
        tl.store(lse_ptr + pid_bh.to(tl.int64) * T + offs_m, lse, mask=row_ok)


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """Kernels take batch/sequence/head strides but assume unit stride along the head dim."""
    return x if x.stride(-1) == 1 else x.contiguous()


def first_nonfinite_key(k_BSHkd, v_BSHvdv, k_head_H, v_head_H) -> torch.Tensor:
    """first_bad_BH (int32): the first key position whose K row (of head k_head[h]) or V row (of
    v_head[h]) holds a NaN / ±inf, S when there is none. Device ops only (no host sync)."""
    S = k_BSHkd.shape[1]
    keys_S1 = torch.arange(S, device=k_BSHkd.device, dtype=torch.int32)[:, None]
    sentinel = torch.full((), S, device=k_BSHkd.device, dtype=torch.int32)  # a fill: no host copy

    def first(x_BSHd):
        bad_BSH = ~torch.isfinite(x_BSHd).all(-1)
        return torch.where(bad_BSH, keys_S1, sentinel).amin(1)  # (B, heads)

    return torch.minimum(
        first(k_BSHkd).index_select(1, k_head_H.long()), first(v_BSHvdv).index_select(1, v_head_H.long())
    ).contiguous()


def flash_fwd(q_BTHd, k_BSHkd, v_BSHvdv, k_head_H, v_head_H, pos_BT, causal: bool, scale: float, first_bad_BH=None):
    """Launch the forward. Inputs are validated by kernels.attention.ops; maps/positions are int32.
    `first_bad_BH`: from ``first_nonfinite_key`` (computed here when not given).

    Returns out_BTHdv (q's dtype) and lse_BHT (fp32, natural log).
    """
    q_BTHd, k_BSHkd, v_BSHvdv = (last_dim_contiguous(x) for x in (q_BTHd, k_BSHkd, v_BSHvdv))
    B, T, H, d = q_BTHd.shape
    S, dv = k_BSHkd.shape[1], v_BSHvdv.shape[3]
    out_BTHdv = torch.empty(B, T, H, dv, device=q_BTHd.device, dtype=q_BTHd.dtype)
    lse_BHT = torch.empty(B, H, T, device=q_BTHd.device, dtype=torch.float32)
    if T == 0 or B == 0:
        return out_BTHdv, lse_BHT
    has_pos = pos_BT is not None
    pos_arg = pos_BT if has_pos else k_head_H  # never read when HAS_POS is False
    if first_bad_BH is None:
        first_bad_BH = first_nonfinite_key(k_BSHkd, v_BSHvdv, k_head_H, v_head_H)

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_M"]), B * H)

    _attn_fwd[grid](
        q_BTHd,
        k_BSHkd,
        v_BSHvdv,
        out_BTHdv,
        lse_BHT,
        pos_arg,
        k_head_H,
        v_head_H,
        first_bad_BH,
        scale * LOG2E,
        T,
        S,
        H,
        *_strides(q_BTHd),
        *_strides(k_BSHkd),
        *_strides(v_BSHvdv),
        *_strides(out_BTHdv),
        D=d,
        DV=dv,
        CAUSAL=causal,
        HAS_POS=has_pos,
        BLOCK_D=block_dim(d),
        BLOCK_DV=block_dim(dv),
    )
    return out_BTHdv, lse_BHT
