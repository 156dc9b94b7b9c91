"""Every registered attention and FFN block's own ``cost()`` against FlopCounterMode over a real forward.

One case per setting that changes a block's cost (sequence length, GQA, head counts, top-k in
training / eval_top_k in evaluation / elastic k, elastic expert subsets, router kind, shared experts,
sub-tokens, pool routers, MoHD scopes and fusion). Each layer's attention and FFN module is compared
on its own (FlopCounterMode attributes FLOPs to module paths), then the whole model through
``training.accounting.account``. The causal-attention convention is in ``tests/arch/cost_helpers.py``.

Where a block's CPU forward computes more than it activates *by design*, the test says how the
counter's figure relates to the activated cost, from the counter's own sub-module figures:

- ``mohd_mha`` runs a dense MHA on the gated input and masks its output (its module docstring:
  "the compute saving of the gather is not realised here"), and MoHD's group fusion multiplies
  every group and masks: the cost counts the A of G active groups of both, so the counter shows
  the cost plus (1 − A/G) × the counted projections / fusion.
- MoUE's trajectory EMA z ← λz + (1−λ)·Σ_k g_k u_k is an elementwise weighted sum, which
  FlopCounterMode does not see; the cost counts its 2·k·Z multiply-adds.
"""

from __future__ import annotations

import pytest
import torch

from arch.cost import CostSetting
from arch.layers import ElasticSetting
from arch.registry import ATTENTION, FFN
from tests.arch.cost_helpers import as_counted, build, count, kv_bytes_in_cache, record, setting, tokens
from training.accounting.account import account

MOE = {"name": "moe", "n_experts": 4, "top_k": 2}
MOHD_ATTN = {"name": "mohd_mha", "n_groups": 4, "n_active": 2, "n_shared": 1}
# id → (model overrides, training mode, elastic setting, seq_len)
CASES = {
    "mha T=8": ({}, True, None, 8),
    "mha T=5": ({}, True, None, 5),
    "mha gqa n_kv_heads=2 qk_norm": ({"attention": {"name": "mha", "n_kv_heads": 2, "qk_norm": True}}, True, None, 8),
    "mha mqa n_kv_heads=1": ({"attention": {"name": "mha", "n_kv_heads": 1}}, True, None, 8),
    "dha k_heads=1 v_heads=2": ({"attention": {"name": "dha", "k_heads": 1, "v_heads": 2}}, True, None, 8),
    "dha per-layer heads": ({"attention": {"name": "dha", "k_heads": [1, 3], "v_heads": [4, 2]}}, True, None, 8),
    "mohd_mha A=2 of G=4": ({"attention": MOHD_ATTN}, True, None, 8),
    "mohd_mha fusion none A=3": ({"attention": {**MOHD_ATTN, "n_active": 3, "fusion": "none"}}, True, None, 8),
    "swiglu": ({}, True, None, 8),
    "swiglu hidden_dim=40": ({"ffn": {"name": "swiglu", "hidden_dim": 40}}, True, None, 8),
    "moe train top_k=2": ({"ffn": MOE}, True, None, 8),
    "moe eval (no eval_top_k)": ({"ffn": MOE}, False, None, 8),
    "moe eval eval_top_k=3": ({"ffn": {**MOE, "eval_top_k": 3}}, False, None, 8),
    "moe train ignores eval_top_k": ({"ffn": {**MOE, "eval_top_k": 3}}, True, None, 8),
    "moe elastic top_k=1": ({"ffn": MOE}, True, {"top_k": 1}, 8),
    "moe elastic top_k=3 eval": ({"ffn": MOE}, False, {"top_k": 3}, 8),
    "moe elastic subset 1 of 4": ({"ffn": MOE}, True, {"expert_mask_E": torch.tensor([False, True, False, False])}, 8),
    "moe router=xmoe": ({"ffn": {**MOE, "router": "xmoe", "xmoe_dim": 8}}, True, None, 8),
    "moe router=xmoe_cosine": ({"ffn": {**MOE, "router": "xmoe_cosine", "xmoe_dim": 8}}, True, None, 8),
    "moe shared experts": ({"ffn": {**MOE, "n_shared_experts": 1}}, True, None, 8),
    "emoe coactivation (train)": ({"ffn": {"name": "emoe", "n_experts": 4, "top_k": 1, "k_ideal": 3}}, True, None, 8),
    "mhmoe h=2 train": ({"ffn": {"name": "mhmoe", "n_heads": 2, "n_experts": 4}}, True, None, 8),
    "mhmoe h=4 eval eval_top_k=3": (
        {"ffn": {"name": "mhmoe", "n_heads": 4, "n_experts": 4, "eval_top_k": 3}},
        False,
        None,
        8,
    ),
    "mhmoe elastic top_k=1": ({"ffn": {"name": "mhmoe", "n_heads": 2, "n_experts": 4}}, True, {"top_k": 1}, 8),
    "moue per-layer routers": ({"ffn": {"name": "moue", "n_universal": 4, "window_size": 2}}, True, None, 8),
    "moue shared router + local": (
        {"ffn": {"name": "moue", "n_universal": 4, "window_size": 2, "n_local": 1, "router_sharing": "shared"}},
        True,
        None,
        8,
    ),
    "moue no trajectory, elastic k=1": (
        {"ffn": {"name": "moue", "n_universal": 4, "window_size": 2, "trajectory": False}},
        True,
        {"top_k": 1},
        8,
    ),
    "mohd scope=ffn fusion=none": (
        {"ffn": {"name": "mohd", "n_groups": 4, "n_active": 2, "n_shared": 1, "fusion": "none"}},
        True,
        None,
        8,
    ),
    "mohd scope=ffn blockdiag": ({"ffn": {"name": "mohd", "n_groups": 4, "n_active": 3, "n_shared": 1}}, True, None, 8),
    "mohd scope=hidden": (
        {"ffn": {"name": "mohd", "scope": "hidden", "n_groups": 4, "n_active": 2, "n_shared": 1}},
        True,
        None,
        8,
    ),
    "mohd share_routing + mohd_mha": (
        {
            "attention": MOHD_ATTN,
            "ffn": {
                "name": "mohd",
                "scope": "hidden",
                "n_groups": 4,
                "n_active": 2,
                "n_shared": 1,
                "share_routing": True,
            },
        },
        True,
        None,
        8,
    ),
}


def _dense_by_design(module, path: str, counted: dict, s: CostSetting) -> float:
    """What the counter sees beyond the activated cost, by design (module docstring)."""
    extra = 0.0
    if hasattr(module, "fusion") and hasattr(module, "G"):  # MoHD attention / FFN: fusion over all groups
        extra += (1 - module.A / module.G) * counted.get(f"{path}.fusion", 0.0)
    if type(module).__name__ == "MoHDAttention":  # dense projections on the gated input
        extra += (1 - module.A / module.G) * sum(counted[f"{path}.attn.{w}"] for w in ("wq", "wkv", "wo"))
    if type(module).__name__ == "UniversalMoEFFN":  # the trajectory EMA is elementwise
        k = min(s.top_k or module.top_k, module.pool.window_size + module.n_local)
        extra -= 2 * k * module.trajectory_dim
    return extra


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("case", list(CASES))
def test_block_cost_matches_flop_counter(case):
    overrides, training, elastic, T = CASES[case]
    model = build(**overrides).train(training)
    elastic_setting = ElasticSetting(**elastic) if elastic else ElasticSetting()
    model.set_elastic(elastic_setting)
    s = CostSetting.from_elastic(T, elastic_setting, training=training, dtype_bytes=4)
    counted = count(model, tokens(2, T))
    for i, block in enumerate(model.depth.blocks):
        for part in ("attn", "ffn"):
            module, path = getattr(block, part), f"LanguageModel.depth.blocks.{i}.{part}"
            cost = module.cost(s)
            expected = as_counted(cost, T) + _dense_by_design(module, path, counted, s)
            record(case, f"layer {i} {part}", as_counted(cost, T), counted[path])
            assert counted[path] == pytest.approx(expected, rel=1e-9, abs=1e-6), (case, path)
    acc = account(model, T, training=training)
    whole = acc.forward_flops_per_token - acc.attention_flops_per_token * (1 - 2 * T / (T + 1))
    adjust = sum(
        _dense_by_design(getattr(b, p), f"LanguageModel.depth.blocks.{i}.{p}", counted, s)
        for i, b in enumerate(model.depth.blocks)
        for p in ("attn", "ffn")
    )
    record(case, "whole model (account)", whole, counted["Global"])
    assert counted["Global"] == pytest.approx(whole + adjust, rel=1e-9)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("case", [c for c in CASES if "train ignores" not in c])
def test_block_kv_bytes_match_the_cache_a_prefill_allocates(case):
    overrides, _, elastic, T = CASES[case]
    model = build(**overrides).eval()
    if elastic:
        model.set_elastic(ElasticSetting(**elastic))
    ours = account(model, T, training=False, dtype_bytes=4).kv_cache_bytes_per_token
    per_layer = sum(b.attn.cost(setting(T, training=False)).kv_bytes for b in model.depth.blocks)
    assert ours == per_layer == kv_bytes_in_cache(model, tokens(2, T))


def test_every_registered_attention_and_ffn_block_has_a_case():
    """A block registered later must get a FlopCounterMode case here (or its cost() goes unchecked)."""
    covered = {
        overrides.get(group, {}).get("name", default)
        for overrides, *_ in CASES.values()
        for group, default in (("attention", "mha"), ("ffn", "swiglu"))
    }
    assert set(ATTENTION.names()) | set(FFN.names()) <= covered


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("granularity", ["scalar", "channel"])
def test_dha_fusion_stage_cost_matches_flop_counter(granularity):
    """``HeadFusionAttention`` (the MHA → DHA conversion's fusion stage; not a registered block): MHA's cost
    per token, plus fusing the head weights once per forward, which the cost leaves out and says so."""
    from torch.utils.flop_counter import FlopCounterMode

    from arch.attention.dha import HeadFusionAttention

    B, T = 2, 8
    model = build().train()
    for block in model.depth.blocks:
        block.attn = HeadFusionAttention(block.attn, [0, 0, 1, 1], [0, 1, 1, 1], granularity)
    counted = count(model, tokens(B, T))
    for i, block in enumerate(model.depth.blocks):
        s = setting(T)
        with FlopCounterMode(display=False) as fusing:  # the per-forward part, counted on its own
            block.attn.fused_heads("k"), block.attn.fused_heads("v")
        ours = as_counted(block.attn.cost(s), T)
        path = f"LanguageModel.depth.blocks.{i}.attn"
        record(f"dha fusion stage ({granularity})", f"layer {i} attn", ours, counted[path])
        assert counted[path] == pytest.approx(ours + fusing.get_total_flops() / (B * T), rel=1e-9)
        assert any("fusion stage" in note for note in s.notes)
