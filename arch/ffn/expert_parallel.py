"""Expert parallelism: each rank of the ep group owns E/ep experts; token rows travel to them and back.

``expert_compute`` is what every expert block calls in place of ``kernels.moe.expert_mlp``. Without
a shard (one process, or ``trainer.expert_parallel=1``) it *is* ``expert_mlp``. With one
(``training.distributed.parallel.shard_experts`` sets ``module.expert_shard``), for the local tokens:

1. sort the (token, slot) pairs by expert id; dropped slots (id −1) are left out;
2. exchange per-expert counts (``all_to_all_single`` of an (ep, E/ep) count table), so every rank
   knows how many rows it will receive from each peer for each of its experts (uneven splits);
3. ``all_to_all_single`` the rows, run them through the local experts with ``expert_mlp``
   (gate 1 — the gates are applied at home), ``all_to_all_single`` the outputs back;
4. weight each slot by its gate and sum the k slots of each token.

The row exchanges are autograd-aware functional collectives (``all_to_all_single_autograd``): the backward
sends output gradients to the experts' owners and input gradients home along the same splits.
Routing (top-k, elastic k, expert-subset masks, capacity) happens before dispatch and is unchanged,
so every routing option works with expert parallelism.

Legend: N tokens, K slots per token, S = routed slots sent, R = rows received, D width, E experts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from arch.layers import autocast_operands
from kernels.moe import expert_mlp


class ExpertShard(NamedTuple):
    """This rank's place in the expert-parallel group."""

    group: object  # torch.distributed ProcessGroup
    size: int
    rank: int


def expert_compute(
    x_ND: torch.Tensor,
    ids_NK: torch.Tensor,
    gates_NK: torch.Tensor,
    w_in_EDH: torch.Tensor,
    w_out_EFD: torch.Tensor,
    activation: str,
    backend: str,
    shard: ExpertShard | None = None,
) -> torch.Tensor:
    """Σ_k gate[n,k] · expert_{ids[n,k]}(x[n]) → (N, D). ``w_*`` hold only the local experts when sharded.

    Under autocast the operands run in the autocast dtype (``arch.layers.autocast_operands``)."""
    x_ND, gates_NK, w_in_EDH, w_out_EFD = autocast_operands(x_ND, gates_NK, w_in_EDH, w_out_EFD)
    if shard is None or shard.size == 1:
        return expert_mlp(x_ND, ids_NK, gates_NK, w_in_EDH, w_out_EFD, activation, backend)
    from torch.distributed import all_to_all_single as all_to_all_counts

    N, K = ids_NK.shape
    D = x_ND.shape[1]
    local_experts = w_in_EDH.shape[0]
    n_experts = local_experts * shard.size

    ids_M = ids_NK.reshape(-1)
    routed_M = ids_M >= 0
    # Stable sort by expert id; dropped slots get id E so they sort last and are cut off.
    order_M = torch.sort(torch.where(routed_M, ids_M, n_experts), stable=True).indices
    n_routed = int(routed_M.sum())
    order_S = order_M[:n_routed]
    send_ND = x_ND[order_S // K]  # (S, D), grouped by expert
    counts_E = torch.bincount(ids_M[routed_M], minlength=n_experts)

    # Per-expert counts travel first so the receivers can size their buffers and label rows.
    recv_counts = torch.empty_like(counts_E)
    all_to_all_counts(recv_counts, counts_E, group=shard.group)  # [src rank, local expert]
    send_splits = counts_E.view(shard.size, local_experts).sum(1).tolist()
    recv_counts_PL = recv_counts.view(shard.size, local_experts)
    recv_splits = recv_counts_PL.sum(1).tolist()

    recv_RD = _all_to_all(send_ND, recv_splits, send_splits, shard.group)
    local_ids_R = (
        torch.arange(local_experts, device=x_ND.device).repeat(shard.size).repeat_interleave(recv_counts_PL.reshape(-1))
    )
    ones_R1 = torch.ones(local_ids_R.shape[0], 1, dtype=x_ND.dtype, device=x_ND.device)
    out_RD = expert_mlp(recv_RD, local_ids_R[:, None], ones_R1, w_in_EDH, w_out_EFD, activation, backend)
    back_SD = _all_to_all(out_RD, send_splits, recv_splits, shard.group)

    slots_MD = back_SD.new_zeros(N * K, D).index_copy(0, order_S, back_SD)
    weights_NK = torch.where(ids_NK >= 0, gates_NK, torch.zeros_like(gates_NK)).to(slots_MD.dtype)
    return torch.einsum("nkd,nk->nd", slots_MD.view(N, K, D), weights_NK)


def _all_to_all(rows_XD: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Autograd-aware uneven all_to_all: the backward sends gradients back along the swapped splits."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

    return wait_tensor(all_to_all_single_autograd(rows_XD.contiguous(), out_splits, in_splits, group))
