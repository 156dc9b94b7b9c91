"""Routing metadata: top-k expert ids → assignments sorted by expert, per-expert counts and offsets.

Legend (shape suffixes):
    N  tokens            k  slots per token (runtime value)     M = N·k  assignments ("slots")
    E  experts           B  routing blocks of ROUTE_BLOCK slots  R = next_pow2(E + 2) histogram bins
    S  valid assignments (ids in [0, E)), S ≤ M

Slot ``m = n·k + j`` is token ``n``'s j-th choice. The sorted order is a *stable* sort of the slots by
expert id with dropped slots (id ``-1``) last, so it is deterministic and identical between the
Triton kernels and the torch fallback:

    sorted_slot_M[offsets_E1[e] : offsets_E1[e + 1]]   slots routed to expert e, ascending
    sorted_slot_M[offsets_E1[E] :]                     dropped slots (-1), ascending, then slots
                                                       with an out-of-range id, ascending

An id outside [-1, E) is never an address: it goes to its own discard bin (E + 1), is treated as
dropped by every kernel, and is counted in ``invalid_1`` on the device (no host sync; read it when
logging, or pass ``check_ids=True`` / SPARSE_ARCH_DEBUG_CHECKS=1 to ``expert_mlp`` for an error).

Triton path = three launches (ScatterMoE / megablocks style, but without any host sync):
    1. ``_histogram_kernel``  per routing block: counts per expert (dropped slots → bin E)
    2. ``_scan_kernel``       one program: per-expert totals, exclusive offsets, and for every
                              (block, expert) the base address where that block's slots land
    3. ``_scatter_kernel``    per routing block: in-block stable sort (key = bin·BLOCK + lane),
                              destination = base[block, bin] + rank in the sorted block
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kernels import HAS_TRITON, INTERPRET, resolve_backend

if HAS_TRITON:
    import triton
    import triton.language as tl

# slots per routing program. The in-block sort is cheap on a GPU at 1024 but costs ~1 s per
# program under the interpreter, where 128 keeps a test call near 0.1 s.
ROUTE_BLOCK = 128 if INTERPRET else 1024
SCAN_ROWS = 16  # routing blocks the scan program reads per step


class Routing(NamedTuple):
    """Sorted-by-expert view of an (N, k) assignment.

    sorted_slot_M: int32 (M,)   slot index m = n·k + j, grouped by expert, dropped slots last
    counts_E:      int32 (E,)   assignments per expert
    offsets_E1:    int32 (E+1,) exclusive prefix sum of counts; offsets_E1[E] = S
    invalid_1:     int32 (1,)   slots whose id is outside [-1, E) (treated as dropped)
    """

    sorted_slot_M: torch.Tensor
    counts_E: torch.Tensor
    offsets_E1: torch.Tensor
    invalid_1: torch.Tensor


if HAS_TRITON:

    @triton.jit
    def _bin(ids, E):
        """Histogram bin of each id: the expert, E for -1, E + 1 for anything else (compared in the
        ids' own width, so huge int64 ids cannot wrap into range)."""
        return tl.where(ids == -1, E, tl.where((ids >= 0) & (ids < E), ids, E + 1)).to(tl.int32)

    @triton.jit
    def _histogram_kernel(ids_ptr, hist_ptr, M, E, R: tl.constexpr, BLOCK: tl.constexpr):
        """hist_BR[b, r] = #slots of block b in bin r (bin E: dropped and padding lanes, E + 1: ids
        out of range, so no id can index past the R bins)."""
        b = tl.program_id(0)
        offs = b * BLOCK + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + offs, mask=offs < M, other=-1)
        bins = _bin(ids, E)
        tl.store(hist_ptr + b * R + tl.arange(0, R), tl.histogram(bins, R))

    @triton.jit
    def _scan_kernel(
        hist_ptr,
        base_ptr,
        counts_ptr,
        offsets_ptr,
        invalid_ptr,
        NB,
        M,
        E,
        R: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One program: totals per bin, then base_BR[b, r] = where block b's bin-r slots start,
        minus the in-block start of bin r (so the scatter kernel adds its in-block sorted lane)."""
        r = tl.arange(0, R)
        rows = tl.arange(0, ROWS)
        total_R = tl.zeros([R], dtype=tl.int32)
        for b0 in range(0, NB, ROWS):
            mask = (b0 + rows)[:, None] < NB
            h = tl.load(hist_ptr + (b0 + rows)[:, None] * R + r[None, :], mask=mask, other=0)
            total_R += tl.sum(h, axis=0)
        # padding lanes of the last block were counted in bin E; they are not slots
        total_R = tl.where(r == E, total_R - (NB * BLOCK - M), total_R)
        start_R = tl.cumsum(total_R, 0) - total_R  # exclusive: where each bin starts globally
        tl.store(counts_ptr + r, total_R, mask=r < E)
        tl.store(offsets_ptr + r, start_R, mask=r <= E)
        tl.store(invalid_ptr + r * 0, total_R, mask=r == E + 1)
        running_R = start_R
        for b0 in range(0, NB, ROWS):
            mask = (b0 + rows)[:, None] < NB
            h = tl.load(hist_ptr + (b0 + rows)[:, None] * R + r[None, :], mask=mask, other=0)
            before_in_rows = tl.cumsum(h, 0) - h  # earlier blocks of this step, same bin
            in_block_start = tl.cumsum(h, 1) - h  # lower bins of the same block
            base = running_R[None, :] + before_in_rows - in_block_start
            tl.store(base_ptr + (b0 + rows)[:, None] * R + r[None, :], base, mask=mask)
            running_R += tl.sum(h, axis=0)

    @triton.jit
    def _scatter_kernel(ids_ptr, base_ptr, sorted_ptr, M, E, R: tl.constexpr, BLOCK: tl.constexpr):
        """Stable in-block sort by bin, then sorted_slot[base[b, bin] + lane] = slot."""
        b = tl.program_id(0)
        lane = tl.arange(0, BLOCK)
        offs = b * BLOCK + lane
        ids = tl.load(ids_ptr + offs, mask=offs < M, other=-1)
        bins = _bin(ids, E)
        key = tl.sort(bins * BLOCK + lane)  # lane in the low bits keeps the sort stable
        bin_s = key // BLOCK
        slot = b * BLOCK + key % BLOCK
        dest = tl.load(base_ptr + b * R + bin_s) + lane
        tl.store(sorted_ptr + dest, slot, mask=slot < M)


def _route_triton(ids_M: torch.Tensor, num_experts: int) -> Routing:
    M = ids_M.numel()
    R = triton.next_power_of_2(num_experts + 2)
    NB = triton.cdiv(M, ROUTE_BLOCK)
    dev = ids_M.device
    hist_BR = torch.empty((NB, R), dtype=torch.int32, device=dev)
    base_BR = torch.empty((NB, R), dtype=torch.int32, device=dev)
    counts_E = torch.empty(num_experts, dtype=torch.int32, device=dev)
    offsets_E1 = torch.empty(num_experts + 1, dtype=torch.int32, device=dev)
    sorted_slot_M = torch.empty(M, dtype=torch.int32, device=dev)
    invalid_1 = torch.empty(1, dtype=torch.int32, device=dev)
    _histogram_kernel[(NB,)](ids_M, hist_BR, M, num_experts, R=R, BLOCK=ROUTE_BLOCK)
    _scan_kernel[(1,)](
        hist_BR,
        base_BR,
        counts_E,
        offsets_E1,
        invalid_1,
        NB,
        M,
        num_experts,
        R=R,
        ROWS=SCAN_ROWS,
        BLOCK=ROUTE_BLOCK,
        num_warps=8,
    )
    _scatter_kernel[(NB,)](ids_M, base_BR, sorted_slot_M, M, num_experts, R=R, BLOCK=ROUTE_BLOCK, num_warps=8)
    return Routing(sorted_slot_M, counts_E, offsets_E1, invalid_1)


def _route_torch(ids_M: torch.Tensor, num_experts: int) -> Routing:
    """Same bins and order as the Triton path, with fixed-size ops only (no data-dependent shapes,
    so torch.compile traces it: bincount's length depends on the largest id)."""
    E = num_experts
    ids_M = ids_M.long()
    bins_M = torch.where(ids_M == -1, E, torch.where((ids_M >= 0) & (ids_M < E), ids_M, E + 1))
    sorted_slot_M = torch.argsort(bins_M, stable=True).to(torch.int32)
    hist = torch.zeros(E + 2, dtype=torch.int32, device=ids_M.device).scatter_add_(
        0, bins_M, torch.ones_like(bins_M, dtype=torch.int32)
    )
    counts_E = hist[:E].contiguous()
    offsets_E1 = torch.cat([hist.new_zeros(1), torch.cumsum(counts_E, 0, dtype=torch.int32)])
    return Routing(sorted_slot_M, counts_E, offsets_E1, hist[E + 1 :].contiguous())


def route(expert_ids: torch.Tensor, num_experts: int, backend: str = "auto") -> Routing:
    """Sort the (N, k) assignments by expert. ``-1`` ids are dropped (sorted last, not counted).

    expert_ids: int32/int64 (N, k) with values in [0, num_experts) or -1. Any other id is treated as
    dropped (sorted after the -1 slots) and counted in ``invalid_1``: no host sync, no bad address.
    backend: "triton" | "torch" | "auto" (Triton on CUDA, torch elsewhere). Both give identical output.
    """
    if not isinstance(expert_ids, torch.Tensor) or expert_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(
            f"expert_ids must be an int32/int64 tensor, got {getattr(expert_ids, 'dtype', type(expert_ids))}"
        )
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    ids_M = expert_ids.reshape(-1).contiguous()
    backend = resolve_backend(backend, ids_M.device, ("triton", "torch"))
    if backend == "triton" and ids_M.numel() > 0:
        return _route_triton(ids_M, num_experts)
    return _route_torch(ids_M, num_experts)
