"""Run under ``torchrun --nproc_per_node=2``: expert-parallel MoE layers == the unsharded layer.

For each case, every rank builds the same layer (same seed), runs the *unsharded* layer on the
whole batch as the reference, then shards the experts (training.distributed.parallel.shard_experts) and
runs its own half of the batch. Checked: each rank's outputs equal the reference rows, the input
gradients equal the reference's, router gradients (reduced like DDP would) and each rank's expert
weight gradients equal the reference's slice. Exits non-zero with a message on any mismatch.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from arch.layers import ElasticSetting, ForwardContext, ModelShared
from training.distributed.parallel import Parallel, init_process_group, sync_expert_grads

TOL = dict(rtol=1e-5, atol=1e-6)


def build(kind: str, d_model: int):
    torch.manual_seed(0)
    shared = ModelShared(d_model, 2, 2)
    if kind == "moue":
        from arch.ffn.universal import UniversalMoEFFN

        layer = UniversalMoEFFN(
            d_model,
            0,
            shared,
            n_universal=4,
            n_local=2,
            top_k=2,
            topology="full",
            balance_loss_coef=0.0,
            backend="torch",
        )
        return layer, shared
    from arch.ffn.moe import MoEFFN

    return MoEFFN(d_model, 0, shared, n_experts=4, top_k=2, balance_loss_coef=0.0, backend="torch"), shared


def forward(layer, x_BTD, elastic):
    empty = torch.empty(0)
    ctx = ForwardContext(cos_TF=empty, sin_TF=empty, positions_T=empty, elastic=elastic)
    return layer(x_BTD, ctx)


def check_case(name: str, kind: str, elastic: ElasticSetting, skew_to_rank0: bool, parallel: Parallel) -> None:
    d_model, rank, world = 16, parallel.rank, parallel.world
    layer, shared = build(kind, d_model)
    torch.manual_seed(1)
    x_BTD = torch.randn(4, 6, d_model)
    if skew_to_rank0:  # every token prefers experts 0,1 (rank 0's): rank 1's experts receive nothing
        with torch.no_grad():
            layer.expert_bias_E.copy_(torch.tensor([10.0, 10.0, -10.0, -10.0]))

    # Reference: the whole batch through the unsharded layer.
    x_ref = x_BTD.clone().requires_grad_()
    y_ref = forward(layer, x_ref, elastic)
    (y_ref.pow(2).sum() / world).backward()  # the loss each rank will contribute, summed
    ref_grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad(set_to_none=True)

    # Sharded: this rank's rows through its half of the experts.
    from training.distributed.parallel import shard_experts

    wrapper = torch.nn.ModuleDict({"layer": layer, "shared": shared})
    shard_experts(wrapper, parallel)
    rows = slice(rank * 2, (rank + 1) * 2)
    x_local = x_BTD[rows].clone().requires_grad_()
    y_local = forward(layer, x_local, elastic)
    # Rank loss L_r = Σ_local y²; the reference is the world mean (1/W) Σ_r L_r. DDP averages the
    # replicated gradients; sync_expert_grads turns the experts' into the same mean.
    y_local.pow(2).sum().backward()
    sync_expert_grads(parallel)  # Σ over dp replicas / world
    expert_ids = {id(p) for p in parallel.expert_params}

    torch.testing.assert_close(y_local, y_ref[rows], **TOL, msg=lambda m: f"[{name}] outputs differ: {m}")
    torch.testing.assert_close(
        x_local.grad, x_ref.grad[rows] * world, **TOL, msg=lambda m: f"[{name}] input grads differ: {m}"
    )
    for pname, p in layer.named_parameters():
        if p.grad is None or pname not in ref_grads:
            continue
        if id(p) in expert_ids:  # already the world-mean gradient of this rank's slice
            per_rank = p.shape[0]
            expected = ref_grads[pname][rank * per_rank : (rank + 1) * per_rank]
            torch.testing.assert_close(
                p.grad, expected, **TOL, msg=lambda m, pname=pname: f"[{name}] expert grad {pname} differs: {m}"
            )
        else:  # replicated: DDP would average the ranks' gradients
            g = p.grad.clone()
            dist.all_reduce(g)
            torch.testing.assert_close(
                g / world, ref_grads[pname], **TOL, msg=lambda m, pname=pname: f"[{name}] grad {pname} differs: {m}"
            )
    parallel.expert_params.clear()
    if rank == 0:
        print(f"ok {name}", flush=True)


def main() -> int:
    init_process_group()
    from torch.distributed.device_mesh import init_device_mesh

    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "ep"))
    parallel = Parallel(rank=rank, world=world, ep=world, mesh=mesh)
    full = ElasticSetting()
    cases = [
        ("moe top-2", "moe", full, False),
        ("moe, one rank's experts get no tokens", "moe", full, True),
        ("moe, elastic top-1", "moe", ElasticSetting(top_k=1), False),
        (
            "moe, expert subset {0, 3}",
            "moe",
            ElasticSetting(expert_mask_E=torch.tensor([True, False, False, True])),
            False,
        ),
        ("universal experts (pool + local)", "moue", full, False),
    ]
    for case in cases:
        check_case(*case, parallel=parallel)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
