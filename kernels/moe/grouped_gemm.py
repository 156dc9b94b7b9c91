"""Forward grouped expert GEMMs with the gather and the scatter fused in (ScatterMoE "scatter2scatter").

Legend (shape suffixes):
    N tokens   k slots/token   M = N·k slots   E experts   D model width   F expert hidden width
    H = 2F (SwiGLU: [gate | up]) or F (GELU)    S valid slots, stored in the first S of M rows

Rows "in sorted order" are indexed by the position p in ``Routing.sorted_slot_M``; slot
``m = sorted_slot_M[p]`` belongs to token ``m // k``. A program owns one BLOCK_M tile of one
expert's rows; tiles never straddle experts, so each tile multiplies by exactly one weight matrix.

    _gather_act_fwd:  h_MH[p] = x_ND[tok(p)] @ w_in_EDH[e];  a_MF[p] = act(h_MH[p])
                      (x rows are gathered inside the K loop: no permuted copy of x is made)
    _scatter_gemm:    o_MD[slot(p)] = gate[slot(p)] · (a_MK[p] @ w_EKD[e])
                      (rows land directly in slot order; the gate multiply is in the epilogue)
    _combine_kernel:  y_ND[n] = Σ_j o_MD[n·k + j] over the slots with id != -1 (fixed order j)

The k-way combine is a separate memory-bound pass rather than atomics so the result is
deterministic and needs no zero-initialised fp32 buffer.
"""

from __future__ import annotations

import torch

from kernels import HAS_TRITON, INTERPRET
from kernels.moe.routing import Routing
from kernels.moe.traffic import GROUP_M as TRAFFIC_GROUP_M

if HAS_TRITON:
    import triton
    import triton.language as tl


def _gemm_configs():
    """Block configs the autotuner may pick on a GPU. All fit sm_80's 163 KB of shared memory in
    bf16 with the SwiGLU kernel's two weight tiles (checked by tests/kernels/test_moe_compile.py)."""
    cfg = triton.Config
    return [
        cfg({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        cfg({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        # BLOCK_K 32 (was 64 × 3 stages): the SwiGLU backward spilled 12-16 B on sm_80 at K 64
        cfg({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=4),
        cfg({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        # fp32 only (fp32_config_ok): the 'ieee' FMA dot fully unrolls BLOCK_K
        cfg({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=4, num_stages=3),
    ]


def fp32_config_ok(cfg) -> bool:
    """fp32 inputs run the 'ieee' FMA dot, whose operand tiles live in registers and whose K step is
    fully unrolled: the 128-wide fp32 tiles spill or exceed shared memory and 64 × 64 × 64 spilled
    8.8 KB in the weight-gradient GEMM (ptxas -v, sm_90a and sm_80); 64 × 64 × 16 still spilled 4–8 B
    in one kernel or another at every warp/stage count tried, 32 × 64 × 16 is clean for every kernel
    on both. So fp32 (a test/debug dtype on GPU) autotunes over that config only, and the other
    dtypes over the rest."""
    return cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] <= 64 * 64 and cfg.kwargs["BLOCK_K"] <= 16


def _prune_by_dtype(configs, named_args, **kwargs):
    """early_config_prune: fp32 keeps the fp32_config_ok configs, other dtypes the rest."""
    first = next((v for v in named_args.values() if isinstance(v, torch.Tensor)), None)
    is_fp32 = first is not None and first.dtype == torch.float32
    return [c for c in configs if fp32_config_ok(c) == is_fp32] or configs


PRUNE = {"early_config_prune": _prune_by_dtype}


def _interp_configs():
    # the interpreter cannot autotune and each program costs milliseconds: one small config
    return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4, num_stages=1)]


if HAS_TRITON:
    # fp32 inputs multiply in full fp32 like torch's default matmul (no silent TF32); fp16/bf16
    # inputs are unaffected and use the tensor cores either way
    PRECISION = tl.constexpr("ieee")
    GEMM_CONFIGS = _gemm_configs()
    # row tiles per L2 group (_grouped_tile): 8 × 128 rows × D 4096 bf16 = 8 MB of activations stay
    # resident while the group sweeps the weight columns (H100/H200 L2: 50 MB)
    GROUP_M = TRAFFIC_GROUP_M
    ACTIVE_CONFIGS = _interp_configs() if INTERPRET else GEMM_CONFIGS

    @triton.jit
    def _grouped_tile(pid, n_cols, counts_ptr, E, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr):
        """Program id → (expert, row tile within the expert, column tile, valid); plain-Python twin:
        ``kernels.moe.traffic.grouped_programs``. Expert e owns programs [c_e·n_cols, c_{e+1}·n_cols)
        (c = cumulative row tiles); inside it, GROUP_M row tiles sweep all column tiles before the
        next GROUP_M start, so consecutive programs share the activation's row tiles (L2 hits) and a
        group never mixes experts. Computed from the device counts: the grid is an upper bound
        ((cdiv(M, BLOCK_M) + E)·n_cols), programs past the last tile are invalid, no host sync."""
        t = pid // n_cols
        e_idx = tl.arange(0, E_POW2)
        counts = tl.load(counts_ptr + e_idx, mask=e_idx < E, other=0)
        tiles = (counts + BLOCK_M - 1) // BLOCK_M
        cum = tl.cumsum(tiles, 0)
        valid = t < tl.sum(tiles, 0)
        e = tl.minimum(tl.sum((cum <= t).to(tl.int32), 0), E - 1)
        first_tile = tl.sum(tl.where(e_idx == e, cum - tiles, 0), 0)
        n_tiles = tl.sum(tl.where(e_idx == e, tiles, 0), 0)
        q = pid - first_tile * n_cols  # program index inside expert e
        per_group = GROUP_M * n_cols
        first_row = (q // per_group) * GROUP_M
        size_m = tl.maximum(tl.minimum(n_tiles - first_row, GROUP_M), 1)  # ≥ 1 keeps invalid pids finite
        row_tile = first_row + (q % per_group) % size_m
        col_tile = (q % per_group) // size_m
        # past the last tile: (spare tile index, column) in plain order, for kernels that clear the
        # dropped slots' rows (there are always enough spare programs, see _tile_grid)
        row_tile = tl.where(valid, row_tile, t - tl.sum(tiles, 0))
        col_tile = tl.where(valid, col_tile, pid - t * n_cols)
        return e, row_tile, col_tile, valid

    @triton.jit
    def _expert_rows(e, row_tile, offsets_ptr, BLOCK_M: tl.constexpr):
        """Sorted-order rows [row0, row0 + BLOCK_M) of expert e's tile, and the expert's end row."""
        start = tl.load(offsets_ptr + e)
        end = tl.load(offsets_ptr + e + 1)
        return start + row_tile * BLOCK_M + tl.arange(0, BLOCK_M), end

    @triton.jit
    def _swizzle(pid, n_rows, n_cols, GROUP_M):
        """Triton-tutorial grouped order over an n_rows × n_cols grid of output tiles (weight-gradient
        GEMMs: all experts have the same output shape). Twin: ``kernels.moe.traffic.swizzled_programs``."""
        per_group = GROUP_M * n_cols
        first_row = (pid // per_group) * GROUP_M
        size_m = tl.minimum(n_rows - first_row, GROUP_M)
        return first_row + (pid % per_group) % size_m, (pid % per_group) // size_m

    @triton.jit
    def _silu(g):
        return g * tl.sigmoid(g)

    @triton.jit
    def _gelu(h):
        return 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))

    @triton.autotune(configs=ACTIVE_CONFIGS, key=["D", "F", "SWIGLU", "STORE_H"], prune_configs_by=PRUNE)
    @triton.jit
    def _gather_act_fwd(
        x_ptr,
        w_ptr,
        h_ptr,
        a_ptr,
        slot_ptr,
        counts_ptr,
        offsets_ptr,
        M,
        K_SLOTS,
        D,
        F,
        E,
        stride_we,
        stride_wd,
        stride_wh,
        SWIGLU: tl.constexpr,
        STORE_H: tl.constexpr,
        E_POW2: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        # SwiGLU: a tile is BLOCK_N columns of h = BLOCK_N/2 gate + BLOCK_N/2 up columns, so the two
        # fp32 accumulators hold BLOCK_M × BLOCK_N values together, like any GEMM tile (two full-width
        # accumulators spilled in 4 of 5 configs)
        COLS: tl.constexpr = BLOCK_N // 2 if SWIGLU else BLOCK_N
        n_cols = tl.cdiv(F, COLS)
        e, row_tile, col_tile, valid = _grouped_tile(tl.program_id(0), n_cols, counts_ptr, E, E_POW2, BLOCK_M, GROUP_M)
        if valid:
            offs_m, row_end = _expert_rows(e, row_tile, offsets_ptr, BLOCK_M)
            m_mask = offs_m < row_end
            tok = (tl.load(slot_ptr + offs_m, mask=m_mask, other=0) // K_SLOTS).to(tl.int64)
            offs_n = col_tile * COLS + tl.arange(0, COLS)
            n_mask = offs_n < F
            offs_k = tl.arange(0, BLOCK_K)
            x_ptrs = x_ptr + tok[:, None] * D + offs_k[None, :]
            w_ptrs = w_ptr + e.to(tl.int64) * stride_we + offs_k[:, None] * stride_wd + offs_n[None, :] * stride_wh
            acc_g = tl.zeros([BLOCK_M, COLS], dtype=tl.float32)
            acc_u = tl.zeros([BLOCK_M, COLS], dtype=tl.float32)
            for k0 in range(0, D, BLOCK_K):
                k_mask = (offs_k + k0) < D
                xa = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                wg = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                acc_g = tl.dot(xa, wg, acc_g, input_precision=PRECISION)
                if SWIGLU:
                    wu = tl.load(w_ptrs + F * stride_wh, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                    acc_u = tl.dot(xa, wu, acc_u, input_precision=PRECISION)
                x_ptrs += BLOCK_K
                w_ptrs += BLOCK_K * stride_wd
            H = 2 * F if SWIGLU else F
            rows = offs_m.to(tl.int64)[:, None]
            mask = m_mask[:, None] & n_mask[None, :]
            # store h first: each accumulator is dead as soon as the activation has consumed it
            if STORE_H:
                tl.store(h_ptr + rows * H + offs_n[None, :], acc_g.to(h_ptr.dtype.element_ty), mask=mask)
                if SWIGLU:
                    tl.store(h_ptr + rows * H + F + offs_n[None, :], acc_u.to(h_ptr.dtype.element_ty), mask=mask)
            if SWIGLU:
                act = _silu(acc_g) * acc_u
            else:
                act = _gelu(acc_g)
            tl.store(a_ptr + rows * F + offs_n[None, :], act.to(a_ptr.dtype.element_ty), mask=mask)
        elif STORE_H:
            # h is an output of the op: its dropped-slot rows [S, M) are written as 0, never left
            # uninitialised. The spare programs (≥ cdiv(M - S, BLOCK_M) per column) do it.
            H = 2 * F if SWIGLU else F
            offs_m = tl.load(offsets_ptr + E) + row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = col_tile * COLS + tl.arange(0, COLS)
            mask = (offs_m < M)[:, None] & (offs_n < F)[None, :]
            zero = tl.zeros([BLOCK_M, COLS], dtype=h_ptr.dtype.element_ty)
            ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * H + offs_n[None, :]
            tl.store(ptrs, zero, mask=mask)
            if SWIGLU:
                tl.store(ptrs + F, zero, mask=mask)

    @triton.autotune(configs=ACTIVE_CONFIGS, key=["K_IN", "N_OUT", "HAS_GATE"], prune_configs_by=PRUNE)
    @triton.jit
    def _scatter_gemm(
        a_ptr,
        w_ptr,
        out_ptr,
        slot_ptr,
        gate_ptr,
        counts_ptr,
        offsets_ptr,
        K_IN,
        N_OUT,
        E,
        stride_we,
        stride_wk,
        stride_wn,
        HAS_GATE: tl.constexpr,
        E_POW2: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        n_cols = tl.cdiv(N_OUT, BLOCK_N)
        e, row_tile, col_tile, valid = _grouped_tile(tl.program_id(0), n_cols, counts_ptr, E, E_POW2, BLOCK_M, GROUP_M)
        if valid:
            offs_m, row_end = _expert_rows(e, row_tile, offsets_ptr, BLOCK_M)
            m_mask = offs_m < row_end
            slot = tl.load(slot_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
            offs_n = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N_OUT
            offs_k = tl.arange(0, BLOCK_K)
            a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * K_IN + offs_k[None, :]
            w_ptrs = w_ptr + e.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, K_IN, BLOCK_K):
                k_mask = (offs_k + k0) < K_IN
                a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                acc = tl.dot(a, w, acc, input_precision=PRECISION)
                a_ptrs += BLOCK_K
                w_ptrs += BLOCK_K * stride_wk
            if HAS_GATE:
                acc *= tl.load(gate_ptr + slot, mask=m_mask, other=0.0).to(tl.float32)[:, None]
            tl.store(
                out_ptr + slot[:, None] * N_OUT + offs_n[None, :],
                acc.to(out_ptr.dtype.element_ty),
                mask=m_mask[:, None] & n_mask[None, :],
            )

    @triton.jit
    def _combine_kernel(o_ptr, ids_ptr, y_ptr, K_SLOTS, D, E, BLOCK_D: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j in range(K_SLOTS):
            m = n * K_SLOTS + j
            e = tl.load(ids_ptr + m)
            keep = (e >= 0) & (e < E)  # dropped / out-of-range slots' rows were never written
            acc += tl.load(o_ptr + m * D + offs_d, mask=d_mask & keep, other=0.0).to(tl.float32)
        tl.store(y_ptr + n * D + offs_d, acc.to(y_ptr.dtype.element_ty), mask=d_mask)


def _e_pow2(E: int) -> int:
    return max(2, triton.next_power_of_2(E))  # 1-element aranges trip some codegen paths


def _tile_grid(M: int, E: int, ncols: int, half_n: bool = False):
    """1-D grid over (row tile, column tile) pairs, in _grouped_tile's order. The row-tile count is an
    upper bound (every expert adds at most one partial tile); extra programs exit at once.
    half_n: the kernel's column tile is BLOCK_N // 2 wide (SwiGLU gate/up halves)."""

    def grid(meta):
        cols = meta["BLOCK_N"] // 2 if half_n else meta["BLOCK_N"]
        return ((triton.cdiv(M, meta["BLOCK_M"]) + E) * triton.cdiv(ncols, cols),)

    return grid


def gather_act_fwd(x_ND: torch.Tensor, w_EDH: torch.Tensor, r: Routing, k: int, swiglu: bool, store_h: bool):
    """a_MF = act(x[tok] @ w_in[e]) in sorted order; h_MH (pre-activation) too when store_h, with
    the dropped slots' rows set to 0 (a_MF's are left unwritten: nothing reads them)."""
    M, E, D, H = r.sorted_slot_M.numel(), w_EDH.shape[0], w_EDH.shape[1], w_EDH.shape[2]
    F = H // 2 if swiglu else H
    a_MF = torch.empty((M, F), dtype=x_ND.dtype, device=x_ND.device)
    h_MH = torch.empty((M, H), dtype=x_ND.dtype, device=x_ND.device) if store_h else None
    _gather_act_fwd[_tile_grid(M, E, F, half_n=swiglu)](
        x_ND,
        w_EDH,
        h_MH if store_h else a_MF,
        a_MF,
        r.sorted_slot_M,
        r.counts_E,
        r.offsets_E1,
        M,
        k,
        D,
        F,
        E,
        *w_EDH.stride(),
        SWIGLU=swiglu,
        STORE_H=store_h,
        E_POW2=_e_pow2(E),
        GROUP_M=GROUP_M,
    )
    return h_MH, a_MF


def scatter_gemm(a_MK: torch.Tensor, w_EKD: torch.Tensor, r: Routing, gates_M: torch.Tensor | None):
    """o_MD[slot] = gate[slot] · (a[p] @ w[e]); w_EKD may be a strided view (e.g. w_in transposed).
    Rows of dropped slots are left unwritten (combine() skips them)."""
    M, E, K_in, D = r.sorted_slot_M.numel(), w_EKD.shape[0], w_EKD.shape[1], w_EKD.shape[2]
    o_MD = torch.empty((M, D), dtype=a_MK.dtype, device=a_MK.device)
    _scatter_gemm[_tile_grid(M, E, D)](
        a_MK,
        w_EKD,
        o_MD,
        r.sorted_slot_M,
        gates_M if gates_M is not None else a_MK,
        r.counts_E,
        r.offsets_E1,
        K_in,
        D,
        E,
        *w_EKD.stride(),
        HAS_GATE=gates_M is not None,
        E_POW2=_e_pow2(E),
        GROUP_M=GROUP_M,
    )
    return o_MD


def combine(o_MD: torch.Tensor, ids_M: torch.Tensor, N: int, k: int, E: int) -> torch.Tensor:
    """y_ND[n] = Σ_j o_MD[n·k + j] over kept slots (id in [0, E)), in fixed order (deterministic)."""
    D = o_MD.shape[1]
    y_ND = torch.empty((N, D), dtype=o_MD.dtype, device=o_MD.device)
    block_d = min(triton.next_power_of_2(D), 1024)
    _combine_kernel[(N, triton.cdiv(D, block_d))](o_MD, ids_M, y_ND, k, D, E, BLOCK_D=block_d)
    return y_ND
