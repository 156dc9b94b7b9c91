"""training.eval.run_folders and .report on fabricated run folders: grouping, seed statistics, FLOPs,
incomplete runs, plots."""

import csv
import json
import math
import statistics

import pytest
import yaml

from training.eval import report, run_folders

BATCH, ACCUM, SEQ = 4, 2, 16
TOKENS_PER_STEP = BATCH * ACCUM * SEQ


def fake_run(
    folder,
    *,
    top_k,
    seed,
    final_loss,
    max_steps=20,
    flops=(100.0, 300.0),
    eval_steps=(0, 10, 20),
    overrides=True,
    active_params=None,
):
    """A run folder as train.py leaves it: config.yaml, .hydra/overrides.yaml, metrics.jsonl (log every 5 steps)."""
    folder.mkdir(parents=True)
    config = {
        "seed": seed,
        "run_dir": str(folder),
        "experiment": "moe_vs_dense",
        "model": {"name": "moe_tiny", "ffn": {"name": "moe", "top_k": top_k}},
        "data": {"seq_len": SEQ},
        "trainer": {"max_steps": max_steps, "batch_size": BATCH, "grad_accum": ACCUM},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    if overrides:
        (folder / ".hydra").mkdir()
        lines = [
            "+sweep=moe_topk",
            "experiment=moe_vs_dense",
            f"model.ffn.top_k={top_k}",
            f"seed={seed}",
            "trainer.max_steps=20",
        ]
        (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(lines))
    rows = (
        [{"step": 0, "acct/active_params": active_params, "acct/total_params": 3 * active_params}]
        if active_params
        else []
    )
    for step in range(5, 21, 5):  # flops_per_token changes at step 10 (a growing depth scheme)
        rows.append(
            {
                "step": step,
                "loss": 5.0,
                "lr": 1e-3,
                "tokens_per_s": 1000.0 + seed,
                "flops_per_token": flops[0] if step <= 10 else flops[1],
            }
        )
    for step in eval_steps:
        rows.append({"step": step, "val_loss": final_loss + (20 - step) * 0.1, "val_bpb": 1.0})
    rows.sort(key=lambda r: (r["step"], "val_loss" in r))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


LOSSES = {1: [3.10, 3.25, 3.05], 2: [2.90, 2.95, 3.02]}


@pytest.fixture
def sweep(tmp_path):
    """A multirun folder: top_k ∈ {1, 2} × seed ∈ {0, 1, 2}, numbered subfolders, plus one crashed job."""
    root = tmp_path / "multirun" / "2026-01-01_00-00-00"
    job = 0
    for top_k, losses in LOSSES.items():
        for seed, loss in enumerate(losses):
            fake_run(root / str(job), top_k=top_k, seed=seed, final_loss=loss, active_params=1_000_000 + top_k)
            job += 1
    fake_run(root / str(job), top_k=2, seed=3, final_loss=9.0, eval_steps=())  # crashed: no eval rows
    return root


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_groups_by_the_varying_override_and_aggregates_seeds(sweep, tmp_path):
    out = tmp_path / "out"
    assert report.main([str(sweep), "--out", str(out)]) == 0
    rows = {r["group"]: r for r in read_csv(out / "report.csv")}
    assert set(rows) == {"model.ffn.top_k=1", "model.ffn.top_k=2"}  # seed, +sweep and constant keys do not group
    for top_k, losses in LOSSES.items():
        row = rows[f"model.ffn.top_k={top_k}"]
        assert int(row["n"]) == 3
        assert math.isclose(float(row["final_val_loss_mean"]), sum(losses) / 3, rel_tol=1e-9)
        assert math.isclose(float(row["final_val_loss_std"]), statistics.stdev(losses), rel_tol=1e-9)
        assert float(row["tokens_seen"]) == 20 * TOKENS_PER_STEP
        assert float(row["active_params"]) == 1_000_000 + top_k  # from the trainer's acct/ row at step 0
        assert float(row["total_params"]) == 3 * (1_000_000 + top_k)
    assert int(rows["model.ffn.top_k=2"]["n_incomplete"]) == 1
    markdown = (out / "report.md").read_text()
    assert f"{sum(LOSSES[1]) / 3:.4f} ± {statistics.stdev(LOSSES[1]):.4f}" in markdown
    assert "Incomplete runs" in markdown and "no eval rows" in markdown and f"{sweep / '6'}" in markdown
    for name in ("val_loss_vs_steps.png", "val_loss_vs_flops.png"):
        assert (out / name).stat().st_size > 1000


def test_training_flops_sum_each_logged_rows_rate_over_its_steps(tmp_path):
    run = run_folders.load_run(fake_run(tmp_path / "run", top_k=2, seed=0, final_loss=3.0, flops=(100.0, 300.0)))
    expected = (10 * 100.0 + 10 * 300.0) * TOKENS_PER_STEP  # steps 1–10 at 100 FLOP/token, 11–20 at 300
    assert run.summary()["train_flops"] == pytest.approx(expected)
    assert run.cumulative_flops(10) == pytest.approx(10 * 100.0 * TOKENS_PER_STEP)
    assert run.cumulative_flops(7) == pytest.approx(7 * 100.0 * TOKENS_PER_STEP)


def test_without_overrides_groups_by_diffing_configs_and_explicit_group_by(tmp_path):
    for top_k in (1, 4):
        for seed in (0, 1):
            fake_run(
                tmp_path / "runs" / f"k{top_k}_s{seed}", top_k=top_k, seed=seed, final_loss=3.0 + top_k, overrides=False
            )
    runs = run_folders.find_runs([tmp_path / "runs"])
    assert run_folders.grouping_keys(runs) == ["model.ffn.top_k"]
    assert list(run_folders.group_runs(runs)) == ["model.ffn.top_k=1", "model.ffn.top_k=4"]
    assert list(run_folders.group_runs(runs, ["experiment"])) == ["experiment=moe_vs_dense"]
    with pytest.raises(run_folders.ReportError, match="never grouped"):
        run_folders.group_runs(runs, ["seed"])


def test_a_run_stopped_before_its_last_eval_is_incomplete(tmp_path):
    run = run_folders.load_run(fake_run(tmp_path / "run", top_k=2, seed=0, final_loss=3.0, eval_steps=(0, 10)))
    assert "step 10 of 20" in run.incomplete_reason
    summary = report.summarize_group("g", [run])
    assert summary["n"] == 0 and summary["n_incomplete"] == 1 and summary["final_val_loss_mean"] is None


def test_a_path_without_runs_is_an_error_naming_it(tmp_path, capsys):
    empty = tmp_path / "nothing_here"
    (empty / "sub").mkdir(parents=True)
    assert report.main([str(empty)]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "expected a run folder" in err
    assert report.main([str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err
