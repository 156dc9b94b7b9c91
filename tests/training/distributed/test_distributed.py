"""Multi-process training on CPU with gloo and 2 processes under torchrun (issue: scale-out).

Each test launches ``torchrun --standalone --nproc_per_node=2 train.py ...`` (or a check script) as
a subprocess and compares against single-process runs of the same global batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import DATA_CACHE, TINY

REPO = Path(__file__).resolve().parents[3]
SCRIPTS = Path(__file__).resolve().parent / "scripts"
STEPS = ["trainer.max_steps=5", "trainer.eval_every=5", "trainer.checkpoint_every=5", "trainer.sample_tokens=0"]
MOE = [
    "model=moe_tiny",
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.ffn.n_experts=4",
    "model.ffn.balance_loss_coef=0",
]  # the balance loss is per-rank by design; without it the objective is the same

pytestmark = pytest.mark.slow


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}


def launch(args: list[str], nproc: int, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """``train.py`` (or a script path as args[0]) with ``nproc`` processes (1 = plain python)."""
    target = args if args and args[0].endswith(".py") else [str(REPO / "train.py"), *args]
    if nproc == 1:
        cmd = [sys.executable, *target]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target]
    result = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def train_args(run_dir: Path, *overrides: str) -> list[str]:
    return [*TINY, f"data.cache_dir={DATA_CACHE}", f"run_dir={run_dir}", *STEPS, *overrides]


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def assert_same_losses(a: dict[int, float], b: dict[int, float], steps) -> None:
    assert all(s in a and s in b for s in steps), (sorted(a), sorted(b))
    np.testing.assert_allclose([a[s] for s in steps], [b[s] for s in steps], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def single_dense(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("single") / "run"
    launch(train_args(run_dir), 1, run_dir.parent)
    return run_dir


@pytest.mark.parametrize(
    "overrides",
    [["trainer.parallel=ddp"], ["trainer.parallel=fsdp", "trainer.checkpoint_async=true"]],
    ids=["ddp", "fsdp-async-checkpoint"],
)
def test_two_processes_match_one_on_the_same_global_batch(tmp_path, single_dense, overrides):
    run_dir = tmp_path / "run"
    launch(train_args(run_dir, *overrides), 2, tmp_path)
    assert_same_losses(losses(run_dir), losses(single_dense), range(1, 6))
    # Only rank 0 writes logs: one row per step, no duplicates; the sharded checkpoint is complete.
    assert sorted(losses(run_dir)) == [1, 2, 3, 4, 5]
    assert (run_dir / "checkpoints" / "step_00000005" / ".metadata").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000005"


def test_expert_parallel_layer_matches_the_unsharded_layer(tmp_path):
    """Outputs and gradients, incl. a step where one rank's experts receive no tokens, elastic top-k,
    an expert-subset mask and universal experts (see the script's cases)."""
    result = launch([str(SCRIPTS / "expert_parallel_check.py")], 2, tmp_path)
    for case in (
        "moe top-2",
        "one rank's experts get no tokens",
        "elastic top-1",
        "expert subset",
        "universal experts",
    ):
        assert case in result.stdout, result.stdout


@pytest.mark.parametrize(
    "strategy, nproc", [("ddp", 2), ("fsdp", 2), ("ddp", 4)], ids=["ddp-ep2", "fsdp-ep2", "dp2xep2"]
)
def test_expert_parallel_training_matches_one_process(tmp_path, strategy, nproc):
    """With the auxiliary-loss-free bias on: its load counts must be reduced over all ranks to match.
    4 processes = a (dp 2, ep 2) mesh: expert gradients are also summed over the dp replicas."""
    moe = [*MOE, "model.ffn.bias_update_rate=0.05"]
    single, parallel = tmp_path / "single", tmp_path / "ep"
    launch(train_args(single, *moe), 1, tmp_path)
    launch(train_args(parallel, *moe, "trainer.expert_parallel=2", f"trainer.parallel={strategy}"), nproc, tmp_path)
    assert_same_losses(losses(parallel), losses(single), range(1, 6))


@pytest.mark.parametrize(
    "first, second, extra",
    [
        (2, 1, ["trainer.parallel=fsdp"]),  # sharded DCP checkpoint → one process
        (1, 2, []),  # single-file checkpoint → two processes (DDP)
        (2, 1, [*MOE, "trainer.expert_parallel=2"]),  # expert-sharded DCP checkpoint → one process
        (2, 2, [*MOE, "trainer.expert_parallel=2"]),  # expert-sharded DCP checkpoint → expert-sharded again
    ],
    ids=["fsdp2-to-1", "1-to-ddp2", "ep2-to-1", "ep2-to-ep2"],
)
def test_resume_on_a_different_number_of_processes(tmp_path, first, second, extra):
    # A constant schedule: the interrupted run (max_steps=5) and the straight one (10) share the lr at every step.
    extra = [*extra, "schedule=constant"]
    extra_single = [x for x in extra if not x.startswith("trainer.")]
    straight = tmp_path / "straight"
    launch(train_args(straight, *extra_single, "trainer.max_steps=10", "trainer.eval_every=10"), 1, tmp_path)

    run_dir = tmp_path / "run"
    first_extra = extra if first == 2 else extra_single
    launch(train_args(run_dir, *first_extra), first, tmp_path)  # stops after the step-5 checkpoint
    second_extra = extra if second == 2 else extra_single
    result = launch(
        train_args(run_dir, *second_extra, "trainer.max_steps=10", "trainer.eval_every=10"), second, tmp_path
    )
    assert "resumed from" in result.stdout + result.stderr
    assert_same_losses(losses(run_dir), losses(straight), range(1, 11))


def test_consolidated_checkpoint_equals_the_exported_weights(tmp_path):
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    launch(train_args(run_dir, "trainer.parallel=fsdp"), 2, tmp_path)
    out = tmp_path / "consolidated.safetensors"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "training.checkpoint.sharded",
            "consolidate",
            str(run_dir / "checkpoints" / "step_00000005"),
            str(out),
        ],
        cwd=REPO,
        env=_env(),
        check=True,
    )
    consolidated, exported = load_file(str(out)), load_file(str(run_dir / "model.safetensors"))
    for name, tensor in exported.items():
        torch.testing.assert_close(consolidated[name], tensor, rtol=0, atol=0)


def test_every_rank_agrees_on_the_stamped_run_dir(tmp_path):
    args = [a for a in train_args(tmp_path / "unused") if not a.startswith("run_dir=")]
    launch(args, 2, tmp_path)
    stamped = list((tmp_path / "runs").iterdir())
    assert len(stamped) == 1, f"ranks created different run folders: {stamped}"
    assert (stamped[0] / "metrics.jsonl").is_file() and (stamped[0] / ".hydra" / "config.yaml").is_file()


# ----------------------------------------------------------------------------- without processes
@pytest.mark.parametrize("world", [2, 4])
def test_ranks_read_disjoint_rows_that_make_up_the_global_batch(world):
    from training.data.windows import WindowSampler

    tokens = np.arange(10_000, dtype=np.int64)
    whole_x, _ = WindowSampler(tokens, None, 16, 8, seed=3).get_batch(7, 1)
    parts = [WindowSampler(tokens, None, 16, 8, seed=3, rank=r, world=world).get_batch(7, 1)[0] for r in range(world)]
    assert all(p.shape == (8 // world, 16) for p in parts)
    torch.testing.assert_close(torch.cat(parts), whole_x)


def test_parallel_options_are_validated_before_any_work(tmp_path):
    from tests.helpers import tiny_config
    from training.config import ConfigError, validate
    from training.trainer import Trainer

    with pytest.raises(ConfigError, match="expert_parallel=2 needs an expert FFN"):
        validate(tiny_config(tmp_path / "a", "trainer.expert_parallel=2"))
    with pytest.raises(ConfigError, match="checkpoint_async=true needs"):
        validate(tiny_config(tmp_path / "b", "trainer.checkpoint_async=true", "trainer.checkpoint_format=torch"))
    with pytest.raises(ValueError, match="needs 2 or a multiple of 2 processes"):
        Trainer(tiny_config(tmp_path / "c", *MOE, "trainer.expert_parallel=2"))
    assert not (tmp_path / "c").exists()  # nothing written


def test_slurm_launcher_preset_composes_without_a_cluster():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="config",
            return_hydra_config=True,
            overrides=[
                "hydra/launcher=slurm",
                "hydra.launcher.nodes=2",
                "hydra.launcher.gpus_per_node=4",
                "hydra.launcher.partition=gpu",
            ],
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node, launcher.partition) == (2, 4, 4, "gpu")
    assert launcher.timeout_min > 0 and launcher.max_num_timeout > 0


def test_slurm_task_variables_become_torchrun_variables(monkeypatch):
    from training.distributed import env as distributed_env

    # A private copy of the environment: the translation writes RANK, WORLD_SIZE, … into it.
    torchrun_keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in torchrun_keys})
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[1-2]")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node[1-2]")
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")  # what submitit sets in the jobs it launches
    try:
        assert distributed_env.env_world() == (5, 1, 8)
    except (FileNotFoundError, RuntimeError) as e:  # submitit absent and no scontrol on this machine
        pytest.skip(f"needs submitit or scontrol: {e}")
    assert os.environ["MASTER_ADDR"] and os.environ["MASTER_PORT"]


def test_one_process_can_write_and_resume_sharded_checkpoints(tmp_path):
    """trainer.checkpoint_format=dcp (async) without a process group: same losses as .pt checkpoints."""
    straight, run_dir = tmp_path / "straight", tmp_path / "run"
    launch(train_args(straight, "schedule=constant", "trainer.max_steps=10", "trainer.eval_every=10"), 1, tmp_path)
    dcp = ["schedule=constant", "trainer.checkpoint_format=dcp", "trainer.checkpoint_async=true"]
    launch(train_args(run_dir, *dcp), 1, tmp_path)
    assert (run_dir / "checkpoints" / "step_00000005" / ".metadata").is_file()
    result = launch(train_args(run_dir, *dcp, "trainer.max_steps=10", "trainer.eval_every=10"), 1, tmp_path)
    assert "resumed from" in result.stdout + result.stderr
    assert "torch.distributed is disabled" not in result.stderr
    assert_same_losses(losses(run_dir), losses(straight), range(1, 11))


def test_ddp_ranks_split_the_validation_batches_and_agree_with_one_process(tmp_path):
    """3 batches over 2 ranks (2 + 1): the summed totals give the single-process val loss."""
    run_dir, single = tmp_path / "run", tmp_path / "single"
    launch(train_args(run_dir, "trainer.parallel=ddp", "trainer.eval_batches=3"), 2, tmp_path)
    launch(train_args(single, "trainer.eval_batches=3"), 1, tmp_path)
    np.testing.assert_allclose(val_losses(run_dir), val_losses(single), rtol=1e-6)


def val_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows if "val_loss" in r]
