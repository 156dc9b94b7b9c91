"""evaluate.py as a researcher's tool: sweep tables/CSVs with active params and FLOPs from the
accounting, depth sweeps with every iteration count, routing analysis for MoUE and MH-MoE, --help."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import tiny_config
from training.eval.elastic_sweeps import run_evaluation
from training.eval.sweep_table import SWEEP_COLUMNS
from training.trainer import train

ROOT = Path(__file__).resolve().parents[3]
D, LAYERS = 32, 2  # tests.helpers.TINY: d_model, n_layers


def _train(run: Path, *overrides: str) -> Path:
    train(
        tiny_config(
            run,
            "trainer.max_steps=4",
            "trainer.eval_every=4",
            "trainer.checkpoint_every=4",
            "trainer.sample_tokens=0",
            *overrides,
        )
    )
    return run


def _evaluate_cfg(*overrides: str):
    """conf/evaluate.yaml composed as evaluate.py composes it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="evaluate", overrides=["eval_batches=1", "batch_size=4", "device=cpu", *overrides])


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_elastic_sweep_prints_table_and_csv_with_costs_from_the_accounting(tmp_path, capsys):
    run = _train(tmp_path / "moe", "model/ffn=moe")
    out = tmp_path / "out"
    outputs = run_evaluation(_evaluate_cfg(f"ckpt={run}", f"out_dir={out}", "sweep.top_k=[1,3]"))
    printed = capsys.readouterr().out
    for text in (
        "active params",
        "fwd FLOPs/token",
        "val loss",
        "Δ vs trained",
        "experts per token k' = 2 *",
        "experts per token k' = 3",
        "routable experts = 4",
        "layers kept = 1",
    ):
        assert text in printed, text
    assert outputs["elastic plot"].stat().st_size > 10_000
    rows = _rows(out / "elastic.csv")
    assert tuple(rows[0]) == SWEEP_COLUMNS
    topk = [r for r in rows if r["dimension"] == "top_k"]
    assert [int(r["setting"]) for r in topk] == [1, 2, 3]  # the trained k=2 is added to the sweep
    assert [r["trained"] for r in topk] == ["False", "True", "False"]
    # Each extra expert per token adds one SwiGLU expert (3·D·F weights, 2·3·D·F FLOPs) in every layer.
    F = 96 // 2  # the moe expert width rule: (8/3·D rounded up to a multiple of 32) / top_k
    params = [float(r["active_params"]) for r in topk]
    flops = [float(r["forward_flops_per_token"]) for r in topk]
    assert [b - a for a, b in zip(params, params[1:])] == [LAYERS * 3 * D * F] * 2
    assert [b - a for a, b in zip(flops, flops[1:])] == [LAYERS * 2 * 3 * D * F] * 2
    trained_loss = float(topk[1]["val_loss"])
    for r in topk:
        assert float(r["delta_val_loss"]) == pytest.approx(float(r["val_loss"]) - trained_loss, abs=1e-9)
    depth = [r for r in rows if r["dimension"] == "depth"]
    assert [int(r["setting"]) for r in depth] == [2, 1]
    assert float(depth[1]["active_params"]) < float(depth[0]["active_params"])
    assert float(depth[1]["forward_flops_per_token"]) < float(depth[0]["forward_flops_per_token"])


def test_depth_sweep_has_a_row_and_point_per_iteration_count(tmp_path, capsys):
    run = _train(tmp_path / "rec", "model/depth=recurrent", "model.n_layers=4")
    out = tmp_path / "out"
    run_evaluation(_evaluate_cfg(f"ckpt={run}", f"out_dir={out}", "analysis=depth", "sweep.iterations=[1,2]"))
    assert "test-time iterations = 4 *" in capsys.readouterr().out  # r̄ = 4, the trained setting, always swept
    rows = _rows(out / "depth.csv")
    assert tuple(rows[0]) == SWEEP_COLUMNS
    assert [int(r["setting"]) for r in rows] == [1, 2, 4]
    flops = [float(r["forward_flops_per_token"]) for r in rows]
    assert flops[0] < flops[1] < flops[2]
    assert len({r["active_params"] for r in rows}) == 1  # the core's weights are reused, not added
    assert float(rows[2]["delta_val_loss"]) == 0.0
    assert (out / "depth.png").stat().st_size > 10_000


ROUTED = {
    "moue": ["model/ffn=moue", "model.ffn.n_universal=8", "model.ffn.window_size=4", "model.ffn.n_local=1"],
    "mhmoe": ["model/ffn=mhmoe"],
}


@pytest.mark.parametrize("name", sorted(ROUTED))
def test_routing_analysis_covers_moue_and_mhmoe(tmp_path, capsys, monkeypatch, name):
    run = _train(tmp_path / name, *ROUTED[name])
    out = tmp_path / "out"
    import matplotlib.pyplot as plt

    close = plt.close
    close("all")
    monkeypatch.setattr(plt, "close", lambda *a, **k: None)  # keep the figures to read their labels
    outputs = run_evaluation(_evaluate_cfg(f"ckpt={run}", f"out_dir={out}", "analysis=routing"))
    for key in ("routing load heatmap", "routing load bars", "routing co-activation"):
        assert outputs[key].stat().st_size > 10_000, key
    heatmap, bars, coactivation = (plt.figure(n) for n in plt.get_fignums())
    assert "fraction of routed slots" in [ax.get_ylabel() for ax in heatmap.axes]  # the colour bar's label
    assert [ax.get_title() for ax in coactivation.axes if ax.get_title()] == [
        f"layer {i} ({name}): co-activation" for i in range(LAYERS)
    ]
    n_reachable = 5 if name == "moue" else 8
    for ax in bars.axes[:LAYERS]:
        lines = [line for line in ax.get_lines() if line.get_label().startswith("uniform")]
        assert len(lines) == 1 and lines[0].get_ydata()[0] == pytest.approx(1 / n_reachable)
    close("all")
    assert f"layer 1 ({name})" in capsys.readouterr().out
    rows = _rows(out / "routing.csv")
    for layer in range(LAYERS):
        mine = [r for r in rows if int(r["layer"]) == layer]
        assert sum(float(r["load_fraction"]) for r in mine) == pytest.approx(1.0, abs=1e-4)
        reachable = [r for r in mine if r["reachable"] == "True"]
        assert all(float(r["load_fraction"]) == 0.0 for r in mine if r["reachable"] == "False")
        assert all(float(r["uniform_reference"]) == pytest.approx(1 / len(reachable), abs=1e-6) for r in mine)
        if name == "moue":  # 8 pool experts, windows of 4, stride 8 // 2: layer ℓ reaches 4ℓ .. 4ℓ+3 and its local
            expected = [("pool", 4 * layer + e) for e in range(4)] + [("local", 0)]
            assert [(r["kind"], int(r["expert"])) for r in reachable] == expected
        else:
            assert len(mine) == len(reachable) == 8


def test_help_lists_evaluate_options_not_trainings():
    result = subprocess.run(
        [sys.executable, "evaluate.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    for text in (
        "ckpt=???",
        "analysis=elastic",
        "sweep.top_k=null",
        "sweep.depths=null",
        "sweep.iterations=null",
        "eval_batches=20",
        "out_dir=null",
        "device=auto",
        "routable-expert counts",
    ):
        assert text in result.stdout, text
    for training_group in ("optim", "trainer", "model/ffn", "schedule"):
        assert training_group not in result.stdout, training_group
