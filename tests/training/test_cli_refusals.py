"""Every invalid command line is refused before anything is written (issue 20, item 4).

Each case goes through ``train.cli`` in this process, exactly what ``python train.py ARGS`` runs:
the preflight, then Hydra and training. So a case the preflight misses is not silently skipped: it
reaches Hydra, which creates the run folder (and trains a tiny model), and the test fails on that.
A few cases also run as real ``python train.py`` subprocesses to show the entry behaves the same.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import DATA_CACHE, TINY

ROOT = Path(__file__).resolve().parents[2]
THIS_FILE = Path(__file__).resolve()
import train  # noqa: E402  (after ROOT: train.py sits at the repository root)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# (extra overrides, text the one-line message must contain: the key and the value)
CASES: list[tuple[list[str], str]] = [
    # model
    (["model.d_model=0"], "model.d_model=0"),
    (["model.n_layers=-1"], "model.n_layers=-1"),
    (["model.n_heads=3"], "model.n_heads=3"),
    (["model.norm_eps=0"], "model.norm_eps=0"),
    (["model.rope_theta=-1"], "model.rope_theta=-1"),
    (["model.init_std=0"], "model.init_std=0"),
    (["model.init_std=nan"], "model.init_std=nan"),
    (["model.vocab_size=0"], "model.vocab_size=0"),
    (["model.vocab_size=100"], "model.vocab_size=100"),  # smaller than the tokenizer: known after the data
    (["model.max_seq_len=16"], "model.max_seq_len=16"),
    (["model.tie_embeddings=maybe"], "model.tie_embeddings='maybe'"),
    (["model.d_model=abc"], "model.d_model='abc'"),
    (["model=nope"], "model=nope"),
    # model/attention
    (["model/attention=nope"], "model/attention=nope"),
    (["model.attention.n_kv_heads=3"], "n_kv_heads=3"),
    (["model.attention.backend=cuda9"], "model.attention.backend='cuda9'"),
    (["+model.attention.window=4"], "window"),
    (["model/attention=mohd_mha", "model.attention.n_groups=5"], "n_groups=5"),
    (["model/attention=dha", "model.attention.k_heads=3"], "k_heads"),
    # model/ffn
    (["model/ffn=nope"], "model/ffn=nope"),
    (["model/ffn=moe", "model.ffn.expert_hidden=0"], "model.ffn.expert_hidden=0"),
    (["model/ffn=moe", "model.ffn.top_k=9"], "top_k=9"),
    (["model/ffn=moe", "model.ffn.n_experts=0"], "model.ffn.n_experts=0"),
    (["model/ffn=moe", "model.ffn.capacity_factor=0"], "model.ffn.capacity_factor=0"),
    (["model/ffn=moe", "model.ffn.balance_loss_coef=-1"], "model.ffn.balance_loss_coef=-1"),
    (["model/ffn=moe", "model.ffn.router_noise=-0.1"], "model.ffn.router_noise=-0.1"),
    (["model/ffn=moe", "model.ffn.coactivation_prob=2"], "model.ffn.coactivation_prob=2"),
    (["model/ffn=moe", "model.ffn.router=xmoe", "model.ffn.xmoe_temperature=0"], "model.ffn.xmoe_temperature=0"),
    (["model/ffn=moe", "model.ffn.scoring=relu"], "model.ffn.scoring='relu'"),
    (["model/ffn=swiglu", "model.ffn.hidden_dim=0"], "model.ffn.hidden_dim=0"),
    (["model/ffn=mhmoe", "model.ffn.n_heads=3"], "n_heads=3"),
    (["model/ffn=moue", "model.ffn.window_size=0"], "model.ffn.window_size=0"),
    (["model/ffn=mohd", "model.ffn.n_active=20"], "n_active=20"),
    (["model/ffn=emoe", "model.ffn.hier_gamma=0"], "model.ffn.hier_gamma=0"),
    # model/depth
    (["model/depth=nope"], "model/depth=nope"),
    (["model/depth=loop", "model.depth.repeats=0"], "model.depth.repeats=0"),
    (["model/depth=itt", "model.depth.steps=0"], "model.depth.steps=0"),
    (["model/depth=recurrent", "model.n_layers=4", "model.depth.core_layers=5"], "core_layers"),
    (["model/depth=recurrent", "model.n_layers=4", "model.depth.sigma=0"], "model.depth.sigma=0"),
    (["model/depth=sgt", "model.depth.num_keep_heads=9"], "num_keep_heads=9"),
    # data
    (["data=nope"], "data=nope"),
    (["data.seq_len=0"], "data.seq_len=0"),
    (["data.val_fraction=0"], "data.val_fraction=0"),
    (["data.tokenizer.kind=wordpiece"], "data.tokenizer.kind='wordpiece'"),
    (["data.tokenizer.kind=bpe", "data.tokenizer.vocab_size=100"], "data.tokenizer.vocab_size=100"),
    (["data=files"], "data.paths"),
    (["data=files", "data.paths=[/nonexistent/corpus/*.txt]"], "/nonexistent/corpus/*.txt"),
    (["data=assoc_recall", "data.synthetic.num_train=0"], "data.synthetic.num_train=0"),
    (["data=mod_add", "data.synthetic.modulus=1"], "data.synthetic.modulus=1"),
    (["data.cache_dir="], "data.cache_dir"),
    (["data.seq_len=1000000", "model.max_seq_len=1000000"], "data.seq_len=1000000"),  # longer than the val split
    (["data.name=nope"], "data.name='nope'"),
    # optim
    (["optim.lr=0"], "optim.lr=0"),
    (["optim.lr=inf"], "optim.lr=inf"),
    (["optim.eps=0"], "optim.eps=0"),
    (["optim.betas=[0.9,1.5]"], "optim.betas=[0.9, 1.5]"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay=-0.1"),
    (["optim.grad_clip=-1"], "optim.grad_clip=-1"),
    (["optim.name=sgd"], "optim.name='sgd'"),
    (["optim=nope"], "optim=nope"),
    # schedule
    (["schedule=nope"], "schedule=nope"),
    (["schedule.warmup_steps=-1"], "schedule.warmup_steps=-1"),
    (["schedule.min_lr_ratio=2"], "schedule.min_lr_ratio=2"),
    (["schedule.decay_fraction=0"], "schedule.decay_fraction=0"),
    # trainer
    (["trainer.sample_top_k=0"], "trainer.sample_top_k=0"),
    (["trainer.device=cuda"] if not _cuda() else ["trainer.device=tpu"], "trainer.device="),
    (["trainer.device=tpu"], "trainer.device='tpu'"),
    (["trainer.resume=/nonexistent/step_00000010.pt"], "trainer.resume=/nonexistent/step_00000010.pt"),
    (["trainer.batch_size=0"], "trainer.batch_size=0"),
    (["trainer.keep_last=0"], "trainer.keep_last=0"),
    (["trainer.sample_temperature=-1"], "trainer.sample_temperature=-1"),
    (["trainer.threads=0"], "trainer.threads=0"),
    (["trainer.precision=fp8"], "trainer.precision='fp8'"),
    (["trainer.checkpoint_async=true", "trainer.checkpoint_format=torch"], "trainer.checkpoint_async=true"),
    (["trainer.expert_parallel=2"], "trainer.expert_parallel=2"),
    (["trainer.eval_batches=0"], "trainer.eval_batches=0"),
    (["trainer.max_step=5"], "trainer.max_step"),
    (["trainer.sample_tokens=-1"], "trainer.sample_tokens=-1"),
    ([f"trainer.resume={THIS_FILE}"], f"trainer.resume={THIS_FILE}: checkpoint"),  # exists, is no checkpoint
    ([f"run_dir={THIS_FILE}/run"], f"run_dir={THIS_FILE}/run: {THIS_FILE} is a file, not a folder"),
    ([f"data.cache_dir={THIS_FILE}/cache"], f"data.cache_dir={THIS_FILE}/cache"),
    (["trainer=nope"], "trainer=nope"),
    # logger
    (["logger=nope"], "logger=nope"),
    (["logger.mode=sometimes"], "logger.mode='sometimes'"),
    (["logger.name=tensorboard"], "logger.name='tensorboard'"),
    # elastic
    (["elastic=nope"], "elastic=nope"),
    (["elastic=ernie"], "model.ffn.name='swiglu'"),  # width / top-k elasticity needs an MoE FFN
    (["elastic=ernie", "model/ffn=moe", "elastic.depth_min=9"], "elastic.depth_min=9"),
    (["elastic.depth_full_prob=1.5"], "elastic.depth_full_prob=1.5"),
    (["elastic.subset_sizes=[a]"], "elastic.subset_sizes"),
    # experiment
    (["experiment=nope"], "experiment=nope"),
    (["experiment=emoe", "model.ffn.expert_hidden=0"], "model.ffn.expert_hidden=0"),
    # top level
    (["seed=-1"], "seed=-1"),
    (["seed=abc"], "seed='abc'"),
    (["+foo=1"], "foo"),
    (["+seed=1"], "seed"),
    (["trainer.max_steps=[1"], "trainer.max_steps=[1"),
    # Hydra's own keys
    (["hydra.run.dirr=x"], "hydra.run.dirr"),
    (["hydra/launcher=nope"], "hydra/launcher=nope"),
    (["hydra.job.chdir=maybe"], "hydra.job.chdir=maybe"),
]


def _argv(run_dir: Path, extra: list[str]) -> list[str]:
    # A tiny, 2-step run: a case the preflight missed trains in seconds and leaves its run folder.
    return [*TINY, f"data.cache_dir={DATA_CACHE}", f"run_dir={run_dir}", "trainer.max_steps=2", *extra]


def _problems(code, err: str, expected: str, run_dir: Path) -> list[str]:
    lines = [line for line in err.splitlines() if line.strip()]
    problems = []
    if code in (0, None):
        problems.append(f"exit status {code}")
    if "Traceback" in err:
        problems.append("a traceback")
    if expected not in err:
        problems.append(f"no {expected!r} in the message")
    if len(lines) != 1:
        problems.append(f"{len(lines)} lines instead of one")
    if run_dir.exists():
        problems.append("the run folder was created")
    return problems


def test_every_invalid_command_line_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    assert len(CASES) >= 50
    monkeypatch.setattr(sys, "argv", ["train.py"])
    failures = []
    for i, (extra, expected) in enumerate(CASES):
        run_dir = tmp_path / f"run{i}"
        try:
            train.cli(_argv(run_dir, extra))
            code = 0
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        problems = _problems(code, err, expected, run_dir)
        if problems:
            failures.append(f"{' '.join(extra)}: {', '.join(problems)}\n    stderr: {err.strip()[-300:]}")
    assert not failures, f"{len(failures)} of {len(CASES)} command lines not refused cleanly:\n" + "\n".join(failures)


def test_resume_none_in_a_run_folder_with_checkpoints_is_refused_before_hydra_writes_into_it(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000010.pt").write_bytes(b"an earlier run's checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        train.cli(_argv(run_dir, ["trainer.resume=none"]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "trainer.resume=none" in err and "step_00000010.pt" in err, err
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints"]  # no .hydra/ snapshot overwritten


def test_a_valid_command_line_passes_the_preflight_and_trains(tmp_path, monkeypatch, capsys):
    """The other side: the same tiny command line without a bad key trains and writes its run folder."""
    monkeypatch.setattr(sys, "argv", ["train.py"])
    run_dir = tmp_path / "run"
    train.cli(_argv(run_dir, ["trainer.sample_tokens=4"]))
    assert (run_dir / "metrics.jsonl").exists() and (run_dir / ".hydra").is_dir()


def test_a_sweep_with_one_bad_grid_point_is_refused_before_the_sweep_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    sweep_dir = tmp_path / "sweep"
    with pytest.raises(SystemExit) as exit_info:
        train.cli(["-m", *_argv(tmp_path / "run", ["optim.eps=1e-8,0"]), f"hydra.sweep.dir={sweep_dir}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "optim.eps=0" in err and "Traceback" not in err
    assert not sweep_dir.exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, expected",
    [
        (["model/ffn=moe", "model.ffn.expert_hidden=0"], "model.ffn.expert_hidden=0"),
        (["trainer.sample_top_k=0"], "trainer.sample_top_k=0"),
        (["experiment=nope"], "experiment=nope: no such option in config group 'experiment'; choices: block_loop"),
        (["data=files", "data.paths=[/nonexistent/corpus/*.txt]"], "/nonexistent/corpus/*.txt"),
        (["hydra.job.chdir=maybe"], "hydra.job.chdir=maybe"),
    ],
)
def test_python_train_py_refuses_the_same_way(tmp_path, extra, expected):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "train.py", *_argv(run_dir, extra)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert _problems(result.returncode, result.stderr, expected, run_dir) == [], result.stderr


def test_a_bad_data_file_is_named_before_the_run_folder_exists(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("plenty of text here\n" * 200)
    bad.write_bytes(b"fine first line\nthen caf\xe9\n")
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        train.cli(
            _argv(
                run_dir,
                [
                    "data=files",
                    f"data.paths=[{good},{bad}]",
                    "data.tokenizer.kind=bytes",
                    f"data.cache_dir={tmp_path / 'cache'}",
                ],
            )
        )
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert _problems(2, err, f"{bad}:2: not UTF-8", run_dir) == [], err


@pytest.mark.parametrize(
    "args, expected",
    [
        (["ckpt=/nonexistent/run"], "ckpt=/nonexistent/run: no such run folder or checkpoint file"),
        (
            ["ckpt=.", "analysis=heatmap"],
            "analysis='heatmap' is invalid; allowed: one of ['elastic', 'routing', 'depth', 'all']",
        ),
        (["ckpt=.", "sweep.topk=[1]"], "unknown evaluate.py key 'sweep.topk'"),
        (["ckpt=.", "batch_size=0"], "batch_size=0 must be a positive integer"),
    ],
)
def test_evaluate_py_checks_its_arguments_first(args, expected):
    result = subprocess.run(
        [sys.executable, "evaluate.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr, result.stderr
