"""Triton group-gated GEMMs over column blocks (the MoHD sub-dimension kernels).

Legend (shape suffixes):
    N tokens (rows)   K input width   M output width   G groups   b block width (K/G or M/G)

A group e owns one contiguous column block of width b. ``gate_NG`` is dense (zero = group off):

    _gated_in_kernel:   y_NM[n]        = Σ_e gate[n, e] · x_NK[n, blk(e)] @ w_KM[blk(e), :]
                        (gathers the active column blocks of x and the matching row blocks of w)
    _gated_out_kernel:  y_NM[n, blk(e)] = gate[n, e] · (x_NK[n] @ w_KM[:, blk(e)])
                        (computes only the active column blocks of w; the others are written as 0)
    _gated_wgrad_out_kernel: dw_KM[:, blk(e)] = Σ_{n: gate[n, e] != 0} x_NK[n]ᵀ · gate[n, e] · dy_NM[n, blk(e)]
                        (the out-op's weight gradient; a token off group e never reaches blk(e))

Rows of a tile usually activate different groups, so a tile cannot gather one weight block for
all its rows (that needs the token sort of kernels.moe). Instead a tile visits each group once and
skips the group's GEMM when no row of the tile uses it: the work saved grows with the locality
of routing over consecutive tokens (MoHD's "activation flow"), and is zero for i.i.d. routing.
The per-group partial product is scaled in fp32 after the dot, so gates never round the inputs.
Selection is gate != 0 (a NaN gate selects); unselected rows are masked with tl.where or masked
loads, never multiplied by 0, so NaN/inf there contribute exactly nothing.
"""

from __future__ import annotations

import torch

from kernels import HAS_TRITON, INTERPRET

if HAS_TRITON:
    import triton
    import triton.language as tl


def _gemm_configs():
    """Block configs the autotuner may pick on a GPU (checked to fit sm_80/sm_90 shared memory by
    tests/kernels/test_mohd_compile.py). BLOCK_K is small because group blocks are narrow (b ≈ 32–128)."""
    cfg = triton.Config
    return [
        cfg({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        cfg({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        # BLOCK_K 32 (was 64 × 3 stages): gated_in spilled 32–104 B on sm_80 at K 64
        cfg({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        # fp32 only (see fp32_config_ok): the FMA dot keeps its operand tiles in registers
        cfg({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=4, num_stages=3),
    ]


def fp32_config_ok(cfg) -> bool:
    """fp32 inputs run the 'ieee' FMA dot: the 64 × 64 × 32 tile spilled 40–236 B (ptxas -v, sm_90a),
    64 × 64 × 16 does not, so fp32 autotunes over the K-16 config only (and bf16 over the rest)."""
    return cfg.kwargs["BLOCK_K"] <= 16


def _prune_by_dtype(configs, named_args, **kwargs):
    """early_config_prune: fp32 keeps the fp32_config_ok configs, other dtypes the rest."""
    first = next((v for v in named_args.values() if isinstance(v, torch.Tensor)), None)
    is_fp32 = first is not None and first.dtype == torch.float32
    return [c for c in configs if fp32_config_ok(c) == is_fp32] or configs


PRUNE = {"early_config_prune": _prune_by_dtype}


def _interp_configs():
    # the interpreter cannot autotune and each program costs milliseconds: one small config
    return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)]


if HAS_TRITON:
    # fp32 inputs multiply in full fp32 like torch's default matmul (no silent TF32)
    PRECISION = tl.constexpr("ieee")
    GEMM_CONFIGS = _gemm_configs()
    ACTIVE_CONFIGS = _interp_configs() if INTERPRET else GEMM_CONFIGS

    @triton.autotune(configs=ACTIVE_CONFIGS, key=["K", "M", "G"], prune_configs_by=PRUNE)
    @triton.jit
    def _gated_in_kernel(
        x_ptr,
        w_ptr,
        gate_ptr,
        y_ptr,
        N,
        K,
        M,
        G,
        B_IN,
        stride_wk,
        stride_wm,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask, n_mask = offs_m < N, offs_n < M
        rows = offs_m.to(tl.int64)
        arange_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for e in range(G):
            g = tl.load(gate_ptr + rows * G + e, mask=m_mask, other=0.0).to(tl.float32)
            # some row of the tile uses group e; a NaN gate counts as 1 (a max may drop NaN). This
            # form, not max((g != 0).to(int32)), keeps the fp32 stride_wk=1 variant spill-free on sm_90a
            if tl.max(tl.abs(tl.where(g == g, g, 1.0)), 0) > 0:
                part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for k0 in range(0, B_IN, BLOCK_K):
                    in_blk = (k0 + arange_k) < B_IN
                    offs_k = e * B_IN + k0 + arange_k
                    xa = tl.load(
                        x_ptr + rows[:, None] * K + offs_k[None, :], mask=m_mask[:, None] & in_blk[None, :], other=0.0
                    )
                    wt = tl.load(
                        w_ptr + offs_k[:, None].to(tl.int64) * stride_wk + offs_n[None, :] * stride_wm,
                        mask=in_blk[:, None] & n_mask[None, :],
                        other=0.0,
                    )
                    part = tl.dot(xa, wt, part, input_precision=PRECISION)
                # rows that do not use group e add exactly 0, even when their x block or w's rows
                # hold NaN/inf (0 · NaN would leak it)
                acc += tl.where((g != 0)[:, None], part * g[:, None], 0.0)
        tl.store(
            y_ptr + rows[:, None] * M + offs_n[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=m_mask[:, None] & n_mask[None, :],
        )

    @triton.autotune(configs=ACTIVE_CONFIGS, key=["K", "M", "G"], prune_configs_by=PRUNE)
    @triton.jit
    def _gated_out_kernel(
        x_ptr,
        w_ptr,
        gate_ptr,
        y_ptr,
        N,
        K,
        M,
        G,
        B_OUT,
        stride_wk,
        stride_wm,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        n_tiles = tl.cdiv(B_OUT, BLOCK_N)  # column tiles per group: tiles never straddle groups
        e = tl.program_id(1) // n_tiles
        col = (tl.program_id(1) % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_n = e * B_OUT + col
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask, n_mask = offs_m < N, col < B_OUT
        rows = offs_m.to(tl.int64)
        arange_k = tl.arange(0, BLOCK_K)
        g = tl.load(gate_ptr + rows * G + e, mask=m_mask, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if tl.max((g != 0).to(tl.int32), 0) > 0:  # else the tile's outputs are all zero: skip the GEMM
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + arange_k
                k_mask = offs_k < K
                xa = tl.load(
                    x_ptr + rows[:, None] * K + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0
                )
                wt = tl.load(
                    w_ptr + offs_k[:, None].to(tl.int64) * stride_wk + offs_n[None, :] * stride_wm,
                    mask=k_mask[:, None] & n_mask[None, :],
                    other=0.0,
                )
                acc = tl.dot(xa, wt, acc, input_precision=PRECISION)
        acc = tl.where((g != 0)[:, None], acc * g[:, None], 0.0)  # unselected blocks: exactly 0, even for NaN x
        tl.store(
            y_ptr + rows[:, None] * M + offs_n[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=m_mask[:, None] & n_mask[None, :],
        )

    @triton.autotune(configs=ACTIVE_CONFIGS, key=["K", "M", "G"], prune_configs_by=PRUNE)
    @triton.jit
    def _gated_wgrad_out_kernel(
        x_ptr,
        gate_ptr,
        dy_ptr,
        dw_ptr,
        N,
        K,
        M,
        G,
        B_OUT,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # a tile of dw_KM: BLOCK_M rows of K × BLOCK_N columns of group e, reduced over tokens in
        # chunks of BLOCK_K; tokens that did not select e are masked out of the loads (never 0 · x)
        n_tiles = tl.cdiv(B_OUT, BLOCK_N)
        e = tl.program_id(1) // n_tiles
        col = (tl.program_id(1) % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_c = e * B_OUT + col
        offs_k = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        k_mask, c_mask = offs_k < K, col < B_OUT
        arange_t = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for t0 in range(0, N, BLOCK_K):
            toks = (t0 + arange_t).to(tl.int64)
            g = tl.load(gate_ptr + toks * G + e, mask=toks < N, other=0.0).to(tl.float32)
            on = g != 0  # out-of-range tokens load g = 0; a NaN gate counts as selected
            if tl.max(on.to(tl.int32), 0) > 0:
                xt = tl.load(x_ptr + toks[None, :] * K + offs_k[:, None], mask=k_mask[:, None] & on[None, :], other=0.0)
                d = tl.load(dy_ptr + toks[:, None] * M + offs_c[None, :], mask=on[:, None] & c_mask[None, :], other=0.0)
                d = (d.to(tl.float32) * g[:, None]).to(x_ptr.dtype.element_ty)  # gated dy, in x's dtype
                acc = tl.dot(xt, d, acc, input_precision=PRECISION)
        tl.store(
            dw_ptr + offs_k[:, None].to(tl.int64) * M + offs_c[None, :],
            acc.to(dw_ptr.dtype.element_ty),
            mask=k_mask[:, None] & c_mask[None, :],
        )


def gated_in(x_NK: torch.Tensor, gate_NG: torch.Tensor, w_KM: torch.Tensor) -> torch.Tensor:
    """y = Σ_e gate[:, e] · x[:, blk(e)] @ w[blk(e), :]. x contiguous; w any strides; gate fp32 contiguous."""
    N, K = x_NK.shape
    M, G = w_KM.shape[1], gate_NG.shape[1]
    y_NM = torch.empty((N, M), dtype=x_NK.dtype, device=x_NK.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), triton.cdiv(M, meta["BLOCK_N"]))
    _gated_in_kernel[grid](x_NK, w_KM, gate_NG, y_NM, N, K, M, G, K // G, *w_KM.stride())
    return y_NM


def gated_out(x_NK: torch.Tensor, gate_NG: torch.Tensor, w_KM: torch.Tensor) -> torch.Tensor:
    """y[:, blk(e)] = gate[:, e] · (x @ w[:, blk(e)]). x contiguous; w any strides; gate fp32 contiguous."""
    N, K = x_NK.shape
    M, G = w_KM.shape[1], gate_NG.shape[1]
    b = M // G
    y_NM = torch.empty((N, M), dtype=x_NK.dtype, device=x_NK.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), G * triton.cdiv(b, meta["BLOCK_N"]))
    _gated_out_kernel[grid](x_NK, w_KM, gate_NG, y_NM, N, K, M, G, b, *w_KM.stride())
    return y_NM


def gated_wgrad_out(x_NK: torch.Tensor, gate_NG: torch.Tensor, dy_NM: torch.Tensor) -> torch.Tensor:
    """dw_KM[:, blk(e)] = Σ_{n: gate[n, e] != 0} x[n]ᵀ · gate[n, e] · dy[n, blk(e)] (the out-op's weight
    gradient; tokens off group e are masked out). x, dy contiguous, same dtype; gate fp32 contiguous."""
    N, K = x_NK.shape
    M, G = dy_NM.shape[1], gate_NG.shape[1]
    b = M // G
    dw_KM = torch.empty((K, M), dtype=x_NK.dtype, device=x_NK.device)
    grid = lambda meta: (triton.cdiv(K, meta["BLOCK_M"]), G * triton.cdiv(b, meta["BLOCK_N"]))
    _gated_wgrad_out_kernel[grid](x_NK, gate_NG, dy_NM, dw_KM, N, K, M, G, b)
    return dw_KM
