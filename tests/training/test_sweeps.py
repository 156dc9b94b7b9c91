"""Sweep presets in conf/sweep/: they compose with their sweeper params, pass train.py's precheck, and run."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from tests.helpers import DATA_CACHE, TINY
from training.cli import CONF_DIR, check_overrides
from training.eval import report

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = sorted(p.stem for p in (CONF_DIR / "sweep").glob("*.yaml"))


def compose_with_hydra(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def has_optuna_plugin() -> bool:
    try:
        import hydra_plugins.hydra_optuna_sweeper  # noqa: F401
    except ImportError:
        return False
    return True


def test_sweep_presets_exist():
    assert {"moe_topk", "optuna_moe_lr"} <= set(SWEEPS)


def test_basic_sweep_preset_composes_to_a_grid():
    sweeper = compose_with_hydra(["+sweep=moe_topk"]).hydra.sweeper
    assert sweeper._target_.endswith("BasicSweeper")
    assert dict(sweeper.params) == {"experiment": "moe_vs_dense", "model.ffn.top_k": "1,2,4", "seed": "0,1,2"}


@pytest.mark.skipif(not has_optuna_plugin(), reason="hydra-optuna-sweeper not installed (pip install -e '.[sweep]')")
def test_optuna_sweep_preset_composes_with_the_plugin():
    cfg = compose_with_hydra(["+sweep=optuna_moe_lr"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.direction == "minimize" and sweeper.n_trials > 0 and sweeper.sampler.seed == 0
    assert sweeper.params["optim.lr"].startswith("tag(log, interval(")
    assert sweeper.params["model.ffn.top_k"] == "choice(1, 2, 4)"


@pytest.mark.parametrize("name", SWEEPS)
def test_train_precheck_accepts_sweep_presets(name):
    if name.startswith("optuna") and not has_optuna_plugin():
        pytest.skip("hydra-optuna-sweeper not installed")
    check_overrides([f"+sweep={name}", "trainer.max_steps=5"])  # would sys.exit(2) on a rejected key
    check_overrides(["-m", f"+sweep={name}"])


@pytest.mark.slow
def test_tiny_basic_multirun_then_report(tmp_path):
    """Two sweep points (top_k=1,2 from the command line replace the preset's list), then the report."""
    sweep_dir = tmp_path / "multirun"
    tiny = [o for o in TINY if not o.startswith("model=")]  # the sweep's experiment picks moe_tiny
    command = [
        sys.executable,
        "train.py",
        "-m",
        "+sweep=moe_topk",
        "model.ffn.top_k=1,2",
        "seed=0",
        *tiny,
        "trainer.max_steps=6",
        "trainer.eval_every=3",
        "trainer.checkpoint_every=6",
        "trainer.sample_tokens=0",
        f"data.cache_dir={DATA_CACHE}",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1"]

    assert report.main([str(sweep_dir)]) == 0
    with open(sweep_dir / "report.csv") as f:
        rows = {r["group"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"model.ffn.top_k=1", "model.ffn.top_k=2"}
    assert all(int(r["n"]) == 1 and float(r["steps"]) == 6 and float(r["train_flops"]) > 0 for r in rows.values())
    assert (sweep_dir / "val_loss_vs_flops.png").exists()
