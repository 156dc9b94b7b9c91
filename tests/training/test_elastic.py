"""ERNIE-style elastic sampling statistics, MoE options training end to end, and evaluate.py outputs."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import tiny_config
from training.config import ConfigError, validate
from training.config_schema import ElasticConfig
from training.elastic import sample_setting
from training.metrics import read_metrics
from training.trainer import train

ROOT = Path(__file__).resolve().parents[2]


def _within(observed: float, p: float, n: int) -> bool:
    return abs(observed - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-9


def test_elastic_sampler_matches_configured_probabilities():
    cfg = ElasticConfig(
        enabled=True, depth_full_prob=0.75, width_full_prob=0.8, topk_full_prob=0.8, subset_sizes=[4, 6]
    )
    n = 4000
    settings = [sample_setting(cfg, step, seed=0, n_layers=6, n_experts=8, top_k=4) for step in range(n)]
    reduced_depth = [s for s in settings if s.active_layers is not None]
    subsets = [s for s in settings if s.expert_mask_E is not None]
    smaller_k = [s for s in settings if s.top_k is not None]
    assert _within(len(reduced_depth) / n, 0.25, n)
    assert _within(len(subsets) / n, 0.2, n)
    assert _within(len(smaller_k) / n, 0.2, n)
    assert {len(s.active_layers) for s in reduced_depth} == {1, 2, 3, 4, 5}
    assert all(s.active_layers == tuple(range(len(s.active_layers))) for s in reduced_depth)  # depth_drop=tail
    assert {int(s.expert_mask_E.sum()) for s in subsets} == {4, 6}
    assert {s.top_k for s in smaller_k} == {1, 2, 3}
    # The same (seed, step) always gives the same sub-network: identical on every rank and on resume.
    for step in (3, 17, 250):
        again, first = sample_setting(cfg, step, seed=0, n_layers=6, n_experts=8, top_k=4), settings[step]
        assert (again.active_layers, again.top_k) == (first.active_layers, first.top_k)
        assert (again.expert_mask_E is None) == (first.expert_mask_E is None)
        assert again.expert_mask_E is None or bool((again.expert_mask_E == first.expert_mask_E).all())


def test_elastic_random_depth_drop_keeps_sorted_unique_layers():
    cfg = ElasticConfig(enabled=True, depth_full_prob=0.0, depth_drop="random", width_full_prob=1.0, topk_full_prob=1.0)
    for step in range(50):
        layers = sample_setting(cfg, step, 0, 8, None, None).active_layers
        assert list(layers) == sorted(set(layers)) and 1 <= len(layers) < 8


def test_elastic_config_is_validated():
    with pytest.raises(ConfigError, match="elastic width/top-k need an MoE FFN"):
        validate(tiny_config(Path("/tmp/x"), "elastic=ernie"))
    validate(tiny_config(Path("/tmp/x"), "elastic=ernie", "elastic.width_full_prob=1", "elastic.topk_full_prob=1"))
    with pytest.raises(ConfigError, match=r"elastic.topk_min=3 must be in \[1, model.ffn.top_k=2\]"):
        validate(tiny_config(Path("/tmp/x"), "model/ffn=moe", "elastic=ernie", "elastic.topk_min=3"))
    with pytest.raises(ConfigError, match="subset_sizes"):
        validate(tiny_config(Path("/tmp/x"), "model/ffn=moe", "elastic=ernie", "elastic.subset_sizes=[9]"))


MOE_OPTIONS = {
    "moe": ["model/ffn=moe"],
    "emoe": ["model/ffn=emoe"],
    "sigmoid_renorm_off": ["model/ffn=moe", "model.ffn.scoring=sigmoid", "model.ffn.renormalize=false"],
    "xmoe_shared_noise": [
        "model/ffn=moe",
        "model.ffn.router=xmoe",
        "model.ffn.n_shared_experts=1",
        "model.ffn.router_noise=0.1",
    ],
    "capacity_zloss_seq": [
        "model/ffn=moe",
        "model.ffn.capacity_factor=1.0",
        "model.ffn.z_loss_coef=0.001",
        "model.ffn.seq_balance_loss_coef=0.01",
    ],
    "aux_free_bias": ["model/ffn=moe", "model.ffn.balance_loss_coef=0", "model.ffn.bias_update_rate=0.001"],
    "emoe_proportional_top1": [
        "model/ffn=emoe",
        "model.ffn.coactivation_mode=proportional",
        "model.ffn.keep_top1=true",
    ],
    "ernie_single": ["model/ffn=moe", "elastic=ernie"],
    "ernie_full_plus_sub": [
        "model/ffn=moe",
        "elastic=ernie",
        "elastic.mode=full_plus_sub",
        "elastic.depth_drop=random",
    ],
}


@pytest.mark.parametrize("name", sorted(MOE_OPTIONS))
def test_every_moe_option_trains_with_falling_loss(tmp_path, name):
    run = tmp_path / name
    train(
        tiny_config(
            run,
            "trainer.max_steps=30",
            "trainer.eval_every=30",
            "optim.lr=1e-2",
            "trainer.sample_tokens=0",
            *MOE_OPTIONS[name],
        )
    )
    rows = read_metrics(run)
    evals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert evals[-1] < evals[0] - 1.0, evals
    train_rows = [r for r in rows if "loss" in r]
    assert "moe/layer0/load" in train_rows[-1] and len(train_rows[-1]["moe/layer0/load"]) == 8
    if "elastic" in " ".join(MOE_OPTIONS[name]):
        assert {"elastic/depth", "elastic/top_k", "elastic/experts"} <= set(train_rows[-1])


def test_evaluate_py_writes_elastic_curve_and_routing_heatmaps(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, "model/ffn=emoe", "trainer.max_steps=10", "trainer.sample_tokens=0"))
    proc = subprocess.run(
        [
            sys.executable,
            "evaluate.py",
            f"ckpt={run}",
            "analysis=all",
            "eval_batches=2",
            "sweep.top_k=[1,2,3,4]",
            "sweep.depths=[2,1]",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = run / "eval"
    for name in ("elastic.csv", "elastic.png", "routing.csv", "routing_load.png", "routing_coactivation.png"):
        assert (out / name).exists(), name
    lines = (out / "elastic.csv").read_text().splitlines()
    assert lines[0] == "dimension,setting,trained,active_params,forward_flops_per_token,val_loss,delta_val_loss,val_bpb"
    assert [line.split(",")[:3] for line in lines[1:5]] == [["top_k", str(k), str(k == 2)] for k in (1, 2, 3, 4)]
    assert {line.split(",")[0] for line in lines[1:]} == {"top_k", "experts", "depth"}
    dense = tmp_path / "dense"
    train(tiny_config(dense, "trainer.max_steps=2", "trainer.sample_tokens=0"))
    bad = subprocess.run(
        [sys.executable, "evaluate.py", f"ckpt={dense}", "analysis=routing"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "needs an MoE model" in bad.stderr


ALWAYS_TOP1 = [  # top-2 MoE whose elastic draw is always "k = 1" (k ~ U{1..k-1}, never the full k)
    "model/ffn=moe",
    "model.ffn.top_k=2",
    "model.ffn.expert_hidden=64",  # fixed: left null it is sized from top_k (equal FLOPs for any k)
    "elastic=ernie",
    "elastic.depth_full_prob=1.0",
    "elastic.width_full_prob=1.0",
    "elastic.topk_full_prob=0.0",
    "trainer.max_steps=6",
    "trainer.log_every=3",
    "trainer.eval_every=6",
    "trainer.sample_tokens=0",
]


@pytest.mark.parametrize("mode", ["single", "full_plus_sub"])
def test_logged_flops_count_what_elastic_training_trained(tmp_path, mode):
    """flops_per_token under elastic training is the cost of the trained sub-networks (+ the full model with
    full_plus_sub), not the full model's: checked against models configured with k = 2 and k = 1."""
    from training.accounting.account import account_config

    cfg = tiny_config(tmp_path / mode, *ALWAYS_TOP1, f"elastic.mode={mode}")
    train(cfg)
    vocab = yaml.safe_load((tmp_path / mode / "config.yaml").read_text())["model"]["vocab_size"]  # as trained

    def train_flops(top_k: int) -> float:
        model = tiny_config(tmp_path / "x", *ALWAYS_TOP1, f"model.ffn.top_k={top_k}").model
        return account_config(model, 32, vocab).train_flops_per_token

    full, top1 = train_flops(2), train_flops(1)
    assert top1 < full
    expected = top1 if mode == "single" else full + top1
    logged = [r["flops_per_token"] for r in read_metrics(tmp_path / mode) if "loss" in r]
    assert len(logged) == 2 and logged == pytest.approx([expected, expected])


def test_logged_elastic_flops_are_the_mean_over_the_rows_steps(tmp_path):
    """Mixed draws: each row's flops_per_token is the mean cost of the steps since the previous row."""
    from training.accounting.account import account

    cfg = tiny_config(tmp_path / "mixed", *ALWAYS_TOP1, "elastic.topk_full_prob=0.5", "trainer.max_steps=8")
    train(cfg)
    root = validate(cfg)
    root.model.vocab_size = yaml.safe_load((tmp_path / "mixed" / "config.yaml").read_text())["model"]["vocab_size"]
    from training.build import build_model

    model = build_model(root, 0)
    per_step = [
        account(model, 32, sample_setting(root.elastic, step, root.seed, 2, 8, 2), training=True).train_flops_per_token
        for step in range(8)
    ]
    assert len(set(per_step)) == 2  # both k = 1 and k = 2 were drawn
    logged = [r["flops_per_token"] for r in read_metrics(tmp_path / "mixed") if "loss" in r]
    means = [sum(per_step[0:3]) / 3, sum(per_step[3:6]) / 3, sum(per_step[6:8]) / 2]  # rows at steps 3, 6, 8
    assert logged == pytest.approx(means)
