"""Inner Thinking Transformer (depth=itt): reductions to vanilla / looping, gradients, sparsity, causality."""

import pytest
import torch

from arch.model import LanguageModel
from arch.registry import ATTENTION, ConfigError
from tests.arch.depth_helpers import model
from training.accounting.account import account


def same_blocks(target: LanguageModel, source: LanguageModel) -> LanguageModel:
    missing, unexpected = target.load_state_dict(source.state_dict(), strict=False)
    assert not unexpected and all(".thinking." in k for k in missing)  # only ITT's own parameters differ
    return target


IDX = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kv", ["stale", "recompute"])
def test_itt_with_all_extra_ratios_zero_equals_vanilla_exactly(kv):
    vanilla = model({"name": "plain"})
    itt = same_blocks(model({"name": "itt", "ratios": [0, 0, 0], "kv": kv}, seed=1), vanilla)
    assert torch.equal(itt(IDX, IDX).logits, vanilla(IDX, IDX).logits)
    prompt = IDX[:, :5]
    assert torch.equal(itt.generate(prompt, 6, temperature=0), vanilla.generate(prompt, 6, temperature=0))


@pytest.mark.parametrize("variant", ["router_weight_one", "router_not_scaling"])
def test_itt_ratio_one_unit_weights_unit_steps_equals_plain_looping(variant):
    vanilla = model({"name": "plain"})
    loop = same_blocks(model({"name": "loop", "looped_layers": [1, 3], "repeats": 4}), vanilla)
    options = {"router_activation": "none"} if variant == "router_weight_one" else {"scale_by_router": False}
    itt = same_blocks(model({"name": "itt", "ratios": [1, 1, 1], **options}, seed=1), vanilla)
    for th in itt.depth.thinking.values():
        assert torch.equal(th.phi_SD, torch.ones_like(th.phi_SD))  # step vectors start at 1
        for router in th.routers:  # r = 0·h + 1 = 1 exactly
            torch.nn.init.zeros_(router.weight)
            torch.nn.init.ones_(router.bias)
    assert torch.equal(itt(IDX, IDX).logits, loop(IDX, IDX).logits)
    assert not torch.allclose(loop(IDX, IDX).logits, vanilla(IDX, IDX).logits)


@pytest.mark.parametrize("tse", ["scale", "add"])
def test_gradients_reach_routers_and_step_vectors(tse):
    itt = model({"name": "itt", "tse": tse})
    itt(IDX, IDX).loss.backward()
    for th in itt.depth.thinking.values():
        for router in th.routers:
            assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
        step = th.phi_SD if tse == "scale" else th.enc_SD
        assert step.grad is not None and (step.grad.abs().sum(1) > 0).all()  # every step, step 1 included


def test_extra_steps_compute_only_the_selected_tokens():
    itt = model({"name": "itt", "layers": [1], "ratios": [0.5, 0.25, 0.0]})
    rows = []
    itt.depth.blocks[1].ffn.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[1]))
    itt(IDX, IDX)
    assert rows == [16, 8, 4]  # full pass, then round(ρ·T) gathered tokens per sequence; ρ=0 skips the step
    flops = []
    for ratios in ([0, 0, 0], [0.5, 0.5, 0.5], [0.7, 0.7, 0.7], [1, 1, 1]):
        itt.depth.set_ratios(ratios)
        flops.append(account(itt, 16).forward_flops_per_token)
    vanilla = account(model({"name": "plain"}), 16).forward_flops_per_token
    assert flops == sorted(flops) and flops[0] == pytest.approx(vanilla, rel=0.01)
    block = vanilla - account(model({"name": "plain"}, n_layers=3), 16).forward_flops_per_token
    assert flops[-1] - flops[0] == pytest.approx(3 * block, rel=0.02)  # 3 extra full steps of one layer


def test_selected_tokens_attend_over_all_keys():
    """A gathered token's attention sees unselected earlier tokens: changing one changes its update."""
    itt = model({"name": "itt", "layers": [1], "ratios": [0.5, 0.5, 0.5]}).eval()
    base = itt(IDX, IDX).logits
    itt.depth.set_ratios([0, 0, 0])
    assert not torch.allclose(base, itt(IDX, IDX).logits)  # the extra steps change the output


@pytest.mark.parametrize("kv", ["stale", "recompute"])
def test_threshold_selection_is_causal_and_kv_cache_generation_matches_recompute(kv):
    itt = model({"name": "itt", "selection": "threshold", "thresholds": [0.5, 0.5, 0.5], "kv": kv}).eval()
    for th in itt.depth.thinking.values():
        for router in th.routers:
            torch.nn.init.normal_(router.weight, 0.0, 5.0)  # spread the scores: some tokens in, some out
    itt(IDX, IDX)
    assert all(0 < f < 1 for th in itt.depth.thinking.values() for f in th.last_fraction_S)
    changed = IDX.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 97
    torch.testing.assert_close(itt(IDX, IDX).logits[:, :10], itt(changed, changed).logits[:, :10])
    prompt = IDX[:2, :5]
    generated = itt.generate(prompt, 8, temperature=0)
    seq = prompt
    for _ in range(8):
        seq = torch.cat([seq, itt(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, seq)


def test_stale_and_recompute_keys_differ_only_with_partial_selection():
    stale = model({"name": "itt", "kv": "stale"})
    recompute = same_blocks(model({"name": "itt", "kv": "recompute"}), stale)
    assert not torch.allclose(stale(IDX, IDX).logits, recompute(IDX, IDX).logits)
    for m in (stale, recompute):
        m.depth.set_ratios([1, 1, 1])
    torch.testing.assert_close(stale(IDX, IDX).logits, recompute(IDX, IDX).logits)


def test_top_ratio_training_calibrates_the_causal_threshold():
    itt = model({"name": "itt", "threshold_momentum": 0.0}).train()
    itt(IDX, IDX)  # momentum 0: the threshold is this batch's mean 70th-percentile router score
    th = itt.depth.thinking["1"]
    assert "depth.thinking.1.threshold_S" in itt.state_dict()  # saved with checkpoints, used by generation
    itt.depth.selection = "threshold"
    itt.eval()(IDX, IDX)
    assert abs(th.last_fraction_S[0] - 0.7) < 0.2  # step 2 of the first ITT layer sees the same scores


def test_ablation_switches_change_the_model():
    outputs = {}
    for name, options in {
        "full": {},
        "no_rtc": {"rtc": False},
        "no_tse": {"tse": "none"},
        "no_atr": {"routing": False},
    }.items():
        m = model({"name": "itt", "step_init": 0.5, **options})
        out = m(IDX, IDX)
        assert torch.isfinite(out.loss)
        outputs[name] = out.logits
    assert model({"name": "itt", "tse": "none"}).depth.thinking["1"].phi_SD is None
    assert model({"name": "itt", "routing": False}).depth.thinking["1"].routers is None
    for name in ("no_rtc", "no_tse", "no_atr"):
        assert not torch.allclose(outputs[name], outputs["full"])


def test_bad_options_fail_with_the_key_and_allowed_values():
    with pytest.raises(ConfigError, match=r"model.depth.ratios=\[0.7\] needs 3 values in \[0, 1\]"):
        model({"name": "itt", "ratios": [0.7]})
    with pytest.raises(ConfigError, match=r"model.depth.layers=\[1, 7\] holds \[7\]"):
        model({"name": "itt", "layers": [1, 7]})
    with pytest.raises(ConfigError, match="ratios"):
        model({"name": "itt"}).depth.set_ratios([0.5, 1.5, 0.5])

    class NoProjections(torch.nn.Module):
        def __init__(self, d_model, n_heads, layer_idx, shared):
            super().__init__()

    ATTENTION.register("noproj_test")(NoProjections)
    with pytest.raises(ConfigError, match="model.attention.name=mha"):
        model({"name": "itt"}, attention={"name": "noproj_test"})
