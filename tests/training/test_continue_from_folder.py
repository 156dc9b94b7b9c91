"""Any run continues from its folder with plain ``python train.py run_dir=R`` (training/run_config.py):
converted MoUE and DHA runs, whose configs conf/ cannot compose, and the trainer's printed hint."""

from __future__ import annotations

import pytest

import train
from recipes.dha import convert as dha_convert
from recipes.moue.convert import main as moue_main
from tests.helpers import DATA_CACHE, TINY, tiny_config
from training.metrics import read_metrics
from training.trainer import train as train_run

SHORT = ["trainer.progress=false", "trainer.sample_tokens=0", "logger=none", "trainer.threads=1"]


def _steps(run) -> list[int]:
    return [r["step"] for r in read_metrics(run) if "loss" in r]


def test_a_converted_moue_run_continues_with_plain_train_py(tmp_path, capsys, one_thread):
    moe = tmp_path / "moe"
    train_run(
        tiny_config(
            moe,
            "model/ffn=moe",
            "model.ffn.n_experts=4",
            "trainer.max_steps=6",
            "trainer.checkpoint_every=6",
            "trainer.eval_every=6",
            "trainer.sample_tokens=0",
        )
    )
    out = tmp_path / "moue"
    moue_main([f"ckpt={moe}", f"out={out}", "trainer.max_steps=8", "model.ffn.widen_to=8", "model.ffn.widen_steps=2"])
    capsys.readouterr()
    train.cli([f"run_dir={out}", "trainer.max_steps=10", *SHORT])  # not the default config: MoUE's, saved in out
    printed = capsys.readouterr().out
    assert f"continuing {out} from its saved config.yaml: trainer.max_steps: 8 → 10" in printed
    assert _steps(out) == [7, 8, 9, 10]
    assert "resume/extend:  python train.py run_dir=" in printed  # the hint it prints is the command just used
    train.cli([f"run_dir={out}", "trainer.max_steps=12", *SHORT])  # the hint works again
    assert _steps(out)[-2:] == [11, 12]


def test_a_converted_dha_run_continues_and_its_model_cannot_change(tmp_path, capsys, one_thread):
    mha = tmp_path / "mha"
    train_run(
        tiny_config(
            mha,
            "model.n_heads=4",
            "model.d_model=32",
            "trainer.max_steps=4",
            "trainer.checkpoint_every=4",
            "trainer.eval_every=4",
            "trainer.sample_tokens=0",
        )
    )
    out = tmp_path / "dha"
    dha_convert.main(["mha_to_dha", f"ckpt={mha}", f"out={out}", "budget=0.5", "fusion_steps=2", "cpt_steps=4"])
    capsys.readouterr()
    train.cli([f"run_dir={out}", *SHORT])  # CPT to the converted run's own trainer.max_steps
    assert _steps(out) == [1, 2, 3, 4]
    assert "continuing" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        train.cli([f"run_dir={out}", "model.d_model=64", "trainer.max_steps=6", *SHORT])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "was trained with another model" in err and "model.d_model: 32 → 64" in err and "Traceback" not in err


def test_a_fresh_run_dir_uses_the_composed_config(tmp_path, capsys, one_thread):
    run = tmp_path / "fresh"
    train.cli([*TINY, f"data.cache_dir={DATA_CACHE}", "trainer.max_steps=2", f"run_dir={run}"])
    assert "from its saved config.yaml" not in capsys.readouterr().out and _steps(run) == [1, 2]
