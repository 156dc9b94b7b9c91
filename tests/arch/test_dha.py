"""Decoupled-Head Attention: maps, validation, KV-cache contents and bytes, generation, training."""

import pytest
import torch

from arch.attention.dha import DecoupledHeadAttention, contiguous_map, kv_bytes_per_token
from arch.layers import KVCache
from arch.model import LanguageModel
from arch.registry import ConfigError
from tests.helpers import tiny_config
from training.config import validate
from training.config_schema import ModelConfig
from training.metrics import read_metrics
from training.trainer import train

# 3 layers × 4 query heads; counts differ between K and V and between layers; maps not contiguous.
DHA = {
    "name": "dha",
    "k_heads": [1, 3, None],
    "v_heads": [2, 1, 4],
    "k_maps": [None, [2, 0, 1, 0], None],
    "v_maps": [[1, 0, 0, 1], None, [3, 2, 1, 0]],
    "backend": "sdpa",
}


def tiny(attention, n_layers=3) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(
        ModelConfig(vocab_size=97, d_model=32, n_layers=n_layers, n_heads=4, max_seq_len=64, attention=attention)
    )


def test_maps_counts_and_defaults_per_layer():
    layers = [b.attn for b in tiny(DHA).depth.blocks]
    assert [(a.n_k_heads, a.n_v_heads) for a in layers] == [(1, 2), (3, 1), (4, 4)]
    assert layers[0].k_head_H.tolist() == [0, 0, 0, 0] and layers[1].k_head_H.tolist() == [2, 0, 1, 0]
    assert layers[0].v_head_H.tolist() == [1, 0, 0, 1] and layers[2].v_head_H.tolist() == [3, 2, 1, 0]
    assert contiguous_map(4, 3) == [0, 0, 1, 2] and contiguous_map(8, 2) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert layers[1].wkv.weight.shape == ((3 + 1) * 8, 32)  # only the shared heads are projected


def test_dha_equals_mha_with_explicitly_copied_heads():
    """Query head h reading K head k_map[h] and V head v_map[h] == MHA whose head h has those weights."""
    dha = tiny(DHA)
    mha = tiny({"name": "mha", "backend": "sdpa"})
    state = dha.state_dict()
    for i, block in enumerate(dha.depth.blocks):
        a = block.attn
        w_GdD = a.wkv.weight.view(-1, 8, 32)
        k_HdD, v_HdD = w_GdD[: a.n_k_heads][a.k_head_H], w_GdD[a.n_k_heads :][a.v_head_H]
        state[f"depth.blocks.{i}.attn.wkv.weight"] = torch.cat([k_HdD, v_HdD]).flatten(0, 1)
    mha.load_state_dict(state)
    idx = torch.randint(0, 97, (2, 11))
    torch.testing.assert_close(dha(idx, idx).logits, mha(idx, idx).logits, rtol=1e-5, atol=1e-5)


def test_triton_path_takes_the_maps_without_expansion():
    """The same model through the Triton kernel (interpreter on CPU) equals the SDPA path."""
    sdpa, triton = tiny(DHA, n_layers=3), tiny({**DHA, "backend": "triton"}, n_layers=3)
    triton.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, 97, (1, 7))
    torch.testing.assert_close(triton(idx, idx).logits, sdpa(idx, idx).logits, rtol=1e-4, atol=1e-4)


def test_generation_with_cache_equals_generation_without_and_caches_only_shared_heads():
    model = tiny(DHA).eval()
    prompt = torch.randint(0, 97, (2, 5))
    cached = model.generate(prompt, 8, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(8):  # no cache: recompute the whole sequence every step
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, seq)
    cache = KVCache(2, 16)
    with torch.no_grad():
        model(prompt, kv_cache=cache)
    assert [(k.shape[2], v.shape[2]) for k, v in zip(cache.k, cache.v)] == [(1, 2), (3, 1), (4, 4)]


def test_kv_bytes_per_token_per_layer_and_total_match_the_cache():
    model = tiny(DHA)
    report = kv_bytes_per_token(model, bytes_per_element=4)
    assert report["per_layer"] == [(1 + 2) * 8 * 4, (3 + 1) * 8 * 4, (4 + 4) * 8 * 4]
    assert report["total"] == sum(report["per_layer"])
    cache = KVCache(1, 4)
    with torch.no_grad():
        model(torch.zeros(1, 2, dtype=torch.long), kv_cache=cache)
    assert cache.bytes_per_token() == report["total"]  # fp32 cache on CPU
    mha = kv_bytes_per_token(tiny({"name": "mha", "n_kv_heads": 2}))
    assert mha == {"per_layer": [2 * 2 * 8 * 2] * 3, "total": 3 * 2 * 2 * 8 * 2}


@pytest.mark.parametrize(
    "options, match",
    [
        ({"k_heads": [1, 5, 1]}, r"k_heads\[1\]=5 must be an integer in \[1, n_heads=4\]"),
        ({"v_heads": [1, 2]}, r"v_heads=\[1, 2\] must be .* one entry per layer \(3 layers\)"),
        (
            {"k_heads": 2, "k_maps": [[0, 0, 0, 0], None, None]},
            r"k_maps\[0\]=\[0, 0, 0, 0\] never uses shared heads \[1\]",
        ),
        ({"v_heads": 2, "v_maps": [[0, 2, 1, 0], None, None]}, r"v_maps\[0\]=.* values outside \[0, 2\)"),
        ({"k_maps": [[0, 1], None, None]}, r"k_maps\[0\]=\[0, 1\] must be a list of 4 integers"),
    ],
)
def test_bad_options_name_the_key(options, match):
    with pytest.raises(ConfigError, match=match):
        tiny({"name": "dha", **options})


def test_yaml_composes_and_validates(tmp_path):
    root = validate(
        tiny_config(tmp_path, "model/attention=dha", "model.attention.k_heads=[1,2]", "model.attention.v_heads=2")
    )
    assert root.model.attention["k_heads"] == [1, 2] and root.model.attention["v_heads"] == 2
    assert DecoupledHeadAttention(32, 2, 1, None, k_heads=[1, 2]).n_k_heads == 2


def test_dha_model_trains(tmp_path):
    run = tmp_path / "dha"
    train(
        tiny_config(
            run,
            "model/attention=dha",
            "model.n_heads=4",
            "model.attention.k_heads=[1,2]",
            "model.attention.v_heads=[3,1]",
            "model.attention.k_maps=[[0,0,0,0],[1,0,0,1]]",
            "trainer.max_steps=40",
            "trainer.eval_every=20",
            "optim.lr=1e-2",
            "trainer.sample_tokens=0",
        )
    )
    evals = [r["val_loss"] for r in read_metrics(run) if "val_loss" in r]
    assert evals[-1] < evals[0] - 1.0
