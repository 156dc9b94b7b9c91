"""MoUE (arch/ffn/universal.py): one pool parameter, rotational windows, exposure-corrected balance,
trajectory router, pool gradients, widening schedule, compute matching with the matched MoE."""

import copy

import pytest
import torch

from arch.cost import CostSetting, linear_flops
from arch.ffn.router import switch_balance_loss
from arch.ffn.universal import POOL_NAME, UniversalMoEFFN
from arch.ffn.universal_topology import (
    PooledRoutingStats,
    exposure_counts,
    per_layer_balance_loss,
    universal_balance_loss,
    widened_size,
    window_members,
)
from arch.layers import ElasticSetting, ForwardContext, ModelShared
from arch.model import LanguageModel
from kernels.moe import expert_mlp_reference
from training.accounting.account import account
from training.cli import compose
from training.config import validate
from training.config_schema import ModelConfig

D = 16
MOUE = {
    "name": "moue",
    "n_universal": 10,
    "window_size": 4,
    "window_stride": 3,
    "top_k": 2,
    "expert_hidden": 8,
    "backend": "torch",
}


def ctx(elastic=None) -> ForwardContext:
    kwargs = {"elastic": elastic} if elastic is not None else {}
    return ForwardContext(cos_TF=torch.zeros(1), sin_TF=torch.zeros(1), positions_T=torch.zeros(1), **kwargs)


def layers(n_layers=4, **options) -> list[UniversalMoEFFN]:
    torch.manual_seed(0)
    shared = ModelShared(D, n_layers, 2)
    opts = {**{k: v for k, v in MOUE.items() if k != "name"}, **options}
    return [UniversalMoEFFN(D, i, shared, **opts) for i in range(n_layers)]


def model(n_layers=4, **ffn) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(
        ModelConfig(vocab_size=61, d_model=D, n_layers=n_layers, n_heads=2, max_seq_len=32, ffn={**MOUE, **ffn})
    )


def test_the_pool_is_one_parameter_shared_by_every_layer_and_counted_once():
    m = model(n_local=1)
    pool = m.shared.modules_by_name[POOL_NAME]
    ffns = [b.ffn for b in m.depth.blocks]
    assert all(f.pool is pool for f in ffns)
    names = [n for n, p in m.named_parameters() if p is pool.w_in_MDH]
    assert names == [f"shared.modules_by_name.{POOL_NAME}.w_in_MDH"]  # registered once, not under each layer
    assert sum(1 for n in m.state_dict() if n.endswith("w_in_MDH")) == 1
    pool_size = sum(p.numel() for p in pool.parameters())
    per_layer = sum(p.numel() for p in ffns[0].parameters())
    assert pool_size == 10 * 3 * D * 8 + 10 * 16  # experts + trajectory embeddings
    assert per_layer == (D + 16) * 10 + (D + 16) * 1 + 3 * D * 8 + 16  # routers, one local expert, its embedding
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in dict(m.named_parameters()).values())
    assert sum(p.numel() for p in m.depth.parameters()) == 4 * (
        per_layer + sum(p.numel() for p in m.depth.blocks[0].attn.parameters()) + 2 * D
    )


def test_window_membership_is_as_configured():
    # M = 10, window 4, stride 3: offsets 0, 3, 6, 9 (the last wraps)
    assert [window_members(l, 10, 4, 3) for l in range(4)] == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9], [9, 0, 1, 2]]
    assert window_members(2, 10, 4, 3, topology="full") == list(range(10))
    assert window_members(1, 10, 6, 3, base_size=4, anchor="center") == [2, 3, 4, 5, 6, 7]  # grown around [3, 7)
    assert window_members(1, 10, 6, 3, base_size=4, anchor="start") == [3, 4, 5, 6, 7, 8]
    for layer, expected in zip(layers(n_local=1), ([0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9], [9, 0, 1, 2])):
        ids, _, probs, _ = layer.route(torch.randn(400, D) * 3, ctx())
        routable = set(expected) | {10}  # the layer's local expert is column M
        assert set(ids.unique().tolist()) == routable  # every member is used, nothing else
        assert probs[:, sorted(set(range(11)) - routable)].abs().max() == 0
    full = layers(topology="full")[1]
    assert set(full.route(torch.randn(400, D) * 3, ctx())[0].unique().tolist()) == set(range(10))


def test_unreachable_pool_experts_and_bad_options_are_rejected():
    with pytest.raises(ValueError, match=r"leave pool experts \[8, 9\] unreachable"):
        layers(window_size=2, window_stride=2)
    with pytest.raises(ValueError, match="window_size=11"):
        layers(window_size=11)
    with pytest.raises(ValueError, match="widen_to=3"):
        layers(widen_to=3)


def test_exposure_counts_static_and_pooled_over_the_layers_that_ran():
    assert exposure_counts(4, 10, 4, 3).tolist() == [2, 2, 2, 2, 1, 1, 2, 1, 1, 2]
    assert exposure_counts(4, 10, 4, 3, topology="full").tolist() == [4] * 10
    for active, expected in ((None, [2, 2, 2, 2, 1, 1, 2, 1, 1, 2]), ((0, 2), [1, 1, 1, 1, 0, 0, 1, 1, 1, 1])):
        c = ctx(ElasticSetting(active_layers=active))
        for i, layer in enumerate(layers(n_local=1)):
            if active is None or i in active:
                layer(torch.randn(1, 5, D), c)
        stats = c.state["moue/stats"]
        locals_ = [1.0 if active is None or i in active else 0.0 for i in range(4)]  # one local expert per layer, c = 1
        assert stats.c_G.tolist() == expected + locals_
        assert stats.layers == (4 if active is None else 2)
        assert stats.f_G.sum().item() == pytest.approx(stats.layers)  # each layer's load sums to 1


def test_universal_loss_is_the_layer_count_when_every_layer_is_balanced_and_matches_its_formula():
    M, L, W = 10, 4, 4
    stats = PooledRoutingStats(M, torch.device("cpu"))
    for layer in range(L):  # each layer spreads its slots and probabilities evenly over its window
        members = torch.tensor(window_members(layer, M, W, 3))
        probs = torch.zeros(W * 5, M)
        probs[:, members] = 1 / W
        ids = members.repeat(5).view(-1, 2)
        stats.add(torch.arange(M), probs[0] > 0, probs, ids)
    assert universal_balance_loss(stats.f_G, stats.P_G, stats.c_G, W).item() == pytest.approx(L)
    # Uncorrected, the same balanced state is penalised, because exposure is uneven (c ∈ {1, 2}).
    assert universal_balance_loss(stats.f_G, stats.P_G, stats.c_G, W, corrected=False).item() > L + 0.1
    f, P, c = torch.rand(M), torch.rand(M), exposure_counts(L, M, W, 3)
    assert universal_balance_loss(f, P, c, W).item() == pytest.approx((W * (f / c) * (P / c) * c).sum().item())
    c_even = torch.full((M,), 2.0)  # with even exposure both forms agree
    assert universal_balance_loss(f, P, c_even, W).item() == pytest.approx(
        universal_balance_loss(f, P, c_even, W, corrected=False).item()
    )


def test_per_layer_loss_is_the_switch_loss_over_the_routable_experts():
    layer = layers()[1]
    ids, _, probs, _ = layer.route(torch.randn(50, D), ctx())
    routable = torch.tensor([3, 4, 5, 6])
    position = torch.full((10,), -1)
    position[routable] = torch.arange(4)
    expected = switch_balance_loss(probs[:, routable], position[ids], 4)
    assert per_layer_balance_loss(probs, ids, 4).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("balance", ["universal", "per_layer", "uncorrected"])
def test_balance_loss_choice_reaches_the_training_loss(balance):
    m = model(balance_loss=balance, balance_loss_coef=1.0, n_local=1)
    idx = torch.randint(0, 61, (2, 12))
    out = m(idx, idx)
    assert 3.0 < out.aux_losses["balance_loss"].item() < 8.0  # ≈ number of layers near balance
    assert out.metrics["moue/pool_load"].shape == (10,) and out.metrics["moe/layer0/load"].shape == (11,)
    out.loss.backward()
    assert m.depth.blocks[2].ffn.router.weight.grad.abs().sum() > 0


def test_pool_gradient_is_the_sum_of_per_layer_reference_gradients():
    stack = layers(n_layers=3, n_local=1, window_size=5)
    pool = stack[0].pool
    c = ctx()
    xs = [torch.randn(2, 7, D) for _ in stack]
    upstream = [torch.randn(2, 7, D) for _ in stack]
    routes = []
    for layer, x, r in zip(stack, xs, upstream):
        z = c.state.get("moue/trajectory_NZ")
        routes.append(tuple(t.detach() for t in layer.route(x.view(-1, D), ctx(), z)[:2]))
        (layer(x, c) * r).sum().backward(retain_graph=True)
    w_in_ref, w_out_ref = torch.zeros_like(pool.w_in_MDH), torch.zeros_like(pool.w_out_MFD)
    for x, r, (ids, gates) in zip(xs, upstream, routes):
        w_in = pool.w_in_MDH.detach().clone().requires_grad_()
        w_out = pool.w_out_MFD.detach().clone().requires_grad_()
        pool_ids = torch.where(ids < 10, ids, -1)
        y = expert_mlp_reference(x.view(-1, D), pool_ids, gates, w_in, w_out, "swiglu")
        g_in, g_out = torch.autograd.grad((y * r.view(-1, D)).sum(), (w_in, w_out))
        w_in_ref, w_out_ref = w_in_ref + g_in, w_out_ref + g_out
    torch.testing.assert_close(pool.w_in_MDH.grad, w_in_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pool.w_out_MFD.grad, w_out_ref, rtol=1e-4, atol=1e-6)
    assert all(l.w_in_LDH.grad is not None for l in stack)  # local experts train too


def test_trajectory_state_carries_routing_history_and_can_be_switched_off():
    m = model()
    assert m.depth.blocks[0].ffn.router.in_features == D + 16
    idx = torch.randint(0, 61, (2, 12))
    recorded = {}

    def record(i):
        return lambda mod, args, out: recorded.__setitem__(i, out.detach().clone())

    for i, b in enumerate(m.depth.blocks):
        b.ffn.register_forward_hook(record(i))
    m(idx)
    before = dict(recorded)
    with torch.no_grad():  # change only the expert embeddings that feed z
        m.shared.modules_by_name[POOL_NAME].embed_MZ.mul_(-3.0)
    m(idx)
    assert torch.equal(before[0], recorded[0])  # layer 0 sees z = 0
    assert not torch.allclose(before[3], recorded[3])  # later layers' routing depends on earlier choices
    off = model(trajectory=False)
    assert off.depth.blocks[0].ffn.router.in_features == D and off.shared.modules_by_name[POOL_NAME].embed_MZ is None


def test_widening_schedule_moves_with_optimizer_steps_and_survives_a_state_dict_round_trip():
    assert [widened_size(s, 4, 8, 10, 4) for s in (0, 10, 11, 13, 14, 99)] == [4, 4, 5, 7, 8, 8]
    assert widened_size(12, 4, 8, 10, 0) == 8 and widened_size(12, 4, None, 0, 5) == 4
    m = model(widen_to=8, widen_start=2, widen_steps=4)
    pool = m.shared.modules_by_name[POOL_NAME]
    sizes = []
    for step in range(7):
        m.after_optimizer_step(step)
        sizes.append(pool.window_size)
    assert sizes == [4, 4, 5, 6, 7, 8, 8]
    assert m.depth.blocks[1].ffn.window() == window_members(1, 10, 8, 3, base_size=4)
    fresh = model(widen_to=8, widen_start=2, widen_steps=4)
    fresh.load_state_dict(copy.deepcopy(m.state_dict()))
    assert fresh.shared.modules_by_name[POOL_NAME].window_size == 8


def test_elastic_top_k_is_honoured_and_expert_subsets_are_refused():
    layer = layers()[0]
    assert layer.route(torch.randn(6, D), ctx(ElasticSetting(top_k=3)))[0].shape == (6, 3)
    with pytest.raises(ValueError, match="elastic expert subsets"):
        layer.route(torch.randn(6, D), ctx(ElasticSetting(expert_mask_E=torch.ones(10, dtype=torch.bool))))


def _preset_model(experiment: str) -> LanguageModel:
    root = validate(compose([f"experiment={experiment}", "model.vocab_size=2048"]))
    torch.manual_seed(0)
    return LanguageModel(root.model)


def test_moue_preset_matches_its_moe_baseline_in_activated_flops_and_total_parameters():
    moue, moe = _preset_model("moue"), _preset_model("moue_baseline")
    ffn_u, ffn_e = moue.depth.blocks[0].ffn, moe.depth.blocks[0].ffn
    assert (ffn_u.top_k, ffn_u.F) == (ffn_e.top_k, ffn_e.F)
    at = CostSetting(256)  # expert FLOPs alike: take off the routers and MoUE's trajectory EMA
    moue_experts = ffn_u.cost(at).matmul_flops - linear_flops(ffn_u.router) - 2 * ffn_u.top_k * ffn_u.trajectory_dim
    assert moue_experts == ffn_e.cost(at).matmul_flops - linear_flops(ffn_e.router)
    # Whole-model FLOPs differ only by the router widths (pool of M vs E experts) and the trajectory EMA.
    router_diff = sum(
        2 * (b.ffn.router.weight.numel() - e.ffn.router.proj.weight.numel())
        for b, e in zip(moue.depth.blocks, moe.depth.blocks)
    )
    extra = router_diff + len(moue.depth.blocks) * 2 * ffn_u.top_k * ffn_u.trajectory_dim
    flops_u, flops_e = account(moue, 256).forward_flops_per_token, account(moe, 256).forward_flops_per_token
    assert flops_u - flops_e == extra
    assert extra < 0.02 * flops_e
    n_u, n_e = moue.num_parameters(), moe.num_parameters()
    assert abs(n_u - n_e) / n_e < 0.01, (n_u, n_e)  # pool 32 experts = 4 layers × 8 experts


def test_pooled_stats_skip_dropped_slots():
    """f counts only kept slots (ids ≥ 0) and divides by their number: a dropped slot (-1) adds nothing."""
    stats = PooledRoutingStats(4, torch.device("cpu"))
    probs_NX = torch.full((3, 4), 0.25)
    ids_NK = torch.tensor([[0, 1], [1, -1], [-1, -1]])  # 3 kept slots: expert 0 once, expert 1 twice
    stats.add(torch.arange(4), torch.ones(4, dtype=torch.bool), probs_NX, ids_NK)
    assert stats.f_G.tolist() == pytest.approx([1 / 3, 2 / 3, 0.0, 0.0])
