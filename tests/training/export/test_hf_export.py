"""Hugging Face export: trained dense → Llama and MoE → Mixtral give our logits; anything else is refused."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from arch.model import LanguageModel  # noqa: E402
from tests.helpers import tiny_config  # noqa: E402
from training.build import build_model  # noqa: E402
from training.config import validate  # noqa: E402
from training.config_schema import ModelConfig  # noqa: E402
from training.eval.loss import load_trained  # noqa: E402
from training.export.hf import UnsupportedArchitectureError, export_model, main  # noqa: E402
from training.trainer import train  # noqa: E402

TRAIN_BRIEFLY = [
    "trainer.max_steps=2",
    "trainer.eval_every=2",
    "trainer.checkpoint_every=2",
    "trainer.sample_tokens=0",
    "optim.lr=1e-2",
]


def ours_and_hf_logits(model, hf_dir, vocab_size: int, T: int):
    idx_BT = torch.randint(0, vocab_size, (2, T), generator=torch.Generator().manual_seed(0))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(idx_BT, idx_BT).logits, hf_model(idx_BT).logits, hf_model


@pytest.mark.parametrize(
    "ffn, hf_class", [([], "LlamaForCausalLM"), (["model/ffn=moe", "model.ffn.n_experts=4"], "MixtralForCausalLM")]
)
def test_trained_checkpoint_exports_with_equal_logits_and_tokenizer(tmp_path, ffn, hf_class):
    run, out = tmp_path / "run", tmp_path / "hf"
    train(tiny_config(run, *TRAIN_BRIEFLY, *ffn))
    assert main([str(run), str(out)]) == 0

    model, data, _, _ = load_trained(run, device="cpu")
    ours, theirs, hf_model = ours_and_hf_logits(model, out, model.cfg.vocab_size, T=model.cfg.max_seq_len)
    assert type(hf_model).__name__ == hf_class
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "ROMEO: héllo, wörld!\n"
    assert hf_tokenizer(text).input_ids == data.tokenizer.encode(text)
    assert hf_tokenizer.decode(data.tokenizer.encode(text)) == text
    assert hf_tokenizer.eos_token_id == data.tokenizer.eos_id == hf_model.config.eos_token_id


def randomized(model: LanguageModel) -> LanguageModel:
    """Every parameter far from its init (norm weights around 1 ± 0.3) so no layout mistake hides."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.3) if "norm" in name else p.normal_(0.0, 0.15)
    return model.eval()


CONVENTIONS = {
    "llama_gqa_bias_untied": dict(
        attention={"name": "mha", "n_kv_heads": 2, "bias": True},
        ffn={"name": "swiglu", "bias": True, "hidden_dim": 40},
        tie_embeddings=False,
    ),
    "llama_mqa_tied": dict(attention={"name": "mha", "n_kv_heads": 1}, ffn={"name": "swiglu"}, tie_embeddings=True),
    "mixtral_gqa_untied": dict(
        attention={"name": "mha", "n_kv_heads": 2},
        ffn={"name": "moe", "n_experts": 4, "top_k": 2},
        tie_embeddings=False,
    ),
    "mixtral_eval_top_k": dict(
        attention={"name": "mha"},
        ffn={"name": "emoe", "n_experts": 6, "top_k": 2, "eval_top_k": 3, "coactivation_prob": 0.5, "k_ideal": 4},
        tie_embeddings=True,
    ),
}


@pytest.mark.parametrize("case", sorted(CONVENTIONS))
def test_rope_norm_gqa_bias_tying_and_expert_layout_match_transformers(tmp_path, case):
    cfg = ModelConfig(
        vocab_size=97,
        d_model=32,
        n_layers=2,
        n_heads=4,
        max_seq_len=48,
        rope_theta=5e5,
        norm_eps=1e-6,
        **CONVENTIONS[case],
    )
    model = randomized(LanguageModel(cfg))
    export_model(model, tmp_path)
    ours, theirs, hf_model = ours_and_hf_logits(model, tmp_path, 97, T=48)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert hf_model.config.num_key_value_heads == CONVENTIONS[case]["attention"].get("n_kv_heads", 4)
    assert hf_model.config.tie_word_embeddings == cfg.tie_embeddings
    if "eval_top_k" in cfg.ffn:
        assert hf_model.config.num_experts_per_tok == 3  # what our eval-mode forward routes to


def test_bf16_export_is_stored_and_loaded_as_bf16(tmp_path):
    model = randomized(LanguageModel(ModelConfig(vocab_size=97, d_model=32, n_layers=1, n_heads=2, max_seq_len=16)))
    export_model(model, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    ours, theirs, hf_model = ours_and_hf_logits(model, tmp_path, 97, T=16)
    assert hf_model.dtype == torch.float32  # asked for fp32 on load; the weights went through bf16
    torch.testing.assert_close(theirs, ours, rtol=0.05, atol=0.05)


UNSUPPORTED = {
    "loop depth": (["model/depth=loop"], "model.depth.name='loop'"),
    "itt depth with moe": (["model/depth=itt", "model/ffn=moe"], "model.depth.name='itt'"),
    "sgt depth": (
        ["model/depth=sgt", "model.depth.top_k_layers=1", "model.depth.max_selected_layers=1"],
        "model.depth.name='sgt'",
    ),
    "moue": (["model/ffn=moue"], "model.ffn.name='moue'"),
    "mhmoe": (["model/ffn=mhmoe"], "model.ffn.name='mhmoe'"),
    "dha": (["model/attention=dha"], "model.attention.name='dha'"),
    "qk_norm": (["model.attention.qk_norm=true"], "model.attention.qk_norm=true"),
    "mohd": (["model/ffn=mohd"], "model.ffn.name='mohd'"),
    "sigmoid router": (["model/ffn=moe", "model.ffn.scoring=sigmoid"], "model.ffn.scoring='sigmoid'"),
    "no renormalisation": (["model/ffn=moe", "model.ffn.renormalize=false"], "model.ffn.renormalize=False"),
    "shared experts": (["model/ffn=moe", "model.ffn.n_shared_experts=1"], "model.ffn.n_shared_experts=1"),
    "cosine router": (["model/ffn=moe", "model.ffn.router=xmoe"], "model.ffn.router='xmoe'"),
    "capacity": (["model/ffn=moe", "model.ffn.capacity_factor=1.0"], "model.ffn.capacity_factor=1.0"),
    "moe with attention bias": (
        ["model/ffn=moe", "model.attention.bias=true"],
        "model.attention.bias=true with an MoE FFN",
    ),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_architecture_raises_naming_the_setting(tmp_path, case):
    overrides, message = UNSUPPORTED[case]
    model = build_model(validate(tiny_config(tmp_path / "unused", *overrides)), 257)
    with pytest.raises(UnsupportedArchitectureError, match="Supported: attention=mha") as err:
        export_model(model, tmp_path / "hf")
    assert message in str(err.value)
    assert not (tmp_path / "hf").exists()  # checked before anything is written


def test_expert_selection_bias_and_elastic_subnetworks_are_refused(tmp_path):
    from arch.layers import ElasticSetting

    model = build_model(validate(tiny_config(tmp_path / "unused", "model/ffn=moe")), 257)
    model.depth.blocks[1].ffn.expert_bias_E[3] = 0.1  # as aux-loss-free balancing leaves it
    model.set_elastic(ElasticSetting(top_k=1))
    with pytest.raises(UnsupportedArchitectureError, match="nonzero expert selection bias.*elastic sub-network"):
        export_model(model, tmp_path / "hf")


def test_an_option_the_exporter_does_not_know_is_refused(tmp_path, monkeypatch):
    """A block option added later must not export silently before someone decides how it maps."""
    from arch.ffn.mlp import SwiGLUMLP
    from arch.registry import Capabilities

    monkeypatch.setattr(SwiGLUMLP, "capabilities", Capabilities(hf_export=("hidden_dim", "multiple_of")))
    model = build_model(validate(tiny_config(tmp_path / "unused")), 257)
    with pytest.raises(UnsupportedArchitectureError, match=r"model.ffn.bias \(an option the exporter does not know"):
        export_model(model, tmp_path / "hf")
