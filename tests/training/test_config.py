"""Config composition and validation: every bad key or value fails early with what is allowed."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import tiny_config
from training.cli import compose
from training.config import ConfigError, validate

ROOT = Path(__file__).resolve().parents[2]


def test_default_config_composes_and_validates():
    root = validate(compose([]))
    assert root.model.name == "moe_tiny" and root.data.source == "embedded"  # the default is sparse
    assert root.model.attention["name"] == "mha" and root.model.ffn["name"] == "moe"
    assert root.model.max_seq_len == root.data.seq_len


@pytest.mark.parametrize("preset", ["dense_tiny", "dense_124m", "moe_tiny"])
def test_model_presets_validate(preset):
    root = validate(compose([f"model={preset}"]))
    assert root.model.name == preset


@pytest.mark.parametrize(
    "experiment",
    ["dense_baseline", "moe_vs_dense", "emoe", "ernie_elastic", "sgt", "sgt_low_entropy", "block_loop", "sgt_baseline"],
)
def test_experiment_presets_validate_and_accept_overrides(experiment):
    root = validate(compose([f"experiment={experiment}", "trainer.max_steps=7", "seed=3", "run_dir=/tmp/x"]))
    assert (root.experiment, root.trainer.max_steps, root.seed, root.run_dir) == (experiment, 7, 3, "/tmp/x")


@pytest.mark.parametrize("data", ["shakespeare", "files", "hf", "assoc_recall", "mod_add"])
def test_data_presets_compose(data):
    cfg = compose([f"data={data}"])
    if data == "files":
        with pytest.raises(ConfigError, match="data.paths"):
            validate(cfg)
    else:
        validate(cfg)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lr=-1"], r"optim.lr=-1.* must be > 0"),
        (["model.max_seq_len=128", "data.seq_len=512"], r"data.seq_len=512 exceeds model.max_seq_len=128"),
        (["model.n_heads=5"], r"divisible by model.n_heads=5"),
        (["trainer.device=tpu"], r"trainer.device='tpu' is invalid; allowed: one of \['auto', 'cpu', 'cuda'\]"),
        (["trainer.nonfinite=ignore"], r"allowed: one of \['skip', 'abort'\]"),
        (["model.attention.name=flash9"], r"unknown attention block 'flash9'; registered attention blocks: \[.*'mha'"),
        (["+model.ffn.widht=4"], r"block 'moe' has no option 'widht'"),
        (["model=dense_tiny", "+model.ffn.top_k=2"], r"block 'swiglu' has no option 'top_k'"),
        (["trainer.max_steps=0"], r"trainer.max_steps=0 must be a positive integer"),
        (["+trainer.max_step=5"], r"unknown key 'trainer.max_step'.*Did you mean 'max_steps'"),
        (["data.val_fraction=1.5"], r"data.val_fraction=1.5 must be in \(0, 1\)"),
    ],
)
def test_invalid_values_are_rejected_with_allowed_choices(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(overrides))


def _run_train(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "train.py", *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (["trainer.max_step=5"], "unknown config key 'trainer.max_step': trainer has keys"),
        (["optim.lr=-1"], "optim.lr=-1 must be > 0"),
        (
            ["model/attention=flash9"],
            "model/attention=flash9: no such option in config group 'model/attention'; choices: dha, mha, mohd_mha",
        ),
        (["model.attention.n_kv_heads=3"], "n_kv_heads=3 must divide model.n_heads=4"),
    ],
)
def test_train_py_fails_before_any_work_with_a_clear_message(tmp_path, args, expected):
    run_dir = tmp_path / "run"
    result = _run_train(*args, f"run_dir={run_dir}")
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()  # nothing was written


def test_seq_len_longer_than_validation_split_fails_before_training(tmp_path):
    corpus = tmp_path / "small.txt"
    corpus.write_text("tiny corpus. " * 400)
    run_dir = tmp_path / "run"
    result = _run_train(
        "data=files",
        f"data.paths=[{corpus}]",
        "data.tokenizer.kind=bytes",
        "data.val_fraction=0.01",
        "data.seq_len=128",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"run_dir={run_dir}",
        "trainer.progress=false",
    )
    assert result.returncode == 2, result.stderr
    assert "longer than the validation split" in result.stderr
    assert not (run_dir / "metrics.jsonl").exists()


def test_a_block_option_only_its_constructor_can_judge_fails_before_anything_is_written(tmp_path):
    from training.trainer import Trainer

    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"ffn.top_k=99 must be in \[1, n_experts=8\]"):
        Trainer(tiny_config(run_dir, "model=moe_tiny", "model.ffn.top_k=99"))
    assert not run_dir.exists()


def _numeric_fields(schema, prefix=""):
    """(dotted key, type) of every int / float field of the schema, nested dataclasses included."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        hint, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            yield from _numeric_fields(hint, f"{key}.")
        elif {int, float} & set(typing.get_args(hint) or (hint,)):
            yield key


def test_every_numeric_option_of_the_schema_has_a_range_check():
    """-1 is out of range for every numeric option we have; each must be refused, naming its key."""
    from training.config_schema import RootConfig

    keys = list(_numeric_fields(RootConfig))
    assert len(keys) > 40
    accepted = []
    for key in keys:
        try:
            validate(compose([f"++{key}=-1"]))  # ++: also keys the default preset leaves out (data.hf ...)
            accepted.append(key)
        except ConfigError as e:
            assert key in str(e) or key.split(".")[-1] in str(e), (key, str(e))
    assert not accepted, f"-1 accepted for {accepted}"


def test_every_numeric_block_option_has_a_range_rule():
    """A new block option that is a number needs a rule in BLOCK_OPTION_RANGES (or a reason to have none)."""
    import typing

    from arch.registry import REGISTRIES
    from training.config import BLOCK_OPTION_RANGES

    no_range = {"step_init": "any real initial step scale phi_t"}
    missing = []
    for group, registry in REGISTRIES.items():
        for name in registry.names():
            hints = typing.get_type_hints(registry.get(name).__init__)
            for key, param in registry.options(name).items():
                hint = hints.get(key, param.annotation)
                types = set(typing.get_args(hint) or (hint,))
                if {int, float} & types and key not in BLOCK_OPTION_RANGES and key not in no_range:
                    missing.append(f"{group}/{name}.{key}")
    assert not missing, missing
    for key, (test, _) in BLOCK_OPTION_RANGES.items():
        assert not test(-1), key
