"""Grouped (L2-friendly) tile order of the MoE GEMMs: the jit maps against their plain-Python twins,
both bijections over ragged expert segments, and the traffic model's basic sanity.

Legend: E experts, counts rows per expert, BLOCK_M rows per tile, n_cols column tiles.
"""

from __future__ import annotations

import pytest
import torch

from kernels import triton_runnable
from kernels.moe.traffic import (
    GEMMS,
    column_major_programs,
    grouped_programs,
    ideal_dram_bytes,
    modelled_dram_bytes,
    swizzled_programs,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_runnable(DEVICE), reason="Triton cannot run here")

RAGGED = [  # (counts per expert, BLOCK_M, n_cols, GROUP_M)
    ([0, 1, 5, 0, 17, 3], 4, 3, 2),  # empty experts, a 1-row expert, odd counts
    ([0, 0, 23, 0], 4, 5, 8),  # everything on one expert, group wider than its tiles
    ([7, 7, 7], 8, 1, 3),  # one column tile
    ([0, 0, 0], 4, 2, 2),  # no rows at all
    ([33, 2, 9, 64, 1], 8, 4, 3),  # groups that end mid-expert
]


def _expected(counts, block_m, n_cols):
    return {(e, r, j) for e, c in enumerate(counts) for r in range(-(-c // block_m)) for j in range(n_cols)}


@pytest.mark.parametrize("counts,block_m,n_cols,group_m", RAGGED)
def test_grouped_order_is_a_bijection(counts, block_m, n_cols, group_m):
    progs = grouped_programs(counts, block_m, n_cols, group_m)
    valid = [p for p in progs if p is not None]
    assert len(valid) == len(set(valid)), "a tile is computed twice"
    assert set(valid) == _expected(counts, block_m, n_cols), "a tile is missing"
    # valid programs come first: the grid is an upper bound and the extra programs exit
    assert all(p is not None for p in progs[: len(valid)])
    assert set(column_major_programs(counts, block_m, n_cols)) == _expected(counts, block_m, n_cols)


def test_grouped_order_shares_row_tiles():
    # consecutive programs of one group revisit the same GROUP_M row tiles before moving on
    progs = grouped_programs([16, 0, 9], 4, 6, 2)
    assert [p[1] for p in progs[:4]] == [0, 1, 0, 1] and [p[2] for p in progs[:4]] == [0, 0, 1, 1]


@pytest.mark.parametrize("n_rows,n_cols,group_m", [(5, 3, 2), (1, 7, 8), (9, 1, 4), (6, 4, 1)])
def test_swizzle_is_a_bijection(n_rows, n_cols, group_m):
    tiles = swizzled_programs(n_rows, n_cols, group_m)
    assert sorted(tiles) == [(i, j) for i in range(n_rows) for j in range(n_cols)]


if triton_runnable(DEVICE):
    import triton
    import triton.language as tl

    from kernels.moe.grouped_gemm import _grouped_tile, _swizzle

    @triton.jit
    def _map_kernel(counts_ptr, out_ptr, n_cols, E, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        e, r, j, valid = _grouped_tile(pid, n_cols, counts_ptr, E, E_POW2, BLOCK_M, GROUP_M)
        tl.store(out_ptr + pid * 4 + 0, e)
        tl.store(out_ptr + pid * 4 + 1, r)
        tl.store(out_ptr + pid * 4 + 2, j)
        tl.store(out_ptr + pid * 4 + 3, valid.to(tl.int32))

    @triton.jit
    def _swizzle_kernel(out_ptr, n_rows, n_cols, GROUP_M):
        pid = tl.program_id(0)
        i, j = _swizzle(pid, n_rows, n_cols, GROUP_M)
        tl.store(out_ptr + pid * 2, i)
        tl.store(out_ptr + pid * 2 + 1, j)


@needs_triton
@pytest.mark.parametrize("counts,block_m,n_cols,group_m", RAGGED)
def test_jit_tile_map_matches_twin(counts, block_m, n_cols, group_m):
    E = len(counts)
    n_prog = (-(-sum(counts) // block_m) + E) * n_cols
    out = torch.full((n_prog, 4), -7, dtype=torch.int32, device=DEVICE)
    counts_t = torch.tensor(counts, dtype=torch.int32, device=DEVICE)
    _map_kernel[(n_prog,)](
        counts_t, out, n_cols, E, E_POW2=max(2, triton.next_power_of_2(E)), BLOCK_M=block_m, GROUP_M=group_m
    )
    got = [tuple(row[:3]) if row[3] else None for row in out.cpu().tolist()]
    assert got == grouped_programs(counts, block_m, n_cols, group_m)


@needs_triton
@pytest.mark.parametrize("n_rows,n_cols,group_m", [(5, 3, 2), (6, 4, 1)])
def test_jit_swizzle_matches_twin(n_rows, n_cols, group_m):
    out = torch.full((n_rows * n_cols, 2), -7, dtype=torch.int32, device=DEVICE)
    _swizzle_kernel[(n_rows * n_cols,)](out, n_rows, n_cols, group_m)
    assert [tuple(r) for r in out.cpu().tolist()] == swizzled_programs(n_rows, n_cols, group_m)


@pytest.mark.parametrize("gemm", GEMMS)
def test_traffic_model_bounds(gemm):
    # small L2 so that order matters at a shape the model replays in milliseconds
    kw = dict(D=256, F=512, E=4, k=2, N=2048, tile_m=64, tile_n=64, tile_k=32, l2_bytes=2e6, n_sm=8)
    old = modelled_dram_bytes(gemm, order="column_major", **kw)
    new = modelled_dram_bytes(gemm, order="grouped", **kw)
    ideal = ideal_dram_bytes(gemm, kw["D"], kw["F"], kw["E"], kw["k"], kw["N"])
    assert ideal <= new and ideal <= old
    huge = modelled_dram_bytes(gemm, order="grouped", **dict(kw, l2_bytes=1e12))
    assert huge == ideal  # an L2 that holds everything reads each operand exactly once


def test_traffic_model_rejects_bad_names():
    with pytest.raises(ValueError, match="gemm"):
        modelled_dram_bytes("nope", 8, 8, 1, 1, 8, 16, 16, 16, "grouped")
    with pytest.raises(ValueError, match="order"):
        modelled_dram_bytes("dx", 8, 8, 1, 1, 8, 16, 16, 16, "random")


def test_saved_activation_bytes():
    from kernels.moe.traffic import saved_activation_bytes

    # MoE-A: N 16384, k 8, F 1024, bf16: h (M × 2F) + a (M × F) before, h only after
    M = 16384 * 8
    assert saved_activation_bytes(16384, 8, 2048, 1024, 2, "swiglu", "before") == M * 3 * 1024 * 2
    assert saved_activation_bytes(16384, 8, 2048, 1024, 2, "swiglu", "after") == M * 2 * 1024 * 2
    assert saved_activation_bytes(10, 2, 8, 4, 4, "gelu", "after") == 20 * 4 * 4
    with pytest.raises(ValueError, match="version"):
        saved_activation_bytes(1, 1, 1, 1, version="now")
