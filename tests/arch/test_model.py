"""The dense LM: shapes, loss, KV-cache generation, GQA, init, registry plumbing."""

import math

import pytest
import torch

from arch.layers import apply_rope
from arch.model import LanguageModel
from arch.registry import ATTENTION, FFN, ConfigError
from training.config_schema import ModelConfig


def tiny_model(**overrides) -> LanguageModel:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, **overrides)
    return LanguageModel(cfg)


def test_forward_shapes_and_initial_loss_near_uniform():
    model = tiny_model(tie_embeddings=False)
    idx = torch.randint(0, 97, (3, 16))
    out = model(idx, torch.randint(0, 97, (3, 16)))
    assert out.logits.shape == (3, 16, 97)
    assert out.aux_losses == {} and out.metrics == {}
    # Small init → near-uniform predictions: loss ≈ ln(V).
    assert abs(out.loss.item() - math.log(97)) < 0.1
    assert torch.equal(out.loss, out.lm_loss)


def test_ignore_index_targets_are_not_scored():
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 8))
    targets = idx.clone()
    targets[:, :4] = -100
    full = model(idx, idx).lm_loss
    part = model(idx, targets).lm_loss
    assert not torch.isclose(full, part)
    targets[:, :] = -100
    targets[0, 5] = idx[0, 5]
    logits = model(idx).logits  # every position without targets, as in other causal-LM libraries
    assert logits.shape == (2, 8, 97)
    last = model(idx, last_position_only=True).logits  # the generation path
    assert last.shape == (2, 1, 97)
    torch.testing.assert_close(last, logits[:, -1:])
    with pytest.raises(ValueError, match="computes no loss"):
        model(idx, targets, last_position_only=True)


def test_kv_cache_generation_matches_full_recompute():
    model = tiny_model().eval()
    prompt = torch.randint(0, 97, (2, 5))
    generated = model.generate(prompt, max_new_tokens=8, temperature=0)
    seq = prompt
    for _ in range(8):
        logits = model(seq).logits
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, seq)


def test_generation_respects_top_k_and_length_limit():
    model = tiny_model().eval()
    gen = torch.Generator().manual_seed(0)
    out = model.generate(
        torch.zeros(1, 3, dtype=torch.long), max_new_tokens=10, temperature=1.0, top_k=1, generator=gen
    )
    greedy = model.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=10, temperature=0)
    assert torch.equal(out, greedy)  # top_k=1 sampling is greedy
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(torch.zeros(1, 60, dtype=torch.long), max_new_tokens=10)


def test_gqa_and_mqa_run_and_have_fewer_kv_parameters():
    mha = tiny_model()
    gqa = tiny_model(attention={"name": "mha", "n_kv_heads": 2})
    mqa = tiny_model(attention={"name": "mha", "n_kv_heads": 1})
    assert mha.num_parameters() > gqa.num_parameters() > mqa.num_parameters()
    idx = torch.randint(0, 97, (2, 12))
    for model in (gqa, mqa):
        assert torch.isfinite(model(idx, idx).loss)
        assert torch.equal(model.generate(idx[:, :4], 4, temperature=0)[:, :4], idx[:, :4])


def test_causality_future_tokens_do_not_change_past_logits():
    model = tiny_model(tie_embeddings=False)
    idx = torch.randint(0, 97, (1, 10))
    changed = idx.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % 97
    a = model(idx, idx).logits
    b = model(changed, changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_residual_projections_have_scaled_init():
    model = tiny_model()
    block = model.depth.blocks[0]
    std_q = block.attn.wq.weight.std().item()
    std_o = block.attn.wo.weight.std().item()
    assert std_q == pytest.approx(0.02, rel=0.15)
    assert std_o == pytest.approx(0.02 / math.sqrt(2 * 2), rel=0.15)


def test_tied_embeddings_share_storage():
    model = tiny_model(tie_embeddings=True)
    assert model.lm_head.weight is model.embed.weight
    untied = tiny_model(tie_embeddings=False)
    assert untied.num_parameters() == model.num_parameters() + 97 * 32


def test_rope_preserves_norm_and_relative_position():
    torch.manual_seed(0)
    from arch.layers import RotaryEmbedding

    rope = RotaryEmbedding(8, 32)
    q = torch.randn(1, 1, 1, 8)
    k = torch.randn(1, 1, 1, 8)
    cos, sin = rope(torch.arange(32))

    def rotated(x, pos):
        return apply_rope(x, cos[pos : pos + 1], sin[pos : pos + 1])

    assert torch.allclose(rotated(q, 5).norm(), q.norm(), atol=1e-5)
    score_a = (rotated(q, 7) * rotated(k, 3)).sum()
    score_b = (rotated(q, 20) * rotated(k, 16)).sum()
    assert torch.allclose(score_a, score_b, atol=1e-5)


def test_aux_losses_from_blocks_reach_the_loss():
    """A block that adds an aux loss through the context changes the loss without trainer changes."""
    from arch.ffn.mlp import SwiGLUMLP

    class PenalisedMLP(SwiGLUMLP):
        def forward(self, x, ctx):
            y = super().forward(x, ctx)
            ctx.add_aux_loss("penalty", 0.5 * y.pow(2).mean())
            ctx.add_metric("mean_abs", y.abs().mean())
            return y

    FFN.register("penalised_test")(PenalisedMLP)
    model = tiny_model(ffn={"name": "penalised_test"})
    idx = torch.randint(0, 97, (2, 8))
    out = model(idx, idx)
    assert set(out.aux_losses) == {"penalty"} and set(out.metrics) == {"mean_abs"}
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_losses["penalty"])


def test_registry_lists_names_and_rejects_unknown_options():
    assert "mha" in ATTENTION.names() and "swiglu" in FFN.names()
    with pytest.raises(ConfigError, match=r"registered attention blocks: \[.*'mha'"):
        ATTENTION.get("flash9")
    with pytest.raises(ConfigError, match=r"has no option 'kv_heads'.*n_kv_heads"):
        ATTENTION.validate_options("mha", {"kv_heads": 2}, "model.attention")
    with pytest.raises(
        ConfigError,
        match=r"model.attention.backend='cuda' is invalid; expected one of \['auto', 'sdpa', 'triton', 'flash_attn', "
        r"'reference'\]",
    ):
        ATTENTION.validate_options("mha", {"backend": "cuda"}, "model.attention")
    with pytest.raises(ConfigError, match="expected a value of type int"):
        FFN.validate_options("swiglu", {"hidden_dim": "wide"}, "model.ffn")


def test_every_block_yaml_matches_its_constructor():
    """conf/model/<group>/<name>.yaml keys, as Hydra composes them (a variant inherits its parent through
    its defaults list), are exactly the class's keyword-only constructor args."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from arch.registry import REGISTRIES
    from training.cli import compose

    conf = Path(__file__).resolve().parents[2] / "conf" / "model"
    for group, registry in REGISTRIES.items():
        files = sorted((conf / group).glob("*.yaml"))
        assert {f.stem for f in files} >= {n for n in registry.names() if not n.endswith("_test")}
        for f in files:
            node = OmegaConf.to_container(compose([f"model/{group}={f.stem}"]).model[group])
            assert node["name"] == f.stem
            assert set(node) - {"name"} == set(registry.options(f.stem)), f


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_attention_backends_agree_inside_the_model(backend, n_kv_heads):
    """The model's attention through the Triton kernel (interpreter on CPU) equals the SDPA path."""
    torch.manual_seed(0)
    sdpa = tiny_model(attention={"name": "mha", "n_kv_heads": n_kv_heads, "backend": "sdpa"})
    other = tiny_model(attention={"name": "mha", "n_kv_heads": n_kv_heads, "backend": backend})
    other.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, 97, (2, 9))
    a, b = sdpa(idx, idx), other(idx, idx)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-4)
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(other.embed.weight.grad, sdpa.embed.weight.grad, rtol=1e-3, atol=1e-5)
    prompt = idx[:, :4]
    assert torch.equal(other.generate(prompt, 3, temperature=0), sdpa.generate(prompt, 3, temperature=0))
