"""Multi-process training on PyTorch's own stack: torchrun / SLURM env → process group → DeviceMesh.

``python train.py`` is one process; ``torchrun --nproc_per_node=N train.py`` (or a SLURM job started
by Hydra's submitit launcher) is N. Every rank composes the same config; this module makes them agree
on what must be shared (the launch stamp in ``run_dir``), builds the mesh, wraps the model for
``trainer.parallel=ddp|fsdp`` and shards experts over the expert-parallel dimension.

Mesh: world = dp × ep, dims named ("dp", "ep"). Non-expert parameters are replicated (DDP) or
sharded (FSDP2) over the whole world; expert weights are split over "ep" (each rank owns E/ep
experts, tokens travel with ``all_to_all``, see ``arch/ffn/expert_parallel.py``) and replicated
over "dp", where their gradients are summed by :func:`sync_expert_grads`.
"""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from training.distributed.env import LAUNCH_STAMP_ENV, STAMP_FORMAT, env_world, is_launched_distributed


def init_process_group() -> None:
    """Join the job's process group once (NCCL for CUDA tensors, gloo for CPU ones)."""
    if dist.is_initialized() or not is_launched_distributed():
        return
    rank, local_rank, world = env_world()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend = "cpu:gloo,cuda:nccl"  # gloo for the CPU object broadcasts, NCCL for tensors
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30))


def share_launch_stamp() -> str:
    """The launch time, taken from rank 0 and shared, so every rank resolves the same ``run_dir``.

    Called by ``train.py`` before Hydra composes the config; the ``${launch_stamp:}`` resolver
    (training/cli.py) reads it back. A single process just stamps its own clock.
    """
    if LAUNCH_STAMP_ENV in os.environ:
        return os.environ[LAUNCH_STAMP_ENV]
    stamp = [time.strftime(STAMP_FORMAT)]
    if is_launched_distributed():
        init_process_group()
        dist.broadcast_object_list(stamp, src=0)
    os.environ[LAUNCH_STAMP_ENV] = stamp[0]
    return stamp[0]


@dataclass
class Parallel:
    """Where this process sits: rank, world, the mesh and its groups. ``Parallel()`` = one process."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1
    ep: int = 1
    mesh: Any = None  # DeviceMesh ("dp", "ep") when distributed
    expert_params: list[nn.Parameter] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ep_group(self):
        return self.mesh["ep"].get_group() if self.enabled else None

    @property
    def expert_dp_group(self):
        return self.mesh["dp"].get_group() if self.enabled else None

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_mean(self, values: dict[str, Any]) -> dict[str, Any]:
        """Average scalar metrics over ranks in one collective; non-tensors pass through."""
        if not self.enabled:
            return values
        keys = [k for k, v in values.items() if isinstance(v, torch.Tensor) and v.numel() == 1]
        if not keys:
            return values
        device = values[keys[0]].device  # metrics may mix devices (e.g. a CPU-side counter)
        stacked = torch.stack([values[k].detach().float().reshape(()).to(device) for k in keys])
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked /= self.world
        return {**values, **dict(zip(keys, stacked.unbind()))}


def setup_parallel(trainer_cfg, device: torch.device) -> Parallel:
    """Join the process group (if launched with several processes) and build the (dp, ep) mesh."""
    rank, local_rank, world = env_world()
    ep = int(trainer_cfg.expert_parallel)
    if world == 1:
        if ep > 1:
            raise ValueError(
                f"trainer.expert_parallel={ep} needs {ep} or a multiple of {ep} processes "
                f"(torchrun --nproc_per_node={ep} train.py ...); this is a single process"
            )
        return Parallel()
    if world % ep:
        raise ValueError(f"trainer.expert_parallel={ep} must divide the number of processes ({world})")
    init_process_group()
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world // ep, ep), mesh_dim_names=("dp", "ep"))
    return Parallel(rank=rank, local_rank=local_rank, world=world, ep=ep, mesh=mesh)


def device_for(parallel: Parallel, device: torch.device) -> torch.device:
    """One GPU per process: cuda:LOCAL_RANK under torchrun."""
    if parallel.enabled and device.type == "cuda":
        return torch.device("cuda", parallel.local_rank)
    return device


# ----------------------------------------------------------------------------- model wrapping
def shard_experts(model: nn.Module, parallel: Parallel) -> None:
    """Keep this rank's slice of every expert bank (modules that define ``expert_parallel_params``)."""
    if parallel.ep == 1:
        return
    from arch.ffn.expert_parallel import ExpertShard

    ep_rank = parallel.mesh["ep"].get_local_rank()
    for module in model.modules():
        names = getattr(module, "expert_parallel_params", None)
        if not names:
            continue
        for name in names():
            full = getattr(module, name)
            if full is None:
                continue
            n_experts = full.shape[0]
            if n_experts % parallel.ep:
                raise ValueError(
                    f"{type(module).__name__}.{name} has {n_experts} experts, not divisible by "
                    f"trainer.expert_parallel={parallel.ep}"
                )
            per_rank = n_experts // parallel.ep
            local = nn.Parameter(full.detach()[ep_rank * per_rank : (ep_rank + 1) * per_rank].clone())
            setattr(module, name, local)
            parallel.expert_params.append(local)
        module.expert_shard = ExpertShard(parallel.ep_group, parallel.ep, ep_rank)


def wrap_model(
    model: nn.Module, strategy: str, parallel: Parallel, device: torch.device, find_unused: bool = False
) -> nn.Module:
    """DDP or FSDP2 (``strategy``) around ``model``, which stays the module the optimizer and checkpoints see.

    ``find_unused``: some parameters may get no gradient in a step (elastic sub-networks, looped depth).
    """
    if not parallel.enabled:
        return model
    ignored = set(parallel.expert_params)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        names = [n for n, p in model.named_parameters() if p in ignored]
        DDP._set_params_and_buffers_to_ignore_for_model(model, names)
        # Buffers are identical on every rank by construction (same seed, all-reduced statistics);
        # broadcasting them from rank 0 would overwrite rank-local accumulators such as load counts.
        return DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,
            find_unused_parameters=find_unused,
        )
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if device.type == "cuda"
        else MixedPrecisionPolicy()
    )
    from arch.model import Block

    for block in [m for m in model.modules() if isinstance(m, Block)]:
        fully_shard(block, mp_policy=mp, ignored_params=ignored & set(block.parameters()) or None)
    fully_shard(model, mp_policy=mp, ignored_params=ignored or None)
    return model


def sync_expert_grads(parallel: Parallel) -> None:
    """Expert gradients → the gradient of the world-mean loss.

    The owner of an expert already holds Σ over its ep peers' token contributions (they arrived
    through the backward all_to_all); summing over the dp replicas and dividing by the world size
    gives what DDP's averaging gives the replicated parameters.
    """
    if not parallel.expert_params:
        return
    grads = [p.grad for p in parallel.expert_params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    if parallel.world // parallel.ep > 1:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=parallel.expert_dp_group)
    flat /= parallel.world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def clip_grad_norm(model: nn.Module, max_norm: float, parallel: Parallel) -> torch.Tensor:
    """Global gradient norm (clipped to ``max_norm``) over replicated, FSDP-sharded and expert-sharded grads."""
    from torch.distributed.tensor import DTensor

    if not parallel.enabled:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    expert_ids = {id(p) for p in parallel.expert_params}
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    replicated_sq, sharded_sq = None, None
    for p in model.parameters():
        if p.grad is None:
            continue
        g = p.grad
        if isinstance(g, DTensor):  # FSDP2 shard: sum of squares of the local piece, summed over ranks
            sq = g.to_local().float().pow(2).sum()
            sharded_sq = sq if sharded_sq is None else sharded_sq + sq
        elif id(p) in expert_ids:  # an ep shard, replicated over dp: count once per ep group
            sq = g.float().pow(2).sum() / (parallel.world // parallel.ep)
            sharded_sq = sq if sharded_sq is None else sharded_sq + sq
        else:  # DDP-replicated: identical on every rank
            sq = g.float().pow(2).sum()
            replicated_sq = sq if replicated_sq is None else replicated_sq + sq
    device = grads[0].to_local().device if isinstance(grads[0], DTensor) else grads[0].device
    total_sq = torch.zeros((), device=device) if sharded_sq is None else sharded_sq.to(device)
    dist.all_reduce(total_sq, op=dist.ReduceOp.SUM)
    if replicated_sq is not None:
        total_sq = total_sq + replicated_sq.to(device)
    norm = total_sq.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    if torch.isfinite(norm) and scale < 1:
        for g in grads:
            (g.to_local() if isinstance(g, DTensor) else g).mul_(scale)
    return norm


def full_model_state(model: nn.Module, parallel: Parallel) -> dict[str, Any]:
    """The unsharded model state on rank 0 (FSDP shards and ep slices gathered); a collective call."""
    if not parallel.enabled:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    expert_ids = {id(p) for p in parallel.expert_params}
    for name, param in model.named_parameters():
        if id(param) not in expert_ids:
            continue
        pieces = [torch.empty_like(param) for _ in range(parallel.ep)]
        dist.all_gather(pieces, param.detach().contiguous(), group=parallel.ep_group)
        if parallel.is_main:
            state[name] = torch.cat(pieces).cpu()
    return state
