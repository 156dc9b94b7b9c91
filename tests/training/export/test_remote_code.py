"""Every registered block exports as a trust_remote_code package whose logits equal ours (fp32, 1e-5)."""

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from arch.registry import REGISTRIES  # noqa: E402
from tests.helpers import tiny_config  # noqa: E402
from training.build import build_model  # noqa: E402
from training.config import validate  # noqa: E402
from training.export.hf import main  # noqa: E402
from training.export.remote_code import export_remote_code  # noqa: E402
from training.trainer import train  # noqa: E402

# one model per registered block name (extra overrides where a block needs a partner or small options)
BLOCKS = {
    ("attention", "mha"): [],
    ("attention", "dha"): [],
    ("attention", "mohd_mha"): [],
    ("ffn", "swiglu"): [],
    ("ffn", "moe"): ["model.ffn.router=xmoe"],
    ("ffn", "emoe"): ["model.ffn.eval_top_k=4"],  # EMoE's k' at inference
    ("ffn", "mhmoe"): [],
    ("ffn", "moue"): [],
    ("ffn", "mohd"): [],
    ("depth", "plain"): [],
    ("depth", "loop"): [],
    ("depth", "recurrent"): ["model.n_layers=4"],
    ("depth", "itt"): [],
    ("depth", "sgt"): ["model.depth.top_k_layers=1", "model.depth.max_selected_layers=1"],
}


def test_every_registered_block_is_covered():
    """Every block the framework ships (registered, with its YAML in conf/model/<group>/); tests may register
    test-only blocks of their own, which have no YAML there."""
    conf = Path(__file__).resolve().parents[3] / "conf" / "model"
    shipped = {
        (group, name)
        for group, registry in REGISTRIES.items()
        for name in registry.names()
        if (conf / group / f"{name}.yaml").exists()
    }
    assert shipped == set(BLOCKS)


def _perturb(model):
    """Random weights everywhere (zero-initialised parts included), so that no mapping error can hide."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)


@pytest.mark.parametrize("group,name", sorted(BLOCKS), ids=lambda v: str(v))
def test_remote_code_export_gives_our_logits(tmp_path, group, name):
    from transformers import AutoModelForCausalLM

    root = validate(tiny_config(tmp_path / "unused", f"model/{group}={name}", *BLOCKS[(group, name)]))
    model = build_model(root, 257).eval()
    _perturb(model)
    out = export_remote_code(model, tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    idx = torch.randint(0, 257, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the same seed for both: the recurrent depth draws its initial state at random
        torch.manual_seed(5)
        ours = model(idx).logits
        torch.manual_seed(5)
        theirs = loaded(idx).logits
    assert theirs.shape == (2, 13, 257)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert json.loads((out / "config.json").read_text())["sparse_arch_model"][group]["name"] == name


def test_a_trained_dha_run_exports_automatically_with_its_tokenizer_and_a_model_card(tmp_path, one_thread):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    train(
        tiny_config(
            run,
            "model/attention=dha",
            "trainer.max_steps=6",
            "trainer.eval_every=6",
            "trainer.checkpoint_every=6",
            "trainer.sample_tokens=0",
        )
    )
    out = tmp_path / "hf"
    assert main([str(run), str(out)]) == 0  # --format auto: DHA has no stock class → remote code
    assert (out / "modeling_sparse_arch.py").exists() and (out / "sparse_arch_src" / "arch" / "model.py").exists()
    card = (out / "README.md").read_text()
    assert "attention `dha`" in card and "steps: 6" in card and "val_loss" in card
    loaded = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    from training.eval.loss import load_trained

    model, *_ = load_trained(run, "cpu")
    idx = torch.randint(0, 257, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx).logits, model(idx).logits, rtol=1e-5, atol=1e-5)
        generated = loaded.generate(idx[:, :3], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)
    assert main([str(run), str(tmp_path / "native"), "--format", "native"]) == 2  # refused: no Llama form
