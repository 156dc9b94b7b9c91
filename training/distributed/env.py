"""Where this process sits in a multi-process launch, read from the environment (no torch import).

torchrun sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT. A SLURM job started by
Hydra's submitit launcher (one task per GPU) has SLURM_* variables instead; they are translated.
"""

from __future__ import annotations

import os

LAUNCH_STAMP_ENV = "SPARSE_ARCH_LAUNCH_STAMP"
STAMP_FORMAT = "%Y-%m-%d_%H-%M-%S"


def env_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's variables, else SLURM's (submitit), else (0, 0, 1)."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])
    if "SLURM_NTASKS" in os.environ and "SLURM_PROCID" in os.environ and int(os.environ["SLURM_NTASKS"]) > 1:
        _export_slurm_env()
        return env_world()
    return 0, 0, 1


def _export_slurm_env() -> None:
    """Turn a SLURM task's variables into torchrun's (what submitit's TorchDistributedEnvironment does)."""
    try:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export()
    except ImportError:  # plain srun without submitit: derive the rendezvous ourselves
        import subprocess

        nodes = subprocess.run(
            ["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        os.environ.update(
            MASTER_ADDR=nodes[0],
            MASTER_PORT=os.environ.get("MASTER_PORT", "29500"),
            RANK=os.environ["SLURM_PROCID"],
            LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"),
            WORLD_SIZE=os.environ["SLURM_NTASKS"],
        )


def is_launched_distributed() -> bool:
    return env_world()[2] > 1
