"""MH-MoE (sub-token routing) and the MoEC options of ffn=moe (clusters, variance loss, cluster dropout)."""

import math

import pytest
import torch

from arch.cost import CostSetting
from arch.ffn.mhmoe import MultiHeadMoEFFN
from arch.ffn.moe import MoEFFN
from arch.ffn.router import cluster_dropout_mask, cluster_variance_loss, switch_balance_loss
from arch.layers import ForwardContext
from kernels.moe import expert_mlp_reference
from tests.helpers import tiny_config
from training.build import build_model
from training.config import validate
from training.metrics import read_metrics
from training.trainer import train


def ctx() -> ForwardContext:
    return ForwardContext(cos_TF=torch.zeros(1), sin_TF=torch.zeros(1), positions_T=torch.zeros(1))


OPTIONS = {"n_experts": 6, "top_k": 2, "expert_hidden": 12, "backend": "torch"}


# ------------------------------------------------------------------------------------ MH-MoE


@pytest.mark.parametrize("training", [True, False])
def test_mhmoe_with_one_head_and_identity_projections_equals_moe(training):
    torch.manual_seed(0)
    moe = MoEFFN(16, 0, **OPTIONS)
    mh = MultiHeadMoEFFN(16, 0, n_heads=1, **OPTIONS)
    missing, unexpected = mh.load_state_dict(moe.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == [
        "head_proj.bias",
        "head_proj.weight",
        "merge_proj.bias",
        "merge_proj.weight",
    ]
    with torch.no_grad():
        for proj in (mh.head_proj, mh.merge_proj):
            proj.weight.copy_(torch.eye(16))
            proj.bias.zero_()
    moe.train(training), mh.train(training)
    x = torch.randn(3, 5, 16)
    c_moe, c_mh = ctx(), ctx()
    torch.testing.assert_close(mh(x, c_mh), moe(x, c_moe), rtol=1e-5, atol=1e-6)
    assert c_mh.aux_losses.keys() == c_moe.aux_losses.keys() == ({"balance_loss"} if training else set())
    for name in c_moe.aux_losses:
        torch.testing.assert_close(c_mh.aux_losses[name], c_moe.aux_losses[name])
    torch.testing.assert_close(c_mh.metrics["moe/layer0/load"], c_moe.metrics["moe/layer0/load"])


def test_mhmoe_routes_each_subtoken_independently_with_balance_over_subtokens():
    torch.manual_seed(0)
    h, D = 4, 16
    mh = MultiHeadMoEFFN(D, 0, n_heads=h, **OPTIONS)
    x = torch.randn(2, 3, D)
    c = ctx()
    y = mh(x, c)
    sub_MS = mh.head_proj(x).reshape(2 * 3 * h, D // h)  # row order: token-major, then head
    ids, gates, probs, _ = mh.route(sub_MS, ctx())
    assert ids.shape == (2 * 3 * h, 2) and mh.w_in_EDH.shape == (6, D // h, 24)
    expected = mh.merge_proj(
        expert_mlp_reference(sub_MS, ids, gates, mh.w_in_EDH, mh.w_out_EFD, "swiglu").reshape(2, 3, D)
    )
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c.aux_losses["balance_loss"], 0.01 * switch_balance_loss(probs, ids, 6))
    # sub-tokens of one token do not all share their experts (independent routing)
    assert not all(torch.equal(ids[i * h], ids[i * h + j]) for i in range(6) for j in range(1, h))


def test_mhmoe_projection_init_follows_the_official_code_inside_the_model():
    root = validate(tiny_config("/tmp/unused", "model/ffn=mhmoe", "model.ffn.n_heads=2"))
    model = build_model(root, 64)
    ffn = model.depth.blocks[0].ffn
    D = root.model.d_model
    bound = (1 / math.sqrt(2)) * math.sqrt(6 / (2 * D))  # xavier_uniform, gain 1/√2
    assert ffn.head_proj.weight.abs().max() <= bound and ffn.head_proj.weight.std() > 0.7 * bound / math.sqrt(3)
    assert ffn.head_proj.bias.abs().max() <= 1 / math.sqrt(D) and ffn.head_proj.bias.abs().sum() > 0
    assert ffn.merge_proj.weight.std() > 0.7 * math.sqrt(2 / (2 * D)) and not ffn.merge_proj.bias.any()
    # activated expert FLOPs per token equal a top-k MoE's with the same (full-width) expert size
    assert ffn.F == MoEFFN(D, 0, top_k=2).F
    # h = 2 sub-tokens × (router 2·(D/2)·E + k = 2 experts of 3·(D/2)·F), plus the two D×D projections
    assert ffn.cost(CostSetting(32)).matmul_flops == 2 * 2 * 3 * D * ffn.F + 2 * 2 * (D // 2) * 8 + 2 * 2 * D * D


def test_mhmoe_heads_must_divide_d_model():
    with pytest.raises(ValueError, match="n_heads=3 must divide d_model=16"):
        MultiHeadMoEFFN(16, 0, n_heads=3)


# ------------------------------------------------------------------------------------ MoEC


@pytest.mark.parametrize("E,C,k,rate", [(8, 2, 2, 0.9), (8, 4, 3, 0.99), (6, 3, 1, 0.5)])
def test_cluster_dropout_never_drops_a_whole_cluster_or_a_tokens_experts(E, C, k, rate):
    torch.manual_seed(0)
    N = 4000
    drop_NE = cluster_dropout_mask(N, E, C, k, rate)
    survivors_NC = (~drop_NE).view(N, C, E // C).sum(-1)
    assert (survivors_NC >= 1).all()  # every cluster keeps an expert for every token
    assert ((~drop_NE).sum(-1) >= k).all()  # every token keeps at least k experts
    expected = rate * (E - max(k, C)) / E  # no more protected experts than needed
    assert abs(drop_NE.float().mean().item() - expected) < 0.5 * expected + 0.02


@pytest.mark.parametrize("renormalize", [True, False])
def test_cluster_dropout_routes_only_to_survivors_and_renormalises(renormalize):
    torch.manual_seed(0)
    layer = MoEFFN(16, 0, n_experts=8, top_k=2, n_clusters=4, cluster_dropout=0.7, renormalize=renormalize)
    x = torch.randn(500, 16)
    torch.manual_seed(7)
    ids, gates, probs, _ = layer.route(x, ctx())
    torch.manual_seed(7)
    drop = cluster_dropout_mask(500, 8, 4, 2, 0.7)
    assert drop.any(-1).float().mean() > 0.9 and not drop.gather(1, ids).any()
    assert (ids >= 0).all() and (ids[:, 0] != ids[:, 1]).all()
    survivors = probs.masked_fill(drop, 0)
    expected = survivors.gather(1, ids) / (survivors.gather(1, ids) if renormalize else survivors).sum(-1, keepdim=True)
    torch.testing.assert_close(gates, expected)
    layer.eval()  # no dropout at inference: plain top-k of the probabilities
    ids_eval, _, probs_eval, _ = layer.route(x, ctx())
    torch.testing.assert_close(ids_eval, probs_eval.topk(2, dim=-1).indices)


def test_cluster_variance_loss_is_the_sum_of_within_cluster_variances():
    probs = torch.tensor([[0.4, 0.2, 0.3, 0.1], [0.2, 0.2, 0.1, 0.5]], requires_grad=True)
    mean = probs.detach().mean(0)  # [0.3, 0.2, 0.2, 0.3]
    expected = ((mean[:2] - mean[:2].mean()) ** 2).mean() + ((mean[2:] - mean[2:].mean()) ** 2).mean()
    loss = cluster_variance_loss(probs, 2)
    torch.testing.assert_close(loss, expected)
    assert cluster_variance_loss(torch.full((3, 4), 0.25), 2) == 0
    loss.backward()
    assert probs.grad[:, 0].mean() > 0 > probs.grad[:, 1].mean()  # pulls the cluster's experts together
    layer = MoEFFN(16, 0, n_experts=4, top_k=1, n_clusters=2, cluster_var_loss_coef=0.5)
    c = ctx()
    layer(torch.randn(2, 3, 16), c)
    assert set(c.aux_losses) == {"balance_loss", "cluster_var_loss"}


def test_moec_options_are_validated():
    with pytest.raises(ValueError, match="n_clusters=3 must divide n_experts=8"):
        MoEFFN(16, 0, n_clusters=3)
    with pytest.raises(ValueError, match="cluster_dropout=1"):
        MoEFFN(16, 0, cluster_dropout=1.0)


# ------------------------------------------------------------------------------------ training

TRAIN_OPTIONS = {
    "mhmoe_h2": ["model/ffn=mhmoe", "model.ffn.n_heads=2"],
    "mhmoe_h4_capacity_xmoe": [
        "model/ffn=mhmoe",
        "model.ffn.n_heads=4",
        "model.ffn.capacity_factor=1.5",
        "model.ffn.router=xmoe",
    ],
    "moec": [
        "model/ffn=moe",
        "model.ffn.n_clusters=4",
        "model.ffn.cluster_var_loss_coef=0.1",
        "model.ffn.cluster_dropout=0.25",
    ],
    "emoe_moec": ["model/ffn=emoe", "model.ffn.n_clusters=2", "model.ffn.cluster_dropout=0.5"],
}


@pytest.mark.parametrize("name", sorted(TRAIN_OPTIONS))
def test_every_new_option_trains_with_falling_loss(tmp_path, name):
    run = tmp_path / name
    train(
        tiny_config(
            run,
            "trainer.max_steps=30",
            "trainer.eval_every=30",
            "optim.lr=1e-2",
            "trainer.sample_tokens=0",
            *TRAIN_OPTIONS[name],
        )
    )
    rows = read_metrics(run)
    evals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert evals[-1] < evals[0] - 1.0, evals
    last = [r for r in rows if "loss" in r][-1]
    assert len(last["moe/layer0/load"]) == 8
    if "cluster_var_loss_coef" in " ".join(TRAIN_OPTIONS[name]):
        assert "cluster_var_loss" in last
