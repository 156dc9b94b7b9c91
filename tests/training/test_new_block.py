"""Adding a block takes one class, one YAML and one registration, and touches no file in training/.

The block is ``tests/blocks/toy_moe.py`` (a routed FFN that declares expert banks and elastic
widths but not expert parallelism), its YAML ``tests/conf/model/ffn/toy_moe.yaml`` (found through
a Hydra search path), registered here at runtime. The framework then trains it, accounts it from its
own ``cost()``, and accepts or refuses elastic / expert-parallel training by its declared capabilities.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from arch.layers import ElasticSetting
from arch.registry import FFN
from tests.helpers import tiny_config
from training.accounting.account import account
from training.config import ConfigError, validate
from training.metrics import read_metrics
from training.trainer import Trainer, train

TEST_CONF = Path(__file__).resolve().parents[1] / "conf"
BLOCK = [f"hydra.searchpath=[file://{TEST_CONF}]", "model/ffn=toy_moe"]


@pytest.fixture
def toy_moe():
    FFN.register_lazy("toy_moe", "tests.blocks.toy_moe:ToyMoEFFN")  # the one registration line
    yield FFN.get("toy_moe")
    FFN.unregister("toy_moe")


def test_new_block_trains_and_is_accounted_from_its_own_cost(toy_moe, tmp_path):
    cfg = tiny_config(
        tmp_path / "run",
        *BLOCK,
        "trainer.max_steps=6",
        "trainer.eval_every=6",
        "trainer.checkpoint_every=6",
        "trainer.sample_tokens=0",
    )
    root = validate(cfg)
    assert root.model.ffn == {"name": "toy_moe", "n_experts": 4, "top_k": 2, "hidden": 16}
    trainer = Trainer(cfg)
    trainer.fit()
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(rows) == 6 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    model = trainer.model
    assert all(isinstance(b.ffn, toy_moe) for b in model.depth.blocks)
    D, F, E, V, T = 32, 16, 4, 257, root.data.seq_len
    acc = account(model, T)
    attention = 4 * D * D + 2 * D  # wq, wkv (2 heads of 16: K and V D each), wo; two norms
    assert acc.total_params == 2 * (attention + D * E + E * 2 * D * F) + V * D + D
    assert acc.active_params == acc.total_params - 2 * (E - 2) * 2 * D * F  # k = 2 of 4 experts read
    expected = 2 * (2 * 4 * D * D + 2 * 2 * D * (T + 1) / 2 + 2 * D * E + 2 * 2 * 2 * D * F) + 2 * D * V
    assert acc.forward_flops_per_token == expected
    assert all(r["flops_per_token"] == acc.train_flops_per_token for r in rows)  # the trainer logs the one counter
    sub = account(model, T, ElasticSetting(top_k=1, expert_mask_E=torch.tensor([True, True, False, False])))
    assert sub.forward_flops_per_token == expected - 2 * 2 * 2 * D * F
    assert sub.total_params == acc.total_params - 2 * 2 * 2 * D * F  # two masked experts per layer


def test_new_block_elastic_and_expert_parallel_follow_its_declared_capabilities(toy_moe, tmp_path):
    # elastic widths declared: accepted, with its own n_experts / top_k bounding the elastic options
    validate(tiny_config(tmp_path / "a", *BLOCK, "elastic=ernie"))
    with pytest.raises(ConfigError, match=r"elastic.topk_min=3 must be in \[1, model.ffn.top_k=2\]"):
        validate(tiny_config(tmp_path / "b", *BLOCK, "elastic=ernie", "elastic.topk_min=3"))
    with pytest.raises(ConfigError, match=r"subset_sizes=\[5\] must lie in \[1, n_experts=4\]"):
        validate(tiny_config(tmp_path / "c", *BLOCK, "elastic=ernie", "elastic.subset_sizes=[5]"))
    # expert parallelism not declared: refused, naming the blocks that do shard
    with pytest.raises(
        ConfigError, match=r"expert_parallel=2 needs an expert FFN .*'moe'.*got model.ffn.name='toy_moe'"
    ):
        validate(tiny_config(tmp_path / "d", *BLOCK, "trainer.expert_parallel=2"))


def test_elastic_training_runs_the_new_block_on_sampled_sub_networks(toy_moe, tmp_path):
    cfg = tiny_config(
        tmp_path / "run",
        *BLOCK,
        "elastic=ernie",
        "elastic.width_full_prob=0",
        "elastic.topk_full_prob=0",
        "trainer.max_steps=4",
        "trainer.eval_every=4",
        "trainer.checkpoint_every=4",
        "trainer.sample_tokens=0",
    )
    train(cfg)
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert {r["elastic/experts"] for r in rows} == {2} and {r["elastic/top_k"] for r in rows} == {1}
