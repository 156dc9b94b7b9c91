"""Parameter, FLOP and KV-cache accounting against hand-computed values on tiny configs.

Every expected number is written out as arithmetic from the config, independently of the code.
Shared shapes: D = 32, vocab V = 100 (tied), T = 16, two layers unless stated; H = 2 heads of
d = 16 (four of d = 8 where stated, same H·d). Dense SwiGLU width F = 96 (8/3·32 rounded up to 32).
"""

import time
from types import SimpleNamespace

import pytest
import torch

from arch.depth.loop import expected_iterations
from arch.layers import ElasticSetting, KVCache
from arch.model import LanguageModel
from training.accounting.account import account, account_config, format_accounting, main
from training.cli import compose
from training.config_schema import ModelConfig

D, V, T = 32, 100, 16
ATTN = D * D + D * 2 * D + D * D  # wq, wkv, wo = 4096
MLP = D * 2 * 96 + 96 * D  # w_gate_up, w_down = 9216
NORMS = 2 * D  # attn_norm, ffn_norm
LAYER = ATTN + MLP + NORMS  # 13376
OUTSIDE = V * D + D  # tied embedding/LM head + final norm = 3232
SCORES = 2 * 2 * 32 * (T + 1) / 2  # QKᵀ + PV, H·d = 32: 1088
LAYER_FLOPS = 2 * (ATTN + MLP) + SCORES  # 27712
HEAD_FLOPS = 2 * D * V  # 6400
KV_LAYER = 2 * 32 * 2  # K and V, H·d = 32 each, bf16: 128 bytes


pytestmark = pytest.mark.usefixtures("one_thread")


def config(**overrides) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=V, d_model=D, n_layers=2, n_heads=2, max_seq_len=64), **overrides})


def build(**overrides) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(config(**overrides))


def test_dense():
    acc = account(build(), T)
    assert acc.total_params == 2 * LAYER + OUTSIDE == 29984
    assert acc.embedding_params == V * D
    assert acc.active_params == acc.total_params  # dense: a token reads every parameter
    assert acc.active_non_embedding_params == 2 * LAYER + D
    assert acc.attention_flops_per_token == 2 * SCORES == 2176
    assert acc.forward_flops_per_token == 2 * LAYER_FLOPS + HEAD_FLOPS == 61824
    assert acc.train_flops_per_token == 3 * 61824
    assert acc.kv_cache_bytes_per_token == 2 * KV_LAYER == 256
    assert acc.mode == "train" and acc.elastic == "full model" and not acc.notes
    untied = account(build(tie_embeddings=False), T)  # a separate V×D LM head
    assert untied.total_params == untied.active_params == 29984 + V * D
    assert (
        untied.embedding_params == 2 * V * D and untied.active_non_embedding_params == acc.active_non_embedding_params
    )


MOE = {"name": "moe", "n_experts": 4, "top_k": 2, "expert_hidden": 16, "n_shared_experts": 1}
EXPERT = 3 * D * 16  # one routed expert: D×2F in, F×D out = 1536
MOE_FIXED = D * 4 + EXPERT  # router D×E + one shared expert of the same width


def test_moe_counts_router_shared_and_k_experts():
    acc = account(build(ffn=MOE), T)
    assert acc.total_params == 2 * (ATTN + MOE_FIXED + 4 * EXPERT + NORMS) + OUTSIDE == 27168
    assert acc.active_params == 2 * (ATTN + MOE_FIXED + 2 * EXPERT + NORMS) + OUTSIDE == 21024
    ffn_flops = 2 * MOE_FIXED + 2 * 2 * EXPERT
    assert acc.forward_flops_per_token == 2 * (2 * ATTN + SCORES + ffn_flops) + HEAD_FLOPS == 43904
    assert (
        account(build(ffn={**MOE, "name": "emoe", "coactivation_prob": 0.5, "k_ideal": 4}), T).to_dict()
        == acc.to_dict()
    )


def test_moe_eval_top_k_and_elastic_sub_networks():
    model = build(ffn={**MOE, "eval_top_k": 3})
    assert account(model.eval(), T).active_params == 2 * (ATTN + MOE_FIXED + 3 * EXPERT + NORMS) + OUTSIDE
    model.train()
    top1 = account(model, T, ElasticSetting(top_k=1))
    assert top1.active_params == 2 * (ATTN + MOE_FIXED + 1 * EXPERT + NORMS) + OUTSIDE
    assert top1.forward_flops_per_token == 2 * (2 * ATTN + SCORES + 2 * MOE_FIXED + 2 * 1 * EXPERT) + HEAD_FLOPS
    assert top1.total_params == 27168  # top-k alone stores every expert
    # layer 0 only, 3 of 4 experts routable, top-2: layer 1 and the masked expert are not stored
    sub = account(model, T, ElasticSetting(active_layers=(0,), expert_mask_E=torch.tensor([1, 1, 1, 0]).bool()))
    assert sub.total_params == (ATTN + MOE_FIXED + 3 * EXPERT + NORMS) + OUTSIDE
    assert sub.active_params == (ATTN + MOE_FIXED + 2 * EXPERT + NORMS) + OUTSIDE
    assert sub.forward_flops_per_token == (2 * ATTN + SCORES + 2 * MOE_FIXED + 2 * 2 * EXPERT) + HEAD_FLOPS
    assert sub.kv_cache_bytes_per_token == KV_LAYER
    # k larger than the subset: every routable expert, no more
    one = account(model, T, ElasticSetting(expert_mask_E=torch.tensor([1, 0, 0, 0]).bool()))
    assert one.active_params == one.total_params == 2 * (ATTN + MOE_FIXED + EXPERT + NORMS) + OUTSIDE
    assert "top-k 1" in top1.elastic and "experts 1/4" in one.elastic


def test_expert_banks_sharded_over_ranks_are_counted_whole():
    model = build(ffn=MOE)
    full = account(model, T)
    for block in model.depth.blocks:  # what expert parallelism over 2 ranks leaves on one rank
        for name in block.ffn.expert_parallel_params():
            setattr(block.ffn, name, torch.nn.Parameter(getattr(block.ffn, name)[:2].detach()))
        block.ffn.expert_shard = SimpleNamespace(size=2)
    assert account(model, T).to_dict() == full.to_dict()


def test_multi_head_moe_counts_sub_token_routing():
    acc = account(build(ffn={"name": "mhmoe", "n_heads": 2, "n_experts": 4, "top_k": 1, "expert_hidden": 16}), T)
    projections = 2 * (D * D + D)  # W_mh and W_merge with biases
    sub_expert = 3 * (D // 2) * 16  # experts on width D/h = 16: 768
    router = (D // 2) * 4
    assert acc.total_params == 2 * (ATTN + projections + router + 4 * sub_expert + NORMS) + OUTSIDE
    # two sub-tokens × k = 1: at most two distinct experts per token
    assert acc.active_params == 2 * (ATTN + projections + router + 2 * sub_expert + NORMS) + OUTSIDE
    ffn_flops = 2 * 2 * D * D + 2 * (2 * router) + 2 * 1 * 2 * sub_expert
    assert acc.forward_flops_per_token == 2 * (2 * ATTN + SCORES + ffn_flops) + HEAD_FLOPS == 39808


def test_universal_experts_pool_is_stored_once_and_routed_per_layer():
    moue = {"name": "moue", "n_universal": 4, "window_size": 2, "top_k": 1, "expert_hidden": 16, "trajectory_dim": 4}
    acc = account(build(ffn=moue), T)
    pool = 4 * EXPERT + 4 * 4  # 4 experts + their 4-dim trajectory embeddings, shared by both layers
    router = (D + 4) * 4  # per-layer router over [x ; z]
    assert acc.total_params == 2 * (ATTN + router + NORMS) + pool + OUTSIDE == 18000
    # one expert per layer (weights + its embedding), two layers
    assert acc.active_params == 2 * (ATTN + router + NORMS) + 2 * (EXPERT + 4) + OUTSIDE == 14920
    ffn_flops = 2 * router + 1 * 2 * EXPERT + 2 * 1 * 4  # router, one expert, trajectory EMA
    assert acc.forward_flops_per_token == 2 * (2 * ATTN + SCORES + ffn_flops) + HEAD_FLOPS == 31696
    shared = account(build(ffn={**moue, "router_sharing": "shared"}), T)
    assert shared.total_params == 2 * (ATTN + NORMS) + pool + router + OUTSIDE  # one router for all layers
    assert shared.active_params == 2 * (ATTN + NORMS) + router + 2 * (EXPERT + 4) + OUTSIDE
    assert shared.forward_flops_per_token == acc.forward_flops_per_token
    with pytest.raises(ValueError, match="expert subsets"):
        account(build(ffn=moue), T, ElasticSetting(expert_mask_E=torch.ones(4, dtype=torch.bool)))


def test_mohd_groups_count_active_groups_only():
    mohd = dict(n_groups=4, n_active=2, n_shared=1, fusion="blockdiag")
    acc = account(build(attention={"name": "mohd_mha", **mohd}, ffn={"name": "mohd", "hidden_dim": 64, **mohd}), T)
    # attention: router D×G, MHA projections, block-diagonal fusion of 4 blocks of (D/G)² = 8²
    attn_total, attn_active = D * 4 + ATTN + 4 * 8 * 8, D * 4 + ATTN * 2 / 4 + 2 * 8 * 8
    # FFN (scope ffn, F = 64 in 4 groups of 16): router, W_in D×2F, W_out F×D, fusion 4 blocks of 16²
    ffn_total, ffn_active = D * 4 + 3 * D * 64 + 4 * 16 * 16, D * 4 + 3 * D * 64 * 2 / 4 + 2 * 16 * 16
    assert acc.total_params == 2 * (attn_total + ffn_total + NORMS) + OUTSIDE == 26912
    assert acc.active_params == 2 * (attn_active + ffn_active + NORMS) + OUTSIDE == 15392
    attn_flops = 2 * D * 4 + 2 * ATTN * 2 / 4 + 2 * 2 * 8 * 8 + SCORES
    ffn_flops = 2 * D * 4 + 2 * 3 * D * 64 * 2 / 4 + 2 * 2 * 16 * 16
    assert acc.forward_flops_per_token == 2 * (attn_flops + ffn_flops) + HEAD_FLOPS == 32640
    assert acc.kv_cache_bytes_per_token == 2 * KV_LAYER  # every head is projected and cached


def measured_kv_bytes(model: LanguageModel) -> int:
    """Bytes per token of a real (fp32) KV cache after a prefill."""
    cache = KVCache(1, 8)
    with torch.no_grad():
        model.eval()(torch.zeros(1, 8, dtype=torch.long), kv_cache=cache)
    return cache.bytes_per_token()


def test_kv_cache_mha_gqa_and_dha_with_a_fused_map():
    # four heads of d = 8; layer 0: 2 key heads on a non-contiguous (fused) map and 1 value head; layer 1: 1 and 2
    dha = {"name": "dha", "k_heads": [2, 1], "v_heads": [1, 2], "k_maps": [[0, 1, 1, 0], None]}
    model = build(n_heads=4, attention=dha)
    acc = account(model, T)
    assert acc.kv_cache_bytes_per_token == (2 + 1) * 8 * 2 + (1 + 2) * 8 * 2 == 96
    assert acc.total_params == 2 * (D * D + D * 3 * 8 + D * D + MLP + NORMS) + OUTSIDE
    assert acc.attention_flops_per_token == 2 * SCORES  # every query head still attends
    assert account(build(n_heads=4), T).kv_cache_bytes_per_token == 2 * (2 * 4 * 8 * 2) == 256
    assert account(build(n_heads=4, attention={"name": "mha", "n_kv_heads": 1}), T).kv_cache_bytes_per_token == 2 * (
        2 * 8 * 2
    )
    assert account(model, T, dtype_bytes=4).kv_cache_bytes_per_token == measured_kv_bytes(model)


def test_loop_counts_flops_per_repeat_and_parameters_once():
    model = build(depth={"name": "loop", "looped_layers": [1], "repeats": 4})  # order 0, 1, 1, 1, 1
    acc = account(model, T)
    assert acc.total_params == acc.active_params == 2 * LAYER + OUTSIDE
    assert acc.forward_flops_per_token == (1 + 4) * LAYER_FLOPS + HEAD_FLOPS == 144960
    assert acc.kv_cache_bytes_per_token == (1 + 4) * KV_LAYER
    assert account(model, T, dtype_bytes=4).kv_cache_bytes_per_token == measured_kv_bytes(model)
    moe_loop = account(build(ffn=MOE, depth={"name": "loop", "looped_layers": [1], "repeats": 4}), T)
    # the looped MoE layer may pick other experts at each repeat: k per call, capped at its 4 experts
    assert (
        moe_loop.active_params
        == (ATTN + MOE_FIXED + 2 * EXPERT + NORMS) + (ATTN + MOE_FIXED + 4 * EXPERT + NORMS) + OUTSIDE
    )


RECURRENT = {
    "name": "recurrent",
    "prelude_layers": 1,
    "core_layers": 1,
    "coda_layers": 1,
    "mean_recurrence": 4,
    "mean_backprop_depth": 2,
    "sampler": "fixed",
}
ADAPTER = 2 * D * D  # Linear(2D → D), no bias


def test_recurrent_no_grad_iterations_cost_forward_only():
    model = build(n_layers=3, depth=RECURRENT)
    acc = account(model, T)
    assert acc.total_params == acc.active_params == 3 * LAYER + ADAPTER + D + OUTSIDE == 45440  # + out_norm
    core = LAYER_FLOPS + 2 * ADAPTER
    assert acc.forward_flops_per_token == 2 * LAYER_FLOPS + 4 * core + HEAD_FLOPS == 189056
    # r = 4: the first 2 iterations run under no_grad (1×), the last 2 with gradients (3×)
    assert acc.train_flops_per_token == 3 * (2 * LAYER_FLOPS + HEAD_FLOPS) + 3 * 2 * core + 1 * 2 * core == 439936
    assert acc.kv_cache_bytes_per_token == (2 + 4) * KV_LAYER
    model.eval()
    model.depth.set_iterations(6)
    evaluated = account(model, T)
    assert evaluated.forward_flops_per_token == 2 * LAYER_FLOPS + 6 * core + HEAD_FLOPS
    assert evaluated.kv_cache_bytes_per_token == (2 + 6) * KV_LAYER
    assert account(model, T, dtype_bytes=4).kv_cache_bytes_per_token == measured_kv_bytes(model)


def test_expected_iterations_of_the_lognormal_poisson_sampler_match_its_draws():
    frozen, with_grad = expected_iterations(4, 2, 0.5, "lognormal_poisson")
    assert frozen + with_grad == pytest.approx(4 + 1, abs=1e-6)  # E[Poisson(τ) + 1] = E[τ] + 1 = r̄ + 1
    depth = build(n_layers=3, depth={**RECURRENT, "sampler": "lognormal_poisson"}).depth
    draws = []
    for step in range(4000):
        depth.after_optimizer_step(step)
        draws.append(depth.sample_iterations())
    assert sum(f for f, _ in draws) / len(draws) == pytest.approx(frozen, abs=0.15)
    assert sum(g for _, g in draws) / len(draws) == pytest.approx(with_grad, abs=0.05)
    assert expected_iterations(4, 2, 0.5, "fixed") == (2, 2)


ITT = {"name": "itt", "layers": [1], "steps": 4, "ratios": [0.5, 0.25, 1.0]}
THINKING = 4 * D + 3 * (D + 1)  # step scales φ (steps × D) + three Linear(D, 1) routers


def test_itt_counts_selected_tokens_per_step():
    model = build(depth=ITT)
    acc = account(model, T)
    assert acc.total_params == acc.active_params == 2 * LAYER + THINKING + OUTSIDE
    routers = 3 * 2 * D
    assert (
        acc.forward_flops_per_token
        == LAYER_FLOPS + (1 + 0.5 + 0.25 + 1.0) * LAYER_FLOPS + routers + HEAD_FLOPS
        == 110512
    )
    assert acc.kv_cache_bytes_per_token == KV_LAYER + 4 * KV_LAYER  # every step keeps a cache slot
    # kv=recompute: each partial step (ρ = 0.5, 0.25) runs wq (D×D) and wkv (D×2D) on every token again
    recompute = account(build(depth={**ITT, "kv": "recompute"}), T)
    assert recompute.forward_flops_per_token == acc.forward_flops_per_token + 2 * (2 * D * D + 2 * D * 2 * D)
    # top-ρ keeps round(ρ·T) tokens: 0.7 · 16 = 11.2 → 11
    model.depth.set_ratios([0.7, 0.7, 0.7])
    rounded = account(model, T)
    assert rounded.forward_flops_per_token == LAYER_FLOPS + (1 + 3 * 11 / 16) * LAYER_FLOPS + routers + HEAD_FLOPS
    model(torch.zeros(2, T, dtype=torch.long))
    assert model.depth.thinking["1"].last_fraction_S == [11 / 16] * 3


def test_sgt_loops_the_kept_heads_of_selected_layers():
    model = build(n_layers=3, n_heads=4, depth={"name": "sgt", "exclude_layers": [0], "top_k_layers": 2})
    base = 3 * LAYER_FLOPS + HEAD_FLOPS
    assert account(model, T).forward_flops_per_token == base
    model.depth.loop_depth[2] = 1
    model.depth.kept_LH[2, :2] = True
    # 2 kept heads of d = 8: q and o rows 2·8, k and v rows 2·2·8; scores over 2 heads
    pass_flops = 2 * D * 16 + 2 * D * 32 + 2 * 16 * D + 2 * 2 * 16 * (T + 1) / 2
    acc = account(model, T)
    assert acc.forward_flops_per_token == base + pass_flops == base + 4640
    assert acc.kv_cache_bytes_per_token == 3 * KV_LAYER + 2 * 16 * 2
    assert acc.total_params == acc.active_params == 3 * LAYER + OUTSIDE  # SGT adds no parameters
    assert account(model, T, dtype_bytes=4).kv_cache_bytes_per_token == measured_kv_bytes(model)
    model.train()
    model.depth.decay_windows[2] = (0, 10)  # decay window open in training: every head runs
    assert account(model, T).forward_flops_per_token == base + 2 * ATTN + SCORES
    block = build(
        n_layers=3, n_heads=4, depth={"name": "sgt", "exclude_layers": [0], "top_k_layers": 2, "loop_mode": "block"}
    )
    block.depth.loop_depth[2] = 1
    assert account(block, T).forward_flops_per_token == base + LAYER_FLOPS


CONFIGS = {
    "dense": {},
    "moe": {"ffn": MOE},
    "mhmoe": {"ffn": {"name": "mhmoe", "n_heads": 2, "n_experts": 4}},
    "moue": {"ffn": {"name": "moue", "n_universal": 4, "window_size": 2}},
    "mohd": {"attention": {"name": "mohd_mha", "n_groups": 4, "n_active": 2, "n_shared": 1}, "ffn": {"name": "mohd"}},
    "dha": {"attention": {"name": "dha", "k_heads": 1, "v_heads": 2}},
    "loop": {"depth": {"name": "loop"}},
    "recurrent": {"n_layers": 3, "depth": RECURRENT},
    "itt": {"depth": ITT},
    "sgt": {"depth": {"name": "sgt", "exclude_layers": [0], "top_k_layers": 1}},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_meta_config_matches_the_real_model(name):
    """Block costs read shapes, never values: a model on the meta device costs exactly what the real one does.
    (Each block's FLOPs against torch's FlopCounterMode: tests/arch/test_cost.py.)"""
    real = account(build(**CONFIGS[name]), T)
    assert account_config(config(**CONFIGS[name]), T).to_dict() == real.to_dict()


def test_account_config_accepts_a_model_dict_and_a_composed_root():
    as_dict = account_config({"vocab_size": V, "d_model": D, "n_layers": 2, "n_heads": 2, "max_seq_len": 64}, T)
    assert as_dict.total_params == 29984
    with pytest.raises(ValueError, match="vocab_size"):
        account_config(compose(["model=dense_tiny"]), T)


def test_dense_124m_is_accounted_quickly_on_meta():
    cfg = compose(["model=dense_124m"])
    start = time.perf_counter()
    acc = account_config(cfg, 1024, vocab_size=50304)
    assert time.perf_counter() - start < 5
    d, f, layers = 768, 2048, 12  # SwiGLU width 8/3·768 = 2048
    layer = 4 * d * d + 3 * d * f + 2 * d
    assert acc.total_params == acc.active_params == layers * layer + 50304 * d + d == 123_587_328
    per_layer = 2 * (4 * d * d + 3 * d * f) + 2 * 2 * d * (1024 + 1) / 2
    assert acc.forward_flops_per_token == layers * per_layer + 2 * d * 50304
    assert acc.kv_cache_bytes_per_token == layers * 2 * d * 2


def test_command_line_prints_the_table(capsys):
    main(["model=moe_tiny", "model.ffn.top_k=4", "--top-k", "2"])
    out = capsys.readouterr().out
    assert "model: moe_tiny" in out and "sub-network: top-k 2" in out and "KV cache" in out
    acc = account_config(compose(["model=dense_tiny"]), 256, vocab_size=2048)
    assert format_accounting(acc).count("\n") == 3
    assert set(acc.to_dict()) >= {"total_params", "active_params", "train_flops_per_token", "kv_cache_bytes_per_token"}
