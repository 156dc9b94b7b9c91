"""MHA → DHA conversion (search, fusion, collapse), the GQA baseline, and the dha_vs_gqa recipe."""

import itertools
import json

import pytest
import torch

from arch.attention.dha import check_head_map, kv_bytes_per_token
from arch.model import LanguageModel
from arch.registry import ConfigError
from recipes.dha import convert
from recipes.dha.fusion import FusionConfig, collapse, disagreement, fuse, fusion_layers, mean_pool_gqa, wrap_for_fusion
from recipes.dha.search import allocate, budget_heads, search
from tests.helpers import DATA_CACHE, TINY
from training.config_schema import ModelConfig
from training.metrics import read_metrics


def mha(n_layers=3, n_heads=4, **attention) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(
        ModelConfig(
            vocab_size=97,
            d_model=32,
            n_layers=n_layers,
            n_heads=n_heads,
            max_seq_len=64,
            attention={"name": "mha", "backend": "sdpa", **attention},
        )
    ).eval()


IDX = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("granularity", ["scalar", "channel"])
def test_fusion_initialisation_reproduces_mha_exactly(granularity):
    model = mha(bias=True, qk_norm=True)
    fused = wrap_for_fusion(model, search(model, 0.25), granularity)
    assert torch.equal(fused(IDX).logits, model(IDX).logits)
    assert torch.equal(fused(IDX, IDX).loss, model(IDX, IDX).loss)
    assert disagreement(fused) > 0.1  # random heads: the groups do not agree yet


@pytest.mark.parametrize("granularity, attention", [("scalar", {}), ("channel", {"bias": True, "qk_norm": True})])
def test_collapse_after_zero_disagreement_reproduces_the_fused_model(granularity, attention):
    model = mha(**attention)
    fused = wrap_for_fusion(model, search(model, 0.375), granularity)
    with torch.no_grad():  # a fusion that reached agreement: ω rows equal within each group
        for layer in fusion_layers(fused):
            for kind in ("k", "v"):
                omega = getattr(layer, f"omega_{kind}_HHc")
                same = getattr(layer, f"{kind}_same_HH")
                mix = torch.rand(omega.shape[1], omega.shape[2])  # one arbitrary row per group
                omega.copy_(same[:, :, None] * mix[None] / same.sum(1)[:, None, None] * 2)
    assert disagreement(fused) < 1e-12
    dha = collapse(fused).eval()
    torch.testing.assert_close(dha(IDX, IDX).logits, fused(IDX, IDX).logits, rtol=1e-5, atol=1e-5)
    assert dha.cfg.attention["name"] == "dha"


@pytest.mark.parametrize("budget", [0.125, 0.25, 0.3, 0.5, 1.0])
def test_budget_is_respected_and_every_map_is_valid(budget):
    model = mha(n_layers=3, n_heads=8)
    result = search(model, budget)
    total = budget_heads(budget, 3, 8)
    assert total == int(budget * 2 * 3 * 8)
    assert sum(result.counts["k"]) + sum(result.counts["v"]) <= total
    for kind in ("k", "v"):
        for g, labels in zip(result.counts[kind], result.groups[kind]):
            assert 1 <= g <= 8
            check_head_map(labels, 8, g, kind)  # H ints in [0, g), every shared head used
    dha = collapse(wrap_for_fusion(model, result))
    for block in dha.depth.blocks:
        check_head_map(block.attn.k_head_H.tolist(), 8, block.attn.n_k_heads, "k")
        check_head_map(block.attn.v_head_H.tolist(), 8, block.attn.n_v_heads, "v")
    assert kv_bytes_per_token(dha)["total"] <= budget * kv_bytes_per_token(model)["total"]
    with pytest.raises(ConfigError, match=r"budget=0.1 .* the smallest budget is 0.125"):
        budget_heads(0.1, 3, 8)


def test_redundant_layers_and_kinds_get_fewer_heads():
    """Layer 0's key heads are copies of one head and layer 2's value heads form two pairs: they get 1 and 2."""
    model = mha(n_layers=3, n_heads=4)
    with torch.no_grad():
        w = model.depth.blocks[0].attn.wkv.weight.view(2, 4, 8, 32)
        w[0] = w[0, :1] * torch.tensor([1.0, 2.0, 0.5, 3.0])[:, None, None]  # same direction, any scale
        w = model.depth.blocks[2].attn.wkv.weight.view(2, 4, 8, 32)
        w[1, 2], w[1, 3] = w[1, 0], w[1, 1]
    result = search(model, 0.5)  # 12 of 24 heads
    assert result.counts["k"][0] == 1 and result.counts["v"][2] == 2
    assert result.groups["v"][2] == [0, 1, 0, 1]  # not contiguous: the search found the real pairs
    assert result.layers["k"][0].costs[0] < 1e-9 and result.layers["v"][2].costs[1] < 1e-9  # lossless merges
    assert min(result.layers["k"][1].costs[:3]) > 0.1  # random heads: every merge costs
    on_activations = search(model, 0.5, "activations", calib_batches=[IDX])  # scaled copies: same outputs up to scale
    assert on_activations.counts["k"][0] == 1 and on_activations.groups["v"][2] == [0, 1, 0, 1]


def test_allocation_is_the_exact_minimum():
    gen = torch.Generator().manual_seed(0)
    costs = [sorted(torch.rand(4, generator=gen).tolist(), reverse=True) for _ in range(4)]
    for total in (4, 7, 10, 16):
        best = min(
            (c for c in itertools.product(range(1, 5), repeat=4) if sum(c) <= total),
            key=lambda c: sum(costs[i][g - 1] for i, g in enumerate(c)),
        )
        got = allocate(costs, total, "dp")
        assert sum(got) <= total
        assert sum(costs[i][g - 1] for i, g in enumerate(got)) == pytest.approx(
            sum(costs[i][g - 1] for i, g in enumerate(best))
        )
    assert allocate(costs, 8, "uniform") == [2, 2, 2, 2]


def test_gqa_mean_pools_contiguous_groups():
    model = mha(n_layers=2, n_heads=4)
    gqa = mean_pool_gqa(model, 2).eval()
    assert gqa.cfg.attention["n_kv_heads"] == 2
    w = model.depth.blocks[1].attn.wkv.weight.view(2, 4, 8, 32)
    expected = torch.stack([w[:, 0:2].mean(1), w[:, 2:4].mean(1)], dim=1).flatten(0, 2)
    assert torch.equal(gqa.depth.blocks[1].attn.wkv.weight, expected)
    # Equivalently: collapsing a "fusion" with contiguous groups (ω = I) is mean pooling.
    result = search(model, 0.5)
    result.groups = {kind: [[0, 0, 1, 1]] * 2 for kind in ("k", "v")}
    dha = collapse(wrap_for_fusion(model, result)).eval()
    torch.testing.assert_close(dha(IDX).logits, gqa(IDX).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="n_kv_heads dividing n_heads=4"):
        mean_pool_gqa(model, 3)


def test_augmented_lagrangian_fusion_reaches_agreement(tmp_path):
    from training.cli import compose
    from training.config import validate
    from training.data.shards import prepare_data

    root = validate(compose([*TINY, f"data.cache_dir={DATA_CACHE}", f"run_dir={tmp_path}"]))
    data = prepare_data(root.data, progress=False)
    model = mha(n_layers=2, n_heads=4)
    model = LanguageModel(ModelConfig(**{**model.cfg.__dict__, "vocab_size": data.tokenizer.vocab_size}))
    fused = wrap_for_fusion(model, search(model, 0.5))
    history = fuse(fused, data, 32, FusionConfig(steps=150, tol=0.01, batch_size=4, al_every=5))
    assert history[0]["disagreement"] > 0.3 and history[-1]["disagreement"] <= 0.01
    assert history[-1]["step"] < 150  # stopped on the tolerance, not the step limit
    assert history[-1]["lambda"] > history[0]["lambda"]  # the rule raised the fusion weight
    with torch.no_grad():
        x = torch.randint(0, data.tokenizer.vocab_size, (2, 16))
        torch.testing.assert_close(collapse(fused).eval()(x).logits, fused.eval()(x).logits, rtol=0.05, atol=0.05)


def test_recipe_trains_converts_both_ways_continues_and_plots(tmp_path):
    """The dha_vs_gqa recipe end to end at test size (budget 0.5 of 2 layers × 4 heads)."""
    overrides = [
        *TINY,
        f"data.cache_dir={DATA_CACHE}",
        "model.n_heads=4",
        "trainer.max_steps=20",
        "trainer.sample_tokens=0",
    ]
    summary = convert.dha_vs_gqa(
        convert.RecipeOptions(run_dir=str(tmp_path), budget=0.5, fusion_steps=30, cpt_steps=10), overrides
    )
    fusion = summary["dha"]["fusion_steps"]
    assert 0 < fusion <= 30
    for name in ("dha", "gqa"):
        rows = [r for r in read_metrics(tmp_path / name) if "val_loss" in r]
        # matched budget: GQA continues the steps DHA spent on fusion
        assert rows[0]["step"] == 0 and rows[-1]["step"] == (10 if name == "dha" else 10 + fusion)
        assert rows[0]["val_loss"] == pytest.approx(summary[name]["val_loss_converted"], rel=1e-5)
        assert summary[name]["val_loss_after_cpt"] == rows[-1]["val_loss"]
    bytes_ = summary["kv_bytes_per_token_bf16"]
    assert bytes_["dha"] <= bytes_["mha"] / 2 and bytes_["gqa"] == bytes_["mha"] / 2
    assert (tmp_path / "dha_vs_gqa.png").stat().st_size > 0
    budget = json.loads((tmp_path / "summary.json").read_text())["training_budget"]
    assert (
        budget["dha"]["steps"] == budget["gqa"]["steps"] == 10 + fusion
        and budget["dha"]["tokens"] == budget["gqa"]["tokens"]
    )
    assert (
        budget["dha"]["fusion_steps"] == fusion and budget["gqa"]["fusion_steps"] == 0 and budget["mha"]["steps"] == 20
    )
    mha_rate = budget["mha"]["train_flops"] / 20  # fusion steps run at the MHA model's logged rate
    assert budget["dha"]["fusion_flops"] == pytest.approx(fusion * mha_rate, rel=1e-6)
    assert 0 < budget["gqa"]["train_flops"] < budget["dha"]["train_flops"]  # equal steps; fusion steps cost MHA width
    report = json.loads((tmp_path / "dha" / "conversion.json").read_text())
    assert sum(report["k_heads"]) + sum(report["v_heads"]) <= report["budget_heads"] == 8
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        convert.main(["mha_to_gqa", f"ckpt={tmp_path / 'mha'}", f"out={tmp_path / 'gqa'}"])
    with pytest.raises(ConfigError, match=r"unknown option 'budjet'.*Did you mean 'budget'"):
        convert.main(["mha_to_dha", "budjet=0.5"])
