"""Plain-Python twins of the grouped GEMMs' program → tile maps, and an L2 traffic model.

Legend (shape suffixes):
    N tokens   k slots/token   M = N·k slots   E experts   D model width   F expert hidden width
    H = 2F (SwiGLU [gate | up])   T_e row tiles of expert e   C column tiles

``grouped_programs`` mirrors ``kernels.moe.grouped_gemm._grouped_tile`` (row-tile GEMMs: the gather
forward, the scatter forward and dx, the activation backward) and ``swizzled_programs`` mirrors
``_swizzle`` (the weight-gradient GEMMs); tests check the jit helpers against these twins and both
for being bijections. ``modelled_dram_bytes`` replays the programs in launch order, n_sm at a time
walking K in lockstep, through an LRU cache of operand tiles (tile rows × a K chunk) and counts the
bytes that miss: a GPU-free estimate of what the tile order costs in DRAM traffic.
No torch or triton import: the static benchmark calls this on any machine.
"""

from __future__ import annotations

from collections import OrderedDict

GROUP_M = 8  # row tiles per L2 group; the kernels (grouped_gemm.py) import it from here
GEMMS = ("gather_fwd", "scatter_fwd", "act_bwd", "dx", "dw_in", "dw_out")
ORDERS = ("column_major", "grouped")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def grouped_programs(counts: list[int], block_m: int, n_cols: int, group_m: int, n_programs: int | None = None):
    """pid → (expert, row tile inside the expert, column tile), None for programs past the last tile.

    Expert e owns pids [c_e·n_cols, c_{e+1}·n_cols) with c the cumulative row tiles; inside, GROUP_M
    row tiles sweep every column before the next group starts. n_programs defaults to the launch
    grid ((cdiv(Σcounts, block_m) + E) · n_cols)."""
    tiles = [_cdiv(c, block_m) for c in counts]
    if n_programs is None:
        n_programs = (_cdiv(sum(counts), block_m) + len(counts)) * n_cols
    first, acc = [], 0
    for t in tiles:
        first.append(acc)
        acc += t
    out = []
    for pid in range(n_programs):
        t = pid // n_cols
        if t >= acc:
            out.append(None)
            continue
        e = max(i for i in range(len(tiles)) if first[i] <= t and tiles[i] > 0)
        q = pid - first[e] * n_cols
        per_group = group_m * n_cols
        first_row = (q // per_group) * group_m
        size_m = max(min(tiles[e] - first_row, group_m), 1)
        out.append((e, first_row + (q % per_group) % size_m, (q % per_group) // size_m))
    return out


def column_major_programs(counts: list[int], block_m: int, n_cols: int):
    """The previous order: row tiles fastest (all experts), then the next column tile."""
    order = [(e, r) for e, c in enumerate(counts) for r in range(_cdiv(c, block_m))]
    return [(e, r, j) for j in range(n_cols) for e, r in order]


def swizzled_programs(n_rows: int, n_cols: int, group_m: int):
    """pid → (row tile, column tile) of the Triton tutorial's grouped order (weight gradients)."""
    out = []
    for pid in range(n_rows * n_cols):
        per_group = group_m * n_cols
        first_row = (pid // per_group) * group_m
        size_m = min(n_rows - first_row, group_m)
        out.append((first_row + (pid % per_group) % size_m, (pid % per_group) // size_m))
    return out


def dw_group_m(rows_per_expert: int, J: int, dtype_bytes: int, l2_bytes: float = 50e6) -> int:
    """Rows of output tiles per group for the weight-gradient GEMMs. When an expert's whole B
    operand (rows × J) fits in 80 % of the L2, the row-major order (group 1: J fastest) already reads
    every operand once and grouping only re-reads B; otherwise GROUP_M rows share B's column slabs.
    Decided from Python ints (the mean rows per expert), never from device data."""
    return 1 if rows_per_expert * J * dtype_bytes <= 0.8 * l2_bytes else GROUP_M


def _gemm_dims(gemm: str, D: int, F: int):
    """(A width = K of the row-tile GEMM, output columns) for the row-tile GEMMs."""
    return {"gather_fwd": (D, 2 * F), "scatter_fwd": (F, D), "act_bwd": (D, F), "dx": (2 * F, D)}[gemm]


def modelled_dram_bytes(
    gemm: str,
    D: int,
    F: int,
    E: int,
    k: int,
    N: int,
    tile_m: int,
    tile_n: int,
    tile_k: int,
    order: str,
    l2_bytes: float = 50e6,
    dtype_bytes: int = 2,
    counts: list[int] | None = None,
    n_sm: int = 132,
    k_chunk: int | None = None,
) -> int:
    """Modelled DRAM bytes of one grouped GEMM of the SwiGLU expert MLP (reads through an LRU L2 of
    l2_bytes, plus one write of the output).

    gemm: "gather_fwd" (x[tok] @ w_in, M×D·D×2F), "scatter_fwd" (a @ w_out), "act_bwd" (dy[tok] @
    w_outᵀ), "dx" (dh @ w_inᵀ), "dw_in" (x[tok]ᵀ dh, D×2F per expert), "dw_out" (aᵀ dy, F×D).
    order: "column_major" (row tiles fastest, the previous kernels) | "grouped" (this package's).
    counts: rows per expert (default: N·k spread evenly). n_sm programs run at once (H100/H200:
    132) and walk K together in chunks of k_chunk (default 8·tile_k; coarser is faster to model).
    """
    if gemm not in GEMMS:
        raise ValueError(f"gemm={gemm!r} is not one of {GEMMS}")
    if order not in ORDERS:
        raise ValueError(f"order={order!r} is not one of {ORDERS}")
    if counts is None:
        M = N * k
        counts = [M // E + (1 if e < M % E else 0) for e in range(E)]
    k_chunk = k_chunk or 8 * tile_k
    cache: OrderedDict = OrderedDict()
    state = {"used": 0, "missed": 0}

    def touch(key, nbytes):
        if key in cache:
            cache.move_to_end(key)
            return
        state["missed"] += nbytes
        cache[key] = nbytes
        state["used"] += nbytes
        while state["used"] > l2_bytes and cache:
            state["used"] -= cache.popitem(last=False)[1]

    def replay(programs, k_len, k_len_of=None):
        """Waves of n_sm programs run concurrently and walk K in lockstep, chunk by chunk."""
        for w0 in range(0, len(programs), n_sm):
            wave = programs[w0 : w0 + n_sm]
            longest = max(k_len_of(p) if k_len_of else k_len for p in wave)
            for kc in range(0, longest, k_chunk):
                for p in wave:
                    kl = k_len_of(p) if k_len_of else k_len
                    if kc < kl:
                        width = min(k_chunk, kl - kc)
                        for key, nbytes_per_k in p[1]:
                            touch(key + (kc,), nbytes_per_k * width)

    if gemm in ("dw_in", "dw_out"):
        I, J = (D, 2 * F) if gemm == "dw_in" else (F, D)
        n_i, n_j = _cdiv(I, tile_m), _cdiv(J, tile_n)
        group = dw_group_m(sum(counts) // E, J, dtype_bytes, l2_bytes)
        tiles = (
            swizzled_programs(n_i, n_j, group)
            if order == "grouped"
            else [(i, j) for i in range(n_i) for j in range(n_j)]
        )  # the previous order: J fastest
        a_factor = 2 if gemm == "dw_out" else 1  # dw_out reads h = [gate | up] and recomputes a
        progs = [
            (
                e,
                [
                    (("A", e, i), a_factor * min(tile_m, I - i * tile_m) * dtype_bytes),
                    (("B", e, j), min(tile_n, J - j * tile_n) * dtype_bytes),
                ],
            )
            for e in range(E)
            for i, j in tiles
        ]  # expert = the slow grid axis
        replay(progs, 0, k_len_of=lambda p: counts[p[0]])  # K = the expert's rows
        return int(state["missed"] + E * I * J * dtype_bytes)

    K, n_out = _gemm_dims(gemm, D, F)
    # SwiGLU forward: a column tile is tile_n columns of h (tile_n / 2 gate + tile_n / 2 up)
    n_cols = _cdiv(n_out, tile_n)
    if order == "grouped":
        tiles = [p for p in grouped_programs(counts, tile_m, n_cols, GROUP_M) if p is not None]
    else:
        tiles = column_major_programs(counts, tile_m, n_cols)
    progs = [
        (
            e,
            [
                (("A", e, r), min(tile_m, counts[e] - r * tile_m) * dtype_bytes),
                (("W", e, j), min(tile_n, n_out - j * tile_n) * dtype_bytes),
            ],
        )
        for e, r, j in tiles
    ]
    replay(progs, K)
    return int(state["missed"] + sum(counts) * n_out * dtype_bytes)


def ideal_dram_bytes(gemm: str, D: int, F: int, E: int, k: int, N: int, dtype_bytes: int = 2) -> int:
    """Every operand read once and the output written once (an infinite L2)."""
    M = N * k
    if gemm == "dw_in":
        return (M * D + M * 2 * F + E * D * 2 * F) * dtype_bytes
    if gemm == "dw_out":
        return (2 * M * F + M * D + E * F * D) * dtype_bytes
    K, n_out = _gemm_dims(gemm, D, F)
    return (M * K + E * K * n_out + M * n_out) * dtype_bytes


def saved_activation_bytes(
    N: int, k: int, D: int, F: int, dtype_bytes: int = 2, activation: str = "swiglu", version: str = "after"
) -> int:
    """Bytes the Triton expert MLP keeps from forward to backward per MoE layer, beyond its inputs
    (x, ids, gates and weights are the caller's tensors) and the int32 routing (4·(N·k + 2E + 2)).

    version "before": the pre-activation h (M × H) and the activation a (M × F) were both saved;
    "after": only h is saved, the backward recomputes a from it (SwiGLU inside the dw_out GEMM,
    GELU in the activation-backward epilogue). M = N·k slots, H = 2F for SwiGLU, F for GELU."""
    if version not in ("before", "after"):
        raise ValueError(f"version={version!r} is not one of ('before', 'after')")
    if activation not in ("swiglu", "gelu"):
        raise ValueError(f"activation={activation!r} is not one of ('swiglu', 'gelu')")
    M = N * k
    H = 2 * F if activation == "swiglu" else F
    return M * (H + (F if version == "before" else 0)) * dtype_bytes
