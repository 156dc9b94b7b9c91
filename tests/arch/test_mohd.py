"""MoHD (METHODS.md §3): group routing, activation scaling, group fusion, both scopes, presets.

Legend: N tokens, D d_model, G groups, A active groups, g group width.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as Fn

from arch.ffn.mohd import GroupFusion, MoHDFFN, parameter_counts
from arch.ffn.router import switch_balance_loss
from arch.layers import ForwardContext
from tests.helpers import tiny_config
from training.accounting.account import account
from training.cli import compose
from training.config import validate
from training.metrics import read_metrics
from training.trainer import train


def ctx() -> ForwardContext:
    return ForwardContext(cos_TF=torch.zeros(1), sin_TF=torch.zeros(1), positions_T=torch.zeros(1))


def mohd(**options) -> MoHDFFN:
    torch.manual_seed(0)
    return MoHDFFN(
        16,
        0,
        **{
            "n_groups": 4,
            "n_active": 2,
            "n_shared": 1,
            "hidden_dim": 24,
            "fusion": "none",
            "backend": "torch",
            **options,
        },
    )


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_shared_groups_always_on_and_exactly_n_active_per_token(scoring):
    layer = mohd(n_groups=8, n_active=5, n_shared=2, hidden_dim=40, scoring=scoring)
    r = layer.routing(torch.randn(300, 16))
    assert (r.ids_NA[:, :2] == torch.tensor([0, 1])).all()  # shared groups, every token
    assert all(len(set(row)) == 5 for row in r.ids_NA.tolist())  # 5 distinct groups per token
    assert (r.active_NG.sum(1) == 5).all() and (r.active_NG[:, :2] == 1).all()
    routed = r.ids_NA[:, 2:]
    assert routed.min() >= 2 and len(routed.unique()) > 3  # routed among the specialised groups only
    # the routed ones are the top-3 specialised scores
    top = r.probs_NG[:, 2:].topk(3).indices + 2
    assert (routed.sort(1).values == top.sort(1).values).all()


def test_hidden_scope_output_lives_on_the_active_groups_only():
    layer = mohd(scope="hidden", n_groups=4, n_active=2, n_shared=1)
    x = torch.randn(1, 30, 16)
    y = layer(x, ctx()).view(30, 4, 4)
    active = layer.routing(x.view(30, 16)).active_NG.bool()
    assert (y[~active] == 0).all() and (y[active].abs().sum(-1) > 0).all()
    assert (y[:, 0].abs().sum(-1) > 0).all()  # the shared group always carries output


def _manual_ffn_scope(layer, x_ND, coef_NG):
    """y = Σ_e c_e · SwiGLU_e(x) @ W_out[blk e] from dense weights and an explicit (N, G) coefficient."""
    N, G, g = x_ND.shape[0], layer.G, layer.g
    h = (x_ND @ layer.w_in_DH).view(N, G, 2, g)
    a = Fn.silu(h[:, :, 0]) * h[:, :, 1] * coef_NG[..., None]
    return a.reshape(N, -1) @ layer.w_out_FD


@pytest.mark.parametrize("scaling", ["n_gate_sum", "renormalize", "inverse_density", "gate"])
def test_activation_scaling_formulas(scaling):
    layer = mohd(scaling=scaling)
    x = torch.randn(12, 16)
    r = layer.routing(x)
    gate_NG = torch.zeros(12, 4).scatter(1, r.ids_NA, r.probs_NG.gather(1, r.ids_NA))
    alpha_N1 = {
        "n_gate_sum": 4 * gate_NG.sum(1, keepdim=True),  # α = N·Σgate (third-party default)
        "renormalize": 2 / gate_NG.sum(1, keepdim=True),
        "gate": torch.ones(12, 1),
    }
    expected_NG = r.active_NG * 2.0 if scaling == "inverse_density" else gate_NG * alpha_N1[scaling]
    torch.testing.assert_close(layer(x.view(1, 12, 16), ctx()).view(12, 16), _manual_ffn_scope(layer, x, expected_NG))


def test_scaling_changes_the_output_by_the_per_token_factor():
    x = torch.randn(1, 10, 16)
    plain, scaled = mohd(scaling="gate"), mohd(scaling="n_gate_sum")
    r = plain.routing(x.view(10, 16))
    alpha_N1 = 4 * r.probs_NG.gather(1, r.ids_NA).sum(1, keepdim=True)
    torch.testing.assert_close(scaled(x, ctx()).view(10, 16), plain(x, ctx()).view(10, 16) * alpha_N1)
    assert not torch.allclose(scaled(x, ctx()), plain(x, ctx()))


def _monarch_matrix(f: GroupFusion) -> torch.Tensor:
    """The dense (G·b)×(G·b) matrix of the Monarch fusion: block-diag B1, then B2[j] across groups."""
    G, b = f.G, f.b
    B1 = torch.block_diag(*f.w1_Gbb.detach())
    B2 = torch.zeros(G * b, G * b)
    for j in range(b):
        for e in range(G):
            for e2 in range(G):
                B2[e2 * b + j, e * b + j] = f.w2_bGG[j, e, e2]  # v[e, j] = Σ_e2 B2[j][e, e2] u[e2, j]
    return B1 @ B2


@pytest.mark.parametrize("kind", ["blockdiag", "monarch"])
def test_group_fusion_is_identity_at_init_and_follows_its_matrix(kind):
    torch.manual_seed(0)
    f, G, b = GroupFusion(4, 3, kind), 4, 3
    h = torch.randn(20, G, b)
    active = torch.zeros(20, G).scatter(1, torch.stack([torch.randperm(G)[:2] for _ in range(20)]), 1.0)
    h = h * active[..., None]
    torch.testing.assert_close(f(h, active), h)  # identity init: equal to fusion=none
    with torch.no_grad():
        for p in f.parameters():
            p.add_(0.3 * torch.randn_like(p))
    M = torch.block_diag(*f.w1_Gbb.detach()) if kind == "blockdiag" else _monarch_matrix(f)
    expected = ((h.view(20, -1) @ M).view(20, G, b)) * active[..., None]
    out = f(h, active)
    torch.testing.assert_close(out, expected)
    assert (out[active == 0] == 0).all()  # inactive groups stay off
    # blockdiag never moves information between groups; monarch does (among active groups)
    crossed = (M.view(G, b, G, b).abs().sum((1, 3)) * (1 - torch.eye(G))).sum()
    assert (crossed > 0) == (kind == "monarch")


@pytest.mark.parametrize("scope", ["ffn", "hidden"])
@pytest.mark.parametrize("fusion", ["none", "blockdiag", "monarch"])
def test_triton_path_equals_reference_inside_the_layer_with_gradients(scope, fusion):
    """Interpreter on CPU: the Triton kernels inside the module equal the loop reference, grads included."""
    x = torch.randn(1, 9, 16)
    grads = {}
    for backend in ("triton", "reference"):
        layer = mohd(scope=scope, fusion=fusion, backend=backend)
        with torch.no_grad():
            for p in layer.fusion.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        xl = x.clone().requires_grad_()
        c = ctx()
        y = layer(xl, c)
        (y.pow(2).sum() + c.aux_losses["mohd_balance_loss"]).backward()
        grads[backend] = [y.detach(), xl.grad] + [p.grad for p in layer.parameters()]
    for a, b in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_balance_loss_is_switch_over_specialised_groups():
    layer = mohd(n_groups=6, n_active=3, n_shared=2, hidden_dim=36, balance_loss_coef=0.5)
    x = torch.randn(40, 16)
    c = ctx()
    layer(x.view(1, 40, 16), c)
    r = layer.routing(x)
    p = r.probs_NG[:, 2:] / r.probs_NG[:, 2:].sum(-1, keepdim=True)
    f = torch.bincount(r.ids_NA[:, 2] - 2, minlength=4).float() / 40
    torch.testing.assert_close(c.aux_losses["mohd_balance_loss"], 0.5 * 4 * (f * p.mean(0)).sum())
    torch.testing.assert_close(c.aux_losses["mohd_balance_loss"], 0.5 * switch_balance_loss(p, r.ids_NA[:, 2:] - 2, 4))


def test_invalid_group_options_fail_with_a_clear_message():
    with pytest.raises(ValueError, match="n_shared=3 <= n_active=2"):
        mohd(n_shared=3)
    with pytest.raises(ValueError, match="must divide the grouped width"):
        mohd(hidden_dim=30)
    with pytest.raises(ValueError, match="needs model.attention=mohd_mha"):
        mohd(scope="hidden", share_routing=True)(torch.randn(1, 2, 16), ctx())


def _build(experiment):
    from omegaconf import OmegaConf

    from arch.model import LanguageModel

    cfg = compose([f"experiment={experiment}", "trainer.max_steps=7", "seed=3", "run_dir=/tmp/x"])
    root = validate(cfg)
    assert (root.experiment, root.trainer.max_steps, root.seed) == (experiment, 7, 3)  # overrides accepted
    OmegaConf.set_struct(cfg.model, False)
    cfg.model.vocab_size = 256
    return LanguageModel(cfg.model)


def test_presets_report_activated_and_total_parameters():
    counts = {
        e: parameter_counts(_build(e), exclude_embeddings=True) for e in ("mohd_baseline", "mohd_half", "mohd_3x")
    }
    flops = {e: account(_build(e), 256).forward_flops_per_token for e in counts}
    for e in counts:
        print(
            f"{e}: total {counts[e]['total']:,} activated {counts[e]['activated']:,} params; {flops[e] / 1e6:.2f} "
            "MFLOP/token"
        )
    base = counts["mohd_baseline"]
    assert base["total"] == base["activated"]
    for e, expansion in (("mohd_half", 2), ("mohd_3x", 3)):
        # activated ≈ dense (router + fusion on top); total grows with the FFN expansion
        assert base["activated"] < counts[e]["activated"] < 1.2 * base["activated"], e
        ffn_dense = 4 * 3 * 128 * 352
        assert counts[e]["total"] - base["total"] > (expansion - 1) * ffn_dense, e
        assert flops[e] < 1.2 * flops["mohd_baseline"], e


SCOPES = {
    "ffn_monarch": [
        "model/ffn=mohd",
        "model.ffn.n_groups=4",
        "model.ffn.n_active=2",
        "model.ffn.n_shared=1",
        "model.ffn.fusion=monarch",
    ],
    "hidden_both_sublayers": [
        "model/ffn=mohd",
        "model.ffn.scope=hidden",
        "model.ffn.width_multiplier=1.0",
        "model.ffn.n_groups=4",
        "model.ffn.n_active=2",
        "model.ffn.n_shared=1",
        "model/attention=mohd_mha",
        "model.attention.n_groups=4",
        "model.attention.n_active=2",
        "model.attention.n_shared=1",
    ],
}


@pytest.mark.parametrize("name", sorted(SCOPES))
def test_both_scopes_train_with_falling_loss(tmp_path, name):
    run = tmp_path / name
    train(
        tiny_config(
            run,
            "trainer.max_steps=30",
            "trainer.eval_every=30",
            "optim.lr=1e-2",
            "trainer.sample_tokens=0",
            *SCOPES[name],
        )
    )
    evals = [r["val_loss"] for r in read_metrics(run) if "val_loss" in r]
    assert evals[-1] < evals[0] - 1.0, evals


def test_hidden_scope_can_share_the_attention_routing():
    from arch.attention.mohd_attention import MoHDAttention

    torch.manual_seed(0)
    attn = MoHDAttention(16, 2, 0, n_groups=4, n_active=2, n_shared=1)
    ffn = mohd(scope="hidden", share_routing=True)
    T = 6
    c = ForwardContext(cos_TF=torch.ones(T, 4), sin_TF=torch.zeros(T, 4), positions_T=torch.arange(T))
    x = torch.randn(1, T, 16)
    a = attn(x, c)
    y = ffn(x + a, c).view(T, 4, 4)
    active = c.state["mohd_routing/0"].active_NG.bool()
    assert (a.view(T, 4, 4)[~active] == 0).all() and (y[~active] == 0).all()  # both sublayers on the same groups
    assert list(c.aux_losses) == ["mohd_balance_loss"]
