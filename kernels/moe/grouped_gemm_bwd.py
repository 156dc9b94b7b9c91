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

if HAS_TRITON:
    import triton
    import triton.language as tl

    from kernels.moe.grouped_gemm import ACTIVE_CONFIGS, PRECISION, _e_pow2, _expert_tile, _tile_grid

    # every BLOCK_N in use is a multiple of this, so each config writes every partial column
    DGATE_CHUNK = min(c.kwargs["BLOCK_N"] for c in ACTIVE_CONFIGS)

    @triton.autotune(configs=ACTIVE_CONFIGS, key=["D", "F", "SWIGLU"])
    @triton.jit
    def _gather_act_bwd(dy_ptr, w_ptr, h_ptr, dh_ptr, dgate_ptr, slot_ptr, gate_ptr, counts_ptr, offsets_ptr,
                        K_SLOTS, D, F, E, stride_we, stride_wf, stride_wd, DG_COLS,
                        SWIGLU: tl.constexpr, E_POW2: tl.constexpr, CHUNK: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        e, row0, row_end, valid = _expert_tile(tl.program_id(0), counts_ptr, offsets_ptr, E, E_POW2, BLOCK_M)
        if valid:
            pid_n = tl.program_id(1)
            offs_m = row0 + tl.arange(0, BLOCK_M)
            m_mask = offs_m < row_end
            slot = tl.load(slot_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
            tok = slot // K_SLOTS
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = offs_n < F
            offs_k = tl.arange(0, BLOCK_K)
            dy_ptrs = dy_ptr + tok[:, None] * D + offs_k[None, :]
            # B[d, f] = w_out[e, f, d]: the transpose is only a choice of strides
            w_ptrs = w_ptr + e.to(tl.int64) * stride_we + offs_k[:, None] * stride_wd + offs_n[None, :] * stride_wf
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, D, BLOCK_K):
                k_mask = (offs_k + k0) < D
                dy = tl.load(dy_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                acc = tl.dot(dy, w, acc, input_precision=PRECISION)
                dy_ptrs += BLOCK_K
                w_ptrs += BLOCK_K * stride_wd
            H = 2 * F if SWIGLU else F
            mask = m_mask[:, None] & n_mask[None, :]
            h_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * H + offs_n[None, :]
            hg = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
            gate = tl.load(gate_ptr + slot, mask=m_mask, other=0.0).to(tl.float32)[:, None]
            if SWIGLU:
                hu = tl.load(h_ptrs + F, mask=mask, other=0.0).to(tl.float32)
                sig = tl.sigmoid(hg)
                silu = hg * sig
                a = silu * hu
                dh_g = acc * gate * hu * sig * (1.0 + hg * (1.0 - sig))
                dh_u = acc * gate * silu
                tl.store(dh_ptr + offs_m.to(tl.int64)[:, None] * H + F + offs_n[None, :],
                         dh_u.to(dh_ptr.dtype.element_ty), mask=mask)
            else:
                cdf = 0.5 * (1.0 + tl.math.erf(hg * 0.7071067811865476))
                a = hg * cdf
                dh_g = acc * gate * (cdf + hg * 0.3989422804014327 * tl.exp(-0.5 * hg * hg))
            tl.store(dh_ptr + offs_m.to(tl.int64)[:, None] * H + offs_n[None, :],
                     dh_g.to(dh_ptr.dtype.element_ty), mask=mask)
            part = tl.sum(tl.reshape(acc * a, (BLOCK_M, BLOCK_N // CHUNK, CHUNK)), axis=2)
            cols = pid_n * (BLOCK_N // CHUNK) + tl.arange(0, BLOCK_N // CHUNK)
            tl.store(dgate_ptr + slot[:, None] * DG_COLS + cols[None, :], part,
                     mask=m_mask[:, None] & (cols < DG_COLS)[None, :])

    @triton.autotune(configs=ACTIVE_CONFIGS, key=["I", "J", "A_GATHER", "B_GATHER"])
    @triton.jit
    def _grouped_dw(a_ptr, b_ptr, out_ptr, slot_ptr, gate_ptr, offsets_ptr, K_SLOTS, I, J,
                    A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, B_GATE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[e] (I × J) = Σ over expert e's rows p of A[rowA(p)]ᵀ B[rowB(p)] (BLOCK_M tiles I,
        BLOCK_N tiles J, BLOCK_K walks the rows). Experts without rows write zeros."""
        e = tl.program_id(1)
        n_j = tl.cdiv(J, BLOCK_N)
        offs_i = (tl.program_id(0) // n_j) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_j = (tl.program_id(0) % n_j) * BLOCK_N + tl.arange(0, BLOCK_N)
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
            a_t = tl.load(a_ptr + row_a[None, :] * I + offs_i[:, None], mask=i_mask[:, None] & p_mask[None, :], other=0.0)
            b = tl.load(b_ptr + row_b[:, None] * J + offs_j[None, :], mask=p_mask[:, None] & j_mask[None, :], other=0.0)
            if B_GATE:
                g = tl.load(gate_ptr + slot, mask=p_mask, other=0.0).to(tl.float32)
                b = (b.to(tl.float32) * g[:, None]).to(b_ptr.dtype.element_ty)
            acc = tl.dot(a_t, b, acc, input_precision=PRECISION)
        out_ptrs = out_ptr + e.to(tl.int64) * I * J + offs_i[:, None] * J + offs_j[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=i_mask[:, None] & j_mask[None, :])


def gather_act_bwd(dy_ND, w_out_EFD, h_MH, gates_M, ids_M, r: Routing, k: int, swiglu: bool):
    """Returns dh_MH (sorted order, gate applied) and dgates_M (fp32, 0 for dropped slots)."""
    M, E, F, D = r.sorted_slot_M.numel(), w_out_EFD.shape[0], w_out_EFD.shape[1], w_out_EFD.shape[2]
    dh_MH = torch.empty_like(h_MH)
    dg_cols = triton.cdiv(F, DGATE_CHUNK)
    dgate_MC = torch.empty((M, dg_cols), dtype=torch.float32, device=dy_ND.device)
    _gather_act_bwd[_tile_grid(M, E, F)](
        dy_ND, w_out_EFD, h_MH, dh_MH, dgate_MC, r.sorted_slot_M, gates_M, r.counts_E, r.offsets_E1,
        k, D, F, E, *w_out_EFD.stride(), dg_cols, SWIGLU=swiglu, E_POW2=_e_pow2(E), CHUNK=DGATE_CHUNK)
    # dropped slots' partial rows were never written; they get no gradient
    dgates_M = torch.where(ids_M >= 0, dgate_MC.sum(1), 0.0)
    return dh_MH, dgates_M


def grouped_dw(a_RI, b_RJ, r: Routing, k: int, E: int, a_gather: bool, b_gather: bool, gates_M=None):
    """out_EIJ[e] = Σ_{p of expert e} a[row(p)]ᵀ b[row(p)] (· gate); row = token if *_gather else p."""
    I, J = a_RI.shape[1], b_RJ.shape[1]
    out_EIJ = torch.empty((E, I, J), dtype=a_RI.dtype, device=a_RI.device)
    grid = lambda meta: (triton.cdiv(I, meta["BLOCK_M"]) * triton.cdiv(J, meta["BLOCK_N"]), E)  # noqa: E731
    _grouped_dw[grid](a_RI, b_RJ, out_EIJ, r.sorted_slot_M, gates_M if gates_M is not None else b_RJ,
                      r.offsets_E1, k, I, J, A_GATHER=a_gather, B_GATHER=b_gather, B_GATE=gates_M is not None)
    return out_EIJ
