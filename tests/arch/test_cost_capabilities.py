"""Capabilities and option defaults live on the block class and are read through the registry.

Also: importing the config schema, the registry and the cost record stays torch-free, and no name
list of blocks survives outside the block files.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from arch.registry import ATTENTION, DEPTH, FFN, REGISTRIES, Capabilities, ConfigError, Registry
from tests.helpers import tiny_config
from training.config import elastic_dims, validate
from training.config_schema import ModelConfig

ROOT = Path(__file__).resolve().parents[2]


def test_config_registry_and_cost_record_import_without_torch():
    code = "import sys, training.config, arch.registry, arch.cost; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_every_registered_block_declares_capabilities_the_registry_reads():
    declared = {
        (kind, name): REGISTRIES[kind].capabilities(name) for kind in REGISTRIES for name in REGISTRIES[kind].names()
    }
    assert all(isinstance(c, Capabilities) for c in declared.values())
    assert FFN.with_capability("elastic_width") == ["emoe", "moe"]
    assert FFN.with_capability("expert_parallel") == ["emoe", "mhmoe", "moe", "moue"]
    assert FFN.with_capability("expert_banks") == ["emoe", "mhmoe", "moe", "moue"]
    assert [n for n in FFN.names() if FFN.capabilities(n).exportable] == ["emoe", "moe", "swiglu"]
    assert [n for n in ATTENTION.names() if ATTENTION.capabilities(n).exportable] == ["mha"]
    assert [n for n in DEPTH.names() if DEPTH.capabilities(n).exportable] == ["plain"]
    assert DEPTH.capabilities("sgt").needs_attention == DEPTH.capabilities("itt").needs_attention == ("mha",)
    # the exporter's mapped options are the constructor's options: none unaccounted, none invented
    for registry, name in ((ATTENTION, "mha"), (FFN, "moe"), (FFN, "swiglu"), (DEPTH, "plain")):
        assert set(registry.capabilities(name).hf_export) == set(registry.options(name)), name


def test_option_defaults_come_from_the_constructor_signature():
    assert FFN.resolved_options("moe", {"name": "moe", "top_k": 3})["n_experts"] == 8  # MoEFFN's default
    assert elastic_dims(ModelConfig(n_layers=3, ffn={"name": "moe"})) == (3, 8, 2)
    assert elastic_dims(ModelConfig(n_layers=3, ffn={"name": "emoe", "n_experts": 6, "top_k": 1})) == (3, 6, 1)
    assert elastic_dims(ModelConfig(n_layers=3, ffn={"name": "mhmoe"})) == (3, None, None)  # no elastic widths declared


def test_a_block_that_needs_mha_is_refused_at_config_time_naming_the_pair(tmp_path):
    with pytest.raises(ConfigError, match=r"model.depth.name='sgt' cannot be combined with model.attention.name='dha'"):
        validate(tiny_config(tmp_path, "model/depth=sgt", "model/attention=dha"))
    validate(tiny_config(tmp_path, "model/depth=sgt"))


def test_inconsistent_or_malformed_declarations_are_type_errors():
    registry = Registry("ffn")

    class NoExpertOptions:
        capabilities = Capabilities(elastic_width=True)

        def __init__(self, d_model, layer_idx, shared=None, *, hidden: int = 8):
            pass

    class NotCapabilities:
        capabilities = {"elastic_width": True}

    registry.register("a")(NoExpertOptions)
    registry.register("b")(NotCapabilities)
    with pytest.raises(TypeError, match="declares elastic_width but lacks the n_experts / top_k options"):
        registry.capabilities("a")
    with pytest.raises(TypeError, match="must be an arch.registry.Capabilities"):
        registry.capabilities("b")


def test_no_block_name_lists_remain_outside_the_block_files():
    """MOE_BLOCKS / EXPERT_PARALLEL_BLOCKS / KNOWN_OPTIONS and the get("n_experts", 8) copies are gone."""
    for path in [*ROOT.glob("training/**/*.py"), *ROOT.glob("recipes/**/*.py"), ROOT / "evaluate.py"]:
        text = path.read_text()
        for stale in ("MOE_BLOCKS", "EXPERT_PARALLEL_BLOCKS", "KNOWN_OPTIONS", '"n_experts", 8', "_moe_dims"):
            assert stale not in text, (path, stale)
