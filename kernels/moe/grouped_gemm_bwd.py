"""Backward grouped expert GEMMs (duals of grouped_gemm.py).

Legend (shape suffixes):
    N tokens   k slots/token   M = N·k slots   E experts   D model width   F expert hidden width
    H = 2F (SwiGLU: [gate | up]) or F (GELU)   C = DGATE_CHUNK columns per gate-gradient partial

With y[n] = Σ_j g[m] · act(x[n] @ w_in[e]) @ w_out[e]  (m = n·k + j, e = ids[m]):

    _gather_act_bwd:  da[p]  = dy[tok(p)] @ w_out[e]ᵀ                 (dy rows gathered in the K loop)
                      dg[m]  = Σ_f da[p, f] · a[p, f]                 (partial sums per C columns)
                      dh[p]  = g[m] · da[p] · act'(h[p])              (SwiGLU: both halves)
    dx:               scatter_gemm(dh, w_inᵀ) then combine            (grouped_gemm.py, reused)
    _grouped_dw:      dw_in[e]  = Σ_p x[tok(p)]ᵀ ⊗ dh[p]             (A gathered, B sorted)
                      dw_out[e] = Σ_p a[p]ᵀ ⊗ (g[m] · dy[tok(p)])    (A sorted, B gathered + gated)

The gate gradient is written as M × cdiv(F, C) partial sums (summed by the caller) instead of
atomics, so it is deterministic and independent of which BLOCK_N the autotuner picked.
"""

from __future__ import annotations

import torch

from kernels import HAS_TRITON
from kernels.moe.routing import Routing
from kernels.moe.traffic import dw_group_m

if HAS_TRITON:
    import triton
    import triton.language as tl

    from kernels.moe.grouped_gemm import (
        ACTIVE_CONFIGS,
        GROUP_M,
        PRECISION,
        PRUNE,
        _e_pow2,
        _expert_rows,
        _grouped_tile,
        _swizzle,
        _tile_grid,
    )

    # the epilogue works on BLOCK_N / 2 column halves and every BLOCK_N in use is a multiple of
    # 2·CHUNK, so each config writes every partial column
    DGATE_CHUNK = min(c.kwargs["BLOCK_N"] for c in ACTIVE_CONFIGS) // 2

    @triton.jit
    def _store_dgate_parts(prod, dgate_ptr, slot, m_mask, col0, DG_COLS, CHUNK: tl.constexpr):
        """dgate[slot, col0 + c] = Σ over the c-th CHUNK columns of prod. Masked row sums instead of
        a 3-D reshape, which forced a layout conversion and extra live registers."""
        HALF: tl.constexpr = prod.shape[1]
        chunk = tl.arange(0, HALF) // CHUNK
        for c in tl.static_range(HALF // CHUNK):
            part = tl.sum(tl.where((chunk == c)[None, :], prod, 0.0), axis=1)
            tl.store(dgate_ptr + slot * DG_COLS + col0 + c, part, mask=m_mask & (col0 + c < DG_COLS))

    @triton.jit
    def _act_bwd_half(
        da,
        row0,
        lrows,
        cols,
        m_mask,
        F,
        h_ptr,
        dh_ptr,
        a_ptr,
        gate,
        dgate_ptr,
        slot,
        dg_col0,
        DG_COLS,
        SWIGLU: tl.constexpr,
        CHUNK: tl.constexpr,
    ):
        """Epilogue on one column half: the gate-gradient partial sums Σ_f da·act(h) per CHUNK
        columns, then dh. GELU also writes a = gelu(h) for dw_out (its epilogue has registers to
        spare; recomputing erf inside _grouped_dw's K loop spilled ~400 B on sm_80). SwiGLU does not:
        one more tile spilled here, so _grouped_dw recomputes silu(g)·u from h instead. Ordered so that few half
        tiles are live at once, with
        int32 offsets from per-tile base pointers (64-bit per-element addresses cost 2 registers
        each): the full-width version kept ~8 fp32 tiles live and spilled ~700 B/thread."""
        H = 2 * F if SWIGLU else F
        mask = m_mask[:, None] & (cols < F)[None, :]
        offs = lrows[:, None] * H + cols[None, :]  # < BLOCK_M · H: fits int32
        h_base = h_ptr + row0.to(tl.int64) * H
        dh_base = dh_ptr + row0.to(tl.int64) * H
        hg = tl.load(h_base + offs, mask=mask, other=0.0).to(tl.float32)
        if SWIGLU:
            sig = tl.sigmoid(hg)
            silu = hg * sig  # hg dies here; silu' = sig + silu·(1 - sig) needs only these two
            hu = tl.load(h_base + F + offs, mask=mask, other=0.0).to(tl.float32)
            a = silu * hu
        else:
            cdf = 0.5 * (1.0 + tl.math.erf(hg * 0.7071067811865476))
            a = hg * cdf
            tl.store(a_ptr + row0.to(tl.int64) * F + offs, a.to(a_ptr.dtype.element_ty), mask=mask)  # H = F
        _store_dgate_parts(da * a, dgate_ptr, slot, m_mask, dg_col0, DG_COLS, CHUNK)
        dg = da * gate
        if SWIGLU:
            tl.store(dh_base + F + offs, (dg * silu).to(dh_ptr.dtype.element_ty), mask=mask)
            tl.store(dh_base + offs, (dg * hu * (sig + silu * (1.0 - sig))).to(dh_ptr.dtype.element_ty), mask=mask)
        else:
            dgelu = cdf + hg * 0.3989422804014327 * tl.exp(-0.5 * hg * hg)
            tl.store(dh_base + offs, (dg * dgelu).to(dh_ptr.dtype.element_ty), mask=mask)

    @triton.autotune(configs=ACTIVE_CONFIGS, key=["D", "F", "SWIGLU"], prune_configs_by=PRUNE)
    @triton.jit
    def _gather_act_bwd(
        dy_ptr,
        w_ptr,
        h_ptr,
        dh_ptr,
        a_ptr,
        dgate_ptr,
        slot_ptr,
        gate_ptr,
        counts_ptr,
        offsets_ptr,
        K_SLOTS,
        D,
        F,
        E,
        stride_we,
        stride_wf,
        stride_wd,
        DG_COLS,
        SWIGLU: tl.constexpr,
        E_POW2: tl.constexpr,
        CHUNK: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        n_cols = tl.cdiv(F, BLOCK_N)
        e, row_tile, col_tile, valid = _grouped_tile(tl.program_id(0), n_cols, counts_ptr, E, E_POW2, BLOCK_M, GROUP_M)
        if valid:
            HALF: tl.constexpr = BLOCK_N // 2
            offs_m, row_end = _expert_rows(e, row_tile, offsets_ptr, BLOCK_M)
            m_mask = offs_m < row_end
            slot = tl.load(slot_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
            tok = slot // K_SLOTS
            # da = dy @ w_outᵀ as two BLOCK_N/2 halves sharing the dy tile: the same GEMM work per
            # loaded dy tile as one BLOCK_N tile, but the epilogue handles one half at a time
            cols0 = col_tile * BLOCK_N + tl.arange(0, HALF)
            cols1 = cols0 + HALF
            offs_k = tl.arange(0, BLOCK_K)
            dy_ptrs = dy_ptr + tok[:, None] * D + offs_k[None, :]
            # B[d, f] = w_out[e, f, d]: the transpose is only a choice of strides
            w_ptrs = w_ptr + e.to(tl.int64) * stride_we + offs_k[:, None] * stride_wd + cols0[None, :] * stride_wf
            acc0 = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
            acc1 = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
            for k0 in range(0, D, BLOCK_K):
                k_mask = (offs_k + k0) < D
                dy = tl.load(dy_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                w0 = tl.load(w_ptrs, mask=k_mask[:, None] & (cols0 < F)[None, :], other=0.0)
                acc0 = tl.dot(dy, w0, acc0, input_precision=PRECISION)
                w1 = tl.load(w_ptrs + HALF * stride_wf, mask=k_mask[:, None] & (cols1 < F)[None, :], other=0.0)
                acc1 = tl.dot(dy, w1, acc1, input_precision=PRECISION)
                dy_ptrs += BLOCK_K
                w_ptrs += BLOCK_K * stride_wd
            row0 = tl.min(offs_m, 0)
            lrows = tl.arange(0, BLOCK_M)
            gate = tl.load(gate_ptr + slot, mask=m_mask, other=0.0).to(tl.float32)[:, None]
            dg_col0 = col_tile * (BLOCK_N // CHUNK)
            _act_bwd_half(
                acc0,
                row0,
                lrows,
                cols0,
                m_mask,
                F,
                h_ptr,
                dh_ptr,
                a_ptr,
                gate,
                dgate_ptr,
                slot,
                dg_col0,
                DG_COLS,
                SWIGLU,
                CHUNK,
            )
            _act_bwd_half(
                acc1,
                row0,
                lrows,
                cols1,
                m_mask,
                F,
                h_ptr,
                dh_ptr,
                a_ptr,
                gate,
                dgate_ptr,
                slot,
                dg_col0 + HALF // CHUNK,
                DG_COLS,
                SWIGLU,
                CHUNK,
            )

    @triton.autotune(configs=ACTIVE_CONFIGS, key=["I", "J", "A_GATHER", "B_GATHER"], prune_configs_by=PRUNE)
    @triton.jit
    def _grouped_dw(
        a_ptr,
        b_ptr,
        out_ptr,
        slot_ptr,
        gate_ptr,
        offsets_ptr,
        K_SLOTS,
        I,
        J,
        GROUP_M,
        A_GATHER: tl.constexpr,
        B_GATHER: tl.constexpr,
        B_GATE: tl.constexpr,
        A_ACT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """out[e] (I × J) = Σ over expert e's rows p of A[rowA(p)]ᵀ B[rowB(p)] (BLOCK_M tiles I,
        BLOCK_N tiles J, BLOCK_K walks the rows). Experts without rows write zeros.
        A_ACT: 0 = A as stored; 1 = A is silu(g)·u recomputed from the SwiGLU pre-activation h (rows
        of 2I = [gate | up]), so the forward never keeps the activation."""
        e = tl.program_id(1)
        # grouped order: GROUP_M tiles of I sweep all of J, so A's column slabs stay in L2
        # (GROUP_M is a runtime value chosen by traffic.dw_group_m; 1 = row-major)
        tile_i, tile_j = _swizzle(tl.program_id(0), tl.cdiv(I, BLOCK_M), tl.cdiv(J, BLOCK_N), GROUP_M)
        offs_i = tile_i * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_j = tile_j * BLOCK_N + tl.arange(0, BLOCK_N)
        i_mask = offs_i < I
        j_mask = offs_j < J
        start = tl.load(offsets_ptr + e)
        end = tl.load(offsets_ptr + e + 1)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for p0 in range(start, end, BLOCK_K):
            offs_p = p0 + tl.arange(0, BLOCK_K)
            p_mask = offs_p < end
            slot = tl.load(slot_ptr + offs_p, mask=p_mask, other=0).to(tl.int64)
            row_a = slot // K_SLOTS if A_GATHER else offs_p.to(tl.int64)
            row_b = slot // K_SLOTS if B_GATHER else offs_p.to(tl.int64)
            a_mask = i_mask[:, None] & p_mask[None, :]
            if A_ACT == 0:
                a_t = tl.load(a_ptr + row_a[None, :] * I + offs_i[:, None], mask=a_mask, other=0.0)
            else:
                h_ptrs = a_ptr + row_a[None, :] * (2 * I) + offs_i[:, None]
                hg = tl.load(h_ptrs, mask=a_mask, other=0.0).to(tl.float32)
                hu = tl.load(h_ptrs + I, mask=a_mask, other=0.0).to(tl.float32)
                a_t = (hg * tl.sigmoid(hg) * hu).to(a_ptr.dtype.element_ty)
            b = tl.load(b_ptr + row_b[:, None] * J + offs_j[None, :], mask=p_mask[:, None] & j_mask[None, :], other=0.0)
            if B_GATE:
                g = tl.load(gate_ptr + slot, mask=p_mask, other=0.0).to(tl.float32)
                b = (b.to(tl.float32) * g[:, None]).to(b_ptr.dtype.element_ty)
            acc = tl.dot(a_t, b, acc, input_precision=PRECISION)
        out_ptrs = out_ptr + e.to(tl.int64) * I * J + offs_i[:, None] * J + offs_j[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=i_mask[:, None] & j_mask[None, :])


def gather_act_bwd(dy_ND, w_out_EFD, h_MH, gates_M, ids_M, r: Routing, k: int, swiglu: bool):
    """Returns dh_MH (sorted order, gate applied), dgates_M (fp32, 0 for dropped slots) and for GELU
    a_MF = gelu(h) recomputed (None for SwiGLU: _grouped_dw recomputes it from h)."""
    M, E, F, D = r.sorted_slot_M.numel(), w_out_EFD.shape[0], w_out_EFD.shape[1], w_out_EFD.shape[2]
    dh_MH = torch.empty_like(h_MH)
    a_MF = None if swiglu else torch.empty_like(h_MH)
    dg_cols = triton.cdiv(F, DGATE_CHUNK)
    dgate_MC = torch.empty((M, dg_cols), dtype=torch.float32, device=dy_ND.device)
    _gather_act_bwd[_tile_grid(M, E, F)](
        dy_ND,
        w_out_EFD,
        h_MH,
        dh_MH,
        dh_MH if swiglu else a_MF,
        dgate_MC,
        r.sorted_slot_M,
        gates_M,
        r.counts_E,
        r.offsets_E1,
        k,
        D,
        F,
        E,
        *w_out_EFD.stride(),
        dg_cols,
        SWIGLU=swiglu,
        E_POW2=_e_pow2(E),
        CHUNK=DGATE_CHUNK,
        GROUP_M=GROUP_M,
    )
    # dropped (and out-of-range, see routing.py) slots' partial rows were never written: no gradient
    dgates_M = torch.where((ids_M >= 0) & (ids_M < E), dgate_MC.sum(1), 0.0)
    return dh_MH, dgates_M, a_MF


def grouped_dw(
    a_RI, b_RJ, r: Routing, k: int, E: int, a_gather: bool, b_gather: bool, gates_M=None, a_act: str | None = None
):
    """out_EIJ[e] = Σ_{p of expert e} a[row(p)]ᵀ b[row(p)] (· gate); row = token if *_gather else p.
    a_act="swiglu": a_RI holds the SwiGLU pre-activation h (R, 2I) and A = silu(h[:, :I])·h[:, I:]."""
    I = a_RI.shape[1] // 2 if a_act == "swiglu" else a_RI.shape[1]
    J = b_RJ.shape[1]
    out_EIJ = torch.empty((E, I, J), dtype=a_RI.dtype, device=a_RI.device)
    grid = lambda meta: (triton.cdiv(I, meta["BLOCK_M"]) * triton.cdiv(J, meta["BLOCK_N"]), E)
    group_m = dw_group_m(r.sorted_slot_M.numel() // E, J, b_RJ.element_size())
    _grouped_dw[grid](
        a_RI,
        b_RJ,
        out_EIJ,
        r.sorted_slot_M,
        gates_M if gates_M is not None else b_RJ,
        r.offsets_E1,
        k,
        I,
        J,
        group_m,
        A_GATHER=a_gather,
        B_GATHER=b_gather,
        B_GATE=gates_M is not None,
        A_ACT=int(a_act == "swiglu"),
    )
    return out_EIJ
