"""End-to-end training on CPU: loss falls, the run folder is complete, resume is exact, guards work."""

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_config
from training.checkpoint import files as ckpt
from training.errors import NonFiniteLossError
from training.metrics import read_metrics
from training.trainer import Trainer, train

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_model_trains_and_writes_a_complete_run_folder(tmp_path):
    run = tmp_path / "run"
    summary = train(tiny_config(run, "trainer.max_steps=40", "trainer.eval_every=20", "optim.lr=1e-2"))
    rows = read_metrics(run)
    evals = [r for r in rows if "val_loss" in r]
    train_rows = [r for r in rows if "loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 40
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0  # bytes: ln(257)=5.55 → well below
    assert summary["final_val_loss"] == evals[-1]["val_loss"]
    assert all({"step", "loss", "lr", "tokens_per_s", "grad_norm", "flops_per_token"} <= set(r) for r in train_rows)
    assert len(train_rows) == 40
    assert math.isclose(evals[-1]["val_bpb"], evals[-1]["val_loss"] / math.log(2), rel_tol=1e-3)  # bytes: ~1 byte/token
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "sample.txt", "model.safetensors", "checkpoints/latest"):
        assert (run / name).exists(), name
    assert (run / "sample.txt").read_text().startswith("ROMEO:")


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """accum=2 of batch 2 gives the gradient of one batch of 4 made of the same two micro-batches."""
    trainer = Trainer(tiny_config(tmp_path / "a", "trainer.grad_accum=2", "trainer.batch_size=2", "optim.grad_clip=0"))
    x0, y0 = trainer.sampler.get_batch(0, 0)
    x1, y1 = trainer.sampler.get_batch(0, 1)
    big = trainer.model(torch.cat([x0, x1]), torch.cat([y0, y1])).loss
    expected = torch.autograd.grad(big, list(trainer.model.parameters()))
    seen = {}
    trainer.optimizer.step = lambda: seen.update(grads=[p.grad.clone() for p in trainer.model.parameters()])
    trainer.train_step()
    for got, want in zip(seen["grads"], expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from tests.helpers import tiny_config
    from training.trainer import Trainer

    def kill_after(trainer, event, step):
        if event == "step_end" and step == {kill_step}:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no final checkpoint

    Trainer(tiny_config({run!r}, *{overrides!r}), callbacks=(kill_after,)).fit()
    """
)


def _losses(run_dir):
    rows = read_metrics(run_dir)
    return [(r["step"], r["loss"]) for r in rows if "loss" in r], [
        (r["step"], r["val_loss"]) for r in rows if "val_loss" in r
    ]


def test_resume_after_sigkill_reproduces_the_uninterrupted_run_exactly(tmp_path):
    n = 10
    overrides = [
        f"trainer.max_steps={2 * n}",
        f"trainer.checkpoint_every={n}",
        "trainer.eval_every=5",
        "trainer.sample_tokens=0",
    ]
    straight = tmp_path / "straight"
    train(tiny_config(straight, *overrides))

    killed = tmp_path / "killed"
    script = KILL_SCRIPT.format(root=str(ROOT), kill_step=n + 3, run=str(killed), overrides=overrides)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr  # died by SIGKILL
    assert [p.name for p in ckpt.list_checkpoints(killed)] == [f"step_{n:08d}.pt"]
    assert max(s for s, _ in _losses(killed)[0]) == n + 3  # it got past the checkpoint before dying

    train(tiny_config(killed, *overrides))  # trainer.resume=auto
    assert _losses(killed) == _losses(straight)  # equality, not closeness
    steps = [s for s, _ in _losses(killed)[0]]
    assert steps == list(range(1, 2 * n + 1))  # rows logged after the checkpoint were replaced, not duplicated


def test_resume_skips_a_truncated_checkpoint_and_uses_the_previous(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, "trainer.max_steps=20", "trainer.checkpoint_every=10", "trainer.sample_tokens=0"))
    newest = ckpt.list_checkpoints(run)[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with pytest.warns(UserWarning, match="step_00000020.pt is unreadable"):
        trainer = Trainer(tiny_config(run, "trainer.max_steps=30", "trainer.checkpoint_every=10"))
    assert trainer.step == 10


def test_resume_refuses_a_different_model_and_resume_none_refuses_to_overwrite(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, "trainer.max_steps=10", "trainer.sample_tokens=0"))
    with pytest.raises(ckpt.CheckpointError, match=r"model.d_model: checkpoint has 32, config has 64"):
        Trainer(tiny_config(run, "model.d_model=64"))
    with pytest.raises(ckpt.CheckpointError, match="already holds checkpoints"):
        Trainer(tiny_config(run, "trainer.resume=none"))
    assert len(ckpt.list_checkpoints(run)) == 1  # nothing lost


def test_resume_from_an_explicit_checkpoint_path(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, "trainer.max_steps=10", "trainer.sample_tokens=0"))
    path = ckpt.list_checkpoints(run)[-1]
    trainer = Trainer(tiny_config(tmp_path / "other", f"trainer.resume={path}", "trainer.max_steps=12"))
    assert trainer.step == 10


def _poison_after(step_to_poison):
    def callback(trainer, event, step):
        if event == "step_end" and step == step_to_poison:
            with torch.no_grad():
                trainer.model.depth.blocks[0].ffn.w_down.weight.fill_(float("nan"))

    return callback


def test_nonfinite_skip_counts_and_continues(tmp_path):
    trainer = Trainer(
        tiny_config(tmp_path / "run", "trainer.max_steps=6", "trainer.sample_tokens=0"), callbacks=(_poison_after(3),)
    )
    trainer.fit()
    assert trainer.nonfinite_skipped == 3  # steps 4, 5, 6 all see NaN weights
    assert trainer.step == 6


def test_nonfinite_abort_names_the_step_and_last_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path / "run", "trainer.nonfinite=abort", "trainer.checkpoint_every=2", "trainer.max_steps=10")
    trainer = Trainer(cfg, callbacks=(_poison_after(4),))
    with pytest.raises(NonFiniteLossError, match=r"at step 4; last good checkpoint: .*step_00000004\.pt"):
        trainer.fit()


def test_sample_command_generates_from_a_run_folder(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, "trainer.max_steps=5", "trainer.sample_tokens=0"))
    proc = subprocess.run(
        [sys.executable, "-m", "training.eval.sample", str(run), "--prompt", "JULIET:", "--tokens", "12"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("JULIET:") and len(proc.stdout.strip()) > len("JULIET:")
    bad = subprocess.run(
        [sys.executable, "-m", "training.eval.sample", str(tmp_path / "nope")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "nope" in bad.stderr


def test_metrics_rows_are_json_with_step(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, "trainer.max_steps=4", "trainer.sample_tokens=0"))
    for line in (run / "metrics.jsonl").read_text().splitlines():
        assert "step" in json.loads(line)


def test_hydra_multirun_gives_each_job_its_own_run_folder(tmp_path):
    from tests.helpers import DATA_CACHE, TINY

    args = [a for a in TINY if not a.startswith("trainer.max_steps")]
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "-m",
            "seed=0,1",
            "trainer.max_steps=3",
            "trainer.sample_tokens=0",
            *args,
            f"data.cache_dir={DATA_CACHE}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for job in ("0", "1"):
        folder = tmp_path / "sweep" / job
        assert (folder / "metrics.jsonl").exists() and (folder / "checkpoints" / "latest").exists()
    import yaml

    seeds = [yaml.safe_load((tmp_path / "sweep" / job / "config.yaml").read_text())["seed"] for job in "01"]
    assert seeds == [0, 1]


def test_wandb_logger_runs_offline_without_a_key(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    train(tiny_config(run, "logger=wandb", "trainer.max_steps=3", "trainer.sample_tokens=0"))
    assert list((run / "wandb").glob("offline-run-*")), "wandb wrote no offline run"
    assert (run / "metrics.jsonl").exists()
