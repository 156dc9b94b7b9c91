"""A run folder is self-contained: after the training file and the data cache are deleted, the folder alone is
sampled, evaluated, exported and scored by the lm-eval adapter (training/data/run_copy.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import TINY
from training.cli import compose
from training.trainer import train

ROOT = Path(__file__).resolve().parents[2]
TEXT = "".join(
    f"Line {i}: the quick brown fox jumps over the lazy dog, and ROMEO speaks to JULIET.\n" for i in range(400)
)


@pytest.mark.slow
def test_the_run_folder_alone_samples_evaluates_exports_and_runs_lm_eval(tmp_path, capsys, one_thread):
    corpus, cache, run = tmp_path / "corpus.txt", tmp_path / "cache", tmp_path / "run"
    corpus.write_text(TEXT)
    overrides = [o for o in TINY if not o.startswith(("data.tokenizer", "model="))]
    train(
        compose(
            [
                *overrides,
                "model=moe_tiny",
                "model.d_model=32",
                "model.n_layers=2",
                "model.n_heads=2",
                "data=files",
                f"data.paths=[{corpus}]",
                "data.tokenizer.kind=bpe",
                "data.tokenizer.vocab_size=300",
                f"data.cache_dir={cache}",
                "trainer.max_steps=4",
                "trainer.eval_every=4",
                "trainer.checkpoint_every=4",
                f"run_dir={run}",
            ]
        )
    )
    assert (run / "data" / "tokenizer.json").is_file() and (run / "data" / "val.npy").is_file()
    corpus.unlink()
    shutil.rmtree(cache)
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin"}

    def run_tool(*args):
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        return proc.stdout

    sample = run_tool("-m", "training.eval.sample", str(run), "--prompt", "ROMEO", "--tokens", "8")
    assert sample.strip()
    run_tool("evaluate.py", f"ckpt={run}", "sweep.top_k=[1,2]", "eval_batches=1", f"out_dir={tmp_path / 'eval'}")
    assert (tmp_path / "eval" / "elastic.csv").read_text().count("\n") >= 3
    run_tool("-m", "training.export.hf", str(run), str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "tokenizer.json").is_file()

    pytest.importorskip("lm_eval")
    from tests.training.eval.test_lm_eval_adapter import run_local_task

    assert "sparse_arch_tiny_mc" in run_local_task(run, tmp_path)["results"]
    assert not corpus.exists() and not cache.exists()  # nothing rebuilt them
