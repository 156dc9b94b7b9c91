"""Every registered depth scheme's own ``cost()`` against FlopCounterMode over a real forward.

Cases cover each setting that changes a depth scheme's cost: elastic depth; loop repeats, looped
layers, stack pattern and a ``CostSetting.repeats`` override; Huginn recurrence in training (fixed
sampler: the lognormal-Poisson draw is random, its expectation is tested in
tests/training/accounting) and at another evaluation iteration count, with and without the adapter;
ITT selection ratios, routing on/off, top-ρ and threshold selection, ``kv=recompute`` and a ratios
override; SGT head loops (kept heads, GQA key/value groups, an open decay window) and block loops.
The causal-attention convention is in ``tests/arch/cost_helpers.py``. Training FLOPs (3 × forward,
no-grad recurrence 1 ×) are checked against FlopCounterMode over forward + backward.
"""

from __future__ import annotations

import pytest
import torch

from arch.cost import Cost, CostSetting, block_cost
from arch.layers import ElasticSetting
from arch.registry import DEPTH
from tests.arch.cost_helpers import as_counted, build, count, kv_bytes_in_cache, record, tokens
from training.accounting.account import account

RECURRENT = {
    "name": "recurrent",
    "prelude_layers": 1,
    "core_layers": 1,
    "coda_layers": 1,
    "sampler": "fixed",
    "mean_recurrence": 3,
    "mean_backprop_depth": 2,
}
ITT = {"name": "itt", "layers": [1], "steps": 4}
SGT = {"name": "sgt", "exclude_layers": [0], "top_k_layers": 1}


def _sgt_loops(heads, loops=1, window=False):
    def prepare(model):
        depth = model.depth
        depth.loop_depth[1] = loops
        depth.kept_LH[1, heads] = True
        depth.frozen = True  # no entropy statistics (not part of the cost) in training forwards
        # an open decay window: every head still runs, the others fading out; once it has closed
        # (as after_optimizer_step leaves it) the others' decay is 0 and only the kept heads run
        depth.head_decay_LH[1] = torch.where(depth.kept_LH[1], 1.0, 0.5 if window else 0.0)
        if window:
            depth.decay_windows[1] = (0, 10)

    return prepare


# id → (model overrides, training, elastic, (B, T), prepare(model) before the cost, setting overrides,
#       change(model) after the cost and before the forward: the state the override priced)
CASES = {
    "plain": ({}, True, None, (2, 8), None, {}, None),
    "plain elastic layers (1,)": ({}, True, {"active_layers": (1,)}, (2, 8), None, {}, None),
    "loop repeats=2": ({"depth": {"name": "loop"}}, True, None, (2, 8), None, {}, None),
    "loop looped_layers=[1] repeats=3": (
        {"depth": {"name": "loop", "looped_layers": [1], "repeats": 3}},
        True,
        None,
        (2, 8),
        None,
        {},
        None,
    ),
    "loop stack repeats=2 elastic (0,)": (
        {"depth": {"name": "loop", "pattern": "stack"}},
        True,
        {"active_layers": (0,)},
        (2, 8),
        None,
        {},
        None,
    ),
    "loop setting.repeats=3": (
        {"depth": {"name": "loop"}},
        False,
        None,
        (2, 8),
        None,
        {"repeats": 3},
        lambda m: m.depth.set_repeats(3),
    ),
    "recurrent fixed r=3 train": ({"n_layers": 3, "depth": RECURRENT}, True, None, (2, 8), None, {}, None),
    "recurrent eval r=3": ({"n_layers": 3, "depth": RECURRENT}, False, None, (2, 8), None, {}, None),
    "recurrent setting.iterations=5": (
        {"n_layers": 3, "depth": RECURRENT},
        False,
        None,
        (2, 8),
        None,
        {"iterations": 5},
        lambda m: m.depth.set_iterations(5),
    ),
    "recurrent injection=add train": (
        {"n_layers": 3, "depth": {**RECURRENT, "injection": "add"}},
        True,
        None,
        (2, 8),
        None,
        {},
        None,
    ),
    "itt top-ratio [0.5, 0.25, 0]": (
        {"depth": {**ITT, "ratios": [0.5, 0.25, 0.0]}},
        True,
        None,
        (2, 8),
        None,
        {},
        None,
    ),
    "itt top-ratio eval [0.75]*3": ({"depth": {**ITT, "ratios": [0.75] * 3}}, False, None, (2, 8), None, {}, None),
    "itt no routing [1, 0, 1]": (
        {"depth": {**ITT, "routing": False, "ratios": [1.0, 0.0, 1.0]}},
        True,
        None,
        (2, 8),
        None,
        {},
        None,
    ),
    "itt kv=recompute [0.5]*3": (
        {"depth": {**ITT, "kv": "recompute", "ratios": [0.5] * 3}},
        True,
        None,
        (2, 8),
        None,
        {},
        None,
    ),
    "itt threshold (measured), B=1": (
        {"depth": {**ITT, "selection": "threshold", "thresholds": [0.5, 0.5, 0.5], "ratios": [0.5] * 3}},
        True,
        None,
        (1, 8),
        None,
        {},
        None,
    ),
    "itt setting.ratios=[0.25]*3": (
        {"depth": {**ITT, "ratios": [0.5] * 3}},
        True,
        None,
        (2, 8),
        None,
        {"ratios": (0.25, 0.25, 0.25)},
        lambda m: m.depth.set_ratios([0.25] * 3),
    ),
    "sgt heads kept [0, 2] eval": ({"depth": SGT}, False, None, (2, 8), _sgt_loops([0, 2]), {}, None),
    "sgt gqa Hk=2 kept [0, 1] eval": (
        {"attention": {"name": "mha", "n_kv_heads": 2}, "depth": SGT},
        False,
        None,
        (2, 8),
        _sgt_loops([0, 1]),
        {},
        None,
    ),
    "sgt gqa Hk=2 kept [1, 2] x2 eval": (
        {"attention": {"name": "mha", "n_kv_heads": 2}, "depth": {**SGT, "max_loop_depth": 2}},
        False,
        None,
        (2, 8),
        _sgt_loops([1, 2], loops=2),
        {},
        None,
    ),
    "sgt window open train (all heads)": ({"depth": SGT}, True, None, (2, 8), _sgt_loops([3], window=True), {}, None),
    "sgt window closed train (kept)": ({"depth": SGT}, True, None, (2, 8), _sgt_loops([3]), {}, None),
    "sgt block loops x2": (
        {"depth": {**SGT, "loop_mode": "block", "max_loop_depth": 2}},
        False,
        None,
        (2, 8),
        _sgt_loops([0], loops=2),
        {},
        None,
    ),
}


def _prepared(case):
    overrides, training, elastic, (B, T), prepare, extra, change = CASES[case]
    model = build(**overrides).train(training)
    elastic_setting = ElasticSetting(**elastic) if elastic else ElasticSetting()
    model.set_elastic(elastic_setting)
    if prepare is not None:
        prepare(model)
    return model, elastic_setting, training, (B, T), extra, change


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("case", list(CASES))
def test_depth_cost_matches_flop_counter(case):
    model, elastic, training, (B, T), extra, change = _prepared(case)
    s = CostSetting.from_elastic(T, elastic, training=training, dtype_bytes=4, **extra)
    if change is None:  # threshold selection prices the share the forward measures: cost after it
        counted = count(model, tokens(B, T))
        cost = model.depth.cost(s)
    else:  # an override prices a state before the model is put in it
        cost = model.depth.cost(s)
        change(model)
        counted = count(model, tokens(B, T))
    record(case, "depth", as_counted(cost, T), counted["LanguageModel.depth"])
    assert counted["LanguageModel.depth"] == pytest.approx(as_counted(cost, T), rel=1e-9), case
    if change is None:
        acc = account(model, T, training=training)
        whole = acc.forward_flops_per_token - acc.attention_flops_per_token * (1 - 2 * T / (T + 1))
        assert counted["Global"] == pytest.approx(whole, rel=1e-9)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("case", [c for c, v in CASES.items() if not v[1] and v[6] is None])
def test_depth_kv_bytes_match_the_cache_a_prefill_allocates(case):
    model, elastic, _, (B, T), _, _ = _prepared(case)
    ours = model.depth.cost(CostSetting.from_elastic(T, elastic, training=False, dtype_bytes=4)).kv_bytes
    assert ours == kv_bytes_in_cache(model, tokens(B, T))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("depth", [{"name": "plain"}, RECURRENT])
def test_train_flops_match_flop_counter_over_forward_and_backward(depth):
    """train = 3 × forward, except Huginn's no-grad iterations at 1 ×: FlopCounterMode sees the backward too."""
    from torch.utils.flop_counter import FlopCounterMode

    B, T = 2, 8
    model = build(n_layers=3, depth=depth).train()
    idx = tokens(B, T)
    with FlopCounterMode(display=False) as counter:
        model(idx, idx).loss.backward()
    counted = counter.get_total_flops() / (B * T)
    acc = account(model, T, training=True)
    forward = acc.forward_flops_per_token - acc.attention_flops_per_token * (1 - 2 * T / (T + 1))
    no_grad = 0.0
    if depth["name"] == "recurrent":  # one of the three core iterations runs under no_grad
        d = model.depth
        core = Cost(matmul_flops=2 * d.adapter.in_features * d.adapter.out_features) + block_cost(
            d.blocks[1], CostSetting(T)
        )
        no_grad = as_counted(core, T)
    record(f"train {depth['name']}", "fwd+bwd", 3 * forward - 2 * no_grad, counted)
    assert counted == pytest.approx(3 * forward - 2 * no_grad, rel=1e-9)


def test_every_registered_depth_scheme_has_a_case():
    covered = {v[0].get("depth", {"name": "plain"})["name"] for v in CASES.values()}
    assert set(DEPTH.names()) <= covered
