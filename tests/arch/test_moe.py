"""MoE FFN: routing options, balancing, EMoE sampling statistics, capacity, expert-subset masks."""

import math

import pytest
import torch

from arch.ffn.emoe import coactivation_topk, hierarchical_router_loss
from arch.ffn.moe import MoEFFN
from arch.ffn.router import apply_capacity, routing_metrics
from arch.layers import ElasticSetting, ForwardContext
from kernels.moe import expert_mlp_reference


def ctx(elastic=None) -> ForwardContext:
    kwargs = {"elastic": elastic} if elastic is not None else {}
    return ForwardContext(cos_TF=torch.zeros(1), sin_TF=torch.zeros(1), positions_T=torch.zeros(1), **kwargs)


def moe(**options) -> MoEFFN:
    torch.manual_seed(0)
    return MoEFFN(16, 0, **{"n_experts": 6, "top_k": 2, "expert_hidden": 12, **options})


def test_moe_output_equals_the_reference_combination_of_selected_experts():
    layer = moe(backend="torch")
    x = torch.randn(2, 5, 16)
    c = ctx()
    y = layer(x, c)
    ids, gates, _, _ = layer.route(x.view(-1, 16), ctx())
    expected = expert_mlp_reference(x.view(-1, 16), ids, gates, layer.w_in_EDH, layer.w_out_EFD, "swiglu")
    torch.testing.assert_close(y.view(-1, 16), expected, rtol=1e-4, atol=1e-5)
    assert set(c.aux_losses) == {"balance_loss"}
    assert c.metrics["moe/layer0/load"].sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_gates_are_renormalised_over_selected_experts(scoring):
    layer = moe(scoring=scoring)
    _, gates, probs, _ = layer.route(torch.randn(10, 16), ctx())
    torch.testing.assert_close(gates.sum(-1), torch.ones(10))
    layer = moe(scoring=scoring, renormalize=False)
    ids, gates, probs, _ = layer.route(torch.randn(10, 16), ctx())
    torch.testing.assert_close(gates, probs.gather(1, ids))


def test_shared_experts_are_always_active_and_add_parameters():
    plain, shared = moe(), moe(n_shared_experts=1)
    assert shared.shared_experts is not None
    assert sum(p.numel() for p in shared.parameters()) - sum(p.numel() for p in plain.parameters()) == 3 * 16 * 12
    shared.load_state_dict(plain.state_dict(), strict=False)  # same router and experts
    x = torch.randn(1, 3, 16)
    assert not torch.allclose(shared(x, ctx()), plain(x, ctx()))
    with torch.no_grad():
        shared.shared_experts.w_down.weight.zero_()
    torch.testing.assert_close(shared(x, ctx()), plain(x, ctx()))  # the difference was the shared branch


def test_xmoe_router_reproduces_the_official_torchscale_logits():
    """torchscale Top2Gate(use_xmoe=True) [CODE]: wg rescaled to norm 1.5, then
    logits = (W_red x) · normalize(wg, eps=1e-4)ᵀ — token side unnormalised, no temperature."""
    layer = moe(router="xmoe", xmoe_dim=4)
    router = layer.router
    assert torch.allclose(router.expert_embed_ER.norm(dim=1), torch.full((6,), 1.5))  # rescaled at init
    torch.manual_seed(1)
    with torch.no_grad():
        router.reduce.weight.copy_(torch.randn(4, 16))
        router.expert_embed_ER.copy_(torch.randn(6, 4) * 3)  # an optimizer step moved the norms
    x = torch.randn(7, 16)
    wg = router.expert_embed_ER.detach().clone()
    wg = wg * (1.5 / wg.norm(dim=1, keepdim=True))  # the official forward's in-place rescale
    expected = (x @ router.reduce.weight.T) @ (wg / wg.norm(dim=1, keepdim=True).clamp(min=1e-4)).T
    router.after_optimizer_step(0)  # ours rescales after each optimizer step, before the next forward
    torch.testing.assert_close(router(x), expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(router.expert_embed_ER.norm(dim=1), torch.full((6,), 1.5))
    assert not hasattr(router, "log_temperature")


def test_xmoe_cosine_variant_is_the_papers_cosine_over_temperature():
    layer = moe(router="xmoe_cosine", xmoe_dim=4, xmoe_temperature=0.5)
    logits = layer.router(torch.randn(7, 16))
    assert logits.abs().max() <= 1 / 0.5 + 1e-5  # |cos| ≤ 1
    assert layer.router.log_temperature.requires_grad
    with pytest.raises(ValueError, match="xmoe_cosine"):
        moe(router="cosine")


def test_second_expert_is_kept_with_probability_twice_its_gate():
    from arch.ffn.router import drop_second_experts

    torch.manual_seed(0)
    probs_NE = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.45, 0.05], [0.7, 0.2, 0.1]]).repeat(20000, 1)
    ids_NK = torch.tensor([[0, 1], [0, 1], [0, 1]]).repeat(20000, 1)
    kept = drop_second_experts(ids_NK, probs_NE)
    assert torch.equal(kept[:, 0], ids_NK[:, 0])  # the first expert is never dropped
    rate = (kept[:, 1] >= 0).float().view(20000, 3).mean(0)
    torch.testing.assert_close(rate, torch.tensor([0.6, 0.9, 0.4]), atol=0.01, rtol=0)  # min(1, 2·p2)
    layer = moe(second_expert_drop=True).eval()
    ids = layer.route(torch.randn(5, 16), ctx())[0]
    assert (ids >= 0).all()  # the route itself never drops; forward drops in training only


def test_eval_capacity_and_top1_balance_counting():
    layer = moe(n_experts=8, capacity_factor=1.0, eval_capacity_fraction=0.25)
    assert layer.capacity(64, 2) == 16  # training: ⌈1.0 · 64·2 / 8⌉ = 2·⌈64/8⌉, X-MoE's capacity
    layer.eval()
    assert layer.capacity(64, 2) == 16 and layer.capacity(10, 2) == 3  # eval: ⌈0.25 · N⌉
    assert moe().capacity(64, 2) is None  # dropless
    from arch.ffn.router import switch_balance_loss

    probs_NE = torch.softmax(torch.randn(6, 8), -1)
    ids_NK = probs_NE.topk(2, -1).indices
    top1 = switch_balance_loss(probs_NE, ids_NK[:, :1], 8)
    f_E = torch.bincount(ids_NK[:, 0], minlength=8).float() / 6  # torchscale: ce = mean(mask1), me = mean(gates)
    torch.testing.assert_close(top1, 8 * 8 * (f_E * probs_NE.mean(0)).mean())
    with pytest.raises(ValueError, match="balance_loss_counts"):
        moe(balance_loss_counts="top2")


def test_eval_top_k_applies_only_at_inference():
    layer = moe(eval_top_k=4)
    x = torch.randn(8, 16)
    assert layer.route(x, ctx())[0].shape[1] == 2
    layer.eval()
    assert layer.route(x, ctx())[0].shape[1] == 4
    assert layer.route(x, ctx(ElasticSetting(top_k=3)))[0].shape[1] == 3


def test_capacity_drops_late_slots_and_counts_them():
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0]])
    kept, dropped = apply_capacity(ids, 4, capacity=2)
    # expert 0 queue in rank-major order: token0 r0, token1 r0, token2 r0 (dropped), token3 r1 (dropped)
    assert kept.tolist() == [[0, 1], [0, 2], [-1, 1], [3, -1]]
    assert dropped.item() == 2
    layer = moe(capacity_factor=0.5)
    c = ctx()
    layer(torch.randn(2, 12, 16), c)
    assert c.metrics["moe/layer0/dropped"].item() > 0


def test_routing_metrics_load_and_entropy():
    probs = torch.full((4, 4), 0.25)
    metrics = routing_metrics(probs, torch.tensor([[0, 1], [0, 1], [2, 3], [0, 3]]), 4)
    load = [0.375, 0.25, 0.125, 0.25]
    assert metrics["load"].tolist() == load
    assert metrics["max_load_ratio"].item() == pytest.approx(1.5) and metrics["min_load_ratio"].item() == pytest.approx(
        0.5
    )
    assert metrics["load_entropy"].item() == pytest.approx(-sum(p * math.log(p) for p in load) / math.log(4))
    assert metrics["router_entropy"].item() == pytest.approx(1.0)  # uniform router, though the load is uneven
    assert metrics["dead_experts"].item() == 0
    starved = routing_metrics(probs, torch.tensor([[0, 1], [0, 1], [0, 1], [0, 1]]), 4)
    assert starved["dead_experts"].item() == 2 and starved["min_load_ratio"].item() == 0.0  # defined, not a raw count
    assert starved["max_load_ratio"].item() == pytest.approx(2.0) and starved["load_entropy"].item() == pytest.approx(
        0.5
    )


def test_every_routed_slot_respects_the_expert_subset_mask():
    layer = moe(n_experts=8, top_k=3)
    mask = torch.tensor([True, False, True, False, False, True, True, False])
    for coactivation in (0.0, 1.0):
        layer.coactivation_prob, layer.k_ideal = coactivation, 6
        ids, _, _, _ = layer.route(torch.randn(200, 16), ctx(ElasticSetting(expert_mask_E=mask)))
        assert mask[ids].all()
    small = torch.tensor([True, False, False, False, False, False, False, False])
    ids, _, _, _ = layer.route(torch.randn(5, 16), ctx(ElasticSetting(expert_mask_E=small)))
    assert ids.shape[1] == 1 and (ids == 0).all()  # k is capped at the subset size


def test_coactivation_sampling_frequency_and_candidates():
    torch.manual_seed(0)
    N, E, k, k_ideal, rho = 20000, 8, 2, 4, 0.3
    probs = torch.softmax(torch.randn(N, E), -1)
    ids = coactivation_topk(probs, probs, k, k_ideal, rho, "uniform")
    top_k = probs.topk(k).indices
    candidates = probs.topk(k_ideal).indices
    assert (ids.unsqueeze(-1) == candidates.unsqueeze(1)).any(-1).all()  # always among the top-k_ideal
    assert (ids[:, 0] != ids[:, 1]).all()  # without replacement
    differs = (ids.sort(-1).values != top_k.sort(-1).values).any(-1).float().mean().item()
    # A sampled token keeps exactly its top-k set with probability 1/C(4,2) = 1/6.
    expected = rho * (1 - 1 / math.comb(k_ideal, k))
    assert abs(differs - expected) < 4 * math.sqrt(expected * (1 - expected) / N)


def test_coactivation_keep_top1_and_proportional_mode():
    torch.manual_seed(0)
    N, E = 20000, 6
    logits = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.0, -1.0]).expand(N, E)
    probs = logits.softmax(-1)
    ids = coactivation_topk(probs, probs, 2, 4, 1.0, "proportional", keep_top1=True)
    assert (ids[:, 0] == 0).all()
    # The second expert is drawn from candidates {1, 2, 3} ∝ p.
    share = torch.bincount(ids[:, 1], minlength=E).float() / N
    p = probs[0, 1:4] / probs[0, 1:4].sum()
    torch.testing.assert_close(share[1:4], p, atol=0.015, rtol=0)
    assert share[4:].sum() == 0


def test_hierarchical_loss_is_zero_at_the_geometric_target_and_positive_when_flat():
    gamma, E = 0.5, 6
    q = gamma ** torch.arange(E, dtype=torch.float)
    q = q / q.sum()
    shuffled = q[torch.randperm(E)].expand(3, E)
    assert hierarchical_router_loss(shuffled, gamma).item() == pytest.approx(0.0, abs=1e-6)
    flat = torch.full((3, E), 1 / E, requires_grad=True)
    loss = hierarchical_router_loss(flat, gamma)
    assert loss.item() > 0.1
    loss.backward()
    assert flat.grad.abs().sum() > 0


def test_aux_loss_free_bias_reduces_imbalance_of_a_skewed_router():
    """A router that prefers low-index experts: the bias alone must even out the load over steps."""
    torch.manual_seed(0)
    layer = moe(n_experts=8, top_k=2, balance_loss_coef=0.0, bias_update_rate=0.003)
    with torch.no_grad():
        layer.router.proj.weight.normal_(0, 0.3)
        layer.router.proj.weight[:, 0] = torch.linspace(2.0, -2.0, 8)  # skew by one input feature
    x = torch.randn(512, 1, 16)
    x[..., 0] = x[..., 0].abs() + 0.5  # that feature is positive: experts 0, 1 dominate
    ratios = []
    for step in range(300):
        c = ctx()
        with torch.no_grad():
            layer(x, c)
        ratios.append(
            c.metrics["moe/layer0/max_load_ratio"].item() / max(c.metrics["moe/layer0/min_load_ratio"].item(), 1e-9)
        )
        layer.after_optimizer_step(step)
    assert ratios[0] > 50
    assert max(ratios[-20:]) < 3.0
    assert layer.expert_bias_E[0] < layer.expert_bias_E[-1]
    assert layer.pending_counts_E.sum() == 0


def test_bias_is_not_updated_from_elastic_sub_model_steps():
    layer = moe(bias_update_rate=0.1)
    layer(torch.randn(1, 8, 16), ctx(ElasticSetting(top_k=1)))
    assert layer.pending_counts_E.sum() == 0
    layer(torch.randn(1, 8, 16), ctx())
    assert layer.pending_counts_E.sum() == 16


def test_bias_changes_selection_but_not_gates():
    layer = moe(renormalize=False)
    x = torch.randn(30, 16)
    with torch.no_grad():
        layer.expert_bias_E[3] = 10.0  # force expert 3 into every token's selection
    ids, gates, probs, _ = layer.route(x, ctx())
    assert (ids == 3).any(-1).all()
    torch.testing.assert_close(gates, probs.gather(1, ids))  # gates are the unbiased probabilities


def test_invalid_moe_options_fail_with_a_clear_message():
    with pytest.raises(ValueError, match=r"top_k=9 must be in \[1, n_experts=8\]"):
        MoEFFN(16, 0, n_experts=8, top_k=9)
    with pytest.raises(ValueError, match="needs ffn.k_ideal"):
        MoEFFN(16, 0, coactivation_prob=0.5)
