"""Run provenance: a launch history that survives relaunches, and train.log with what the console showed."""

import json

from tests.helpers import tiny_config
from training.provenance import ConsoleLog, read_launches
from training.trainer import train


def test_each_launch_is_appended_and_train_log_keeps_the_console(tmp_path, one_thread):
    run = tmp_path / "run"
    train(tiny_config(run, "trainer.max_steps=4", "trainer.eval_every=4", "trainer.checkpoint_every=4"))
    train(tiny_config(run, "trainer.max_steps=6", "trainer.eval_every=6", "trainer.checkpoint_every=6"))
    launches = read_launches(run)
    assert len(launches) == 2 and all(row["git_commit"] is None or len(row["git_commit"]) == 40 for row in launches)
    assert {"time", "overrides", "argv", "git_dirty", "host", "processes"} <= set(launches[0])
    log = (run / "train.log").read_text()
    assert log.count("--- launch ") == 2
    assert "run folder:" in log and "resumed from" in log  # the header of both launches, the resume of the second
    assert "\r" not in log
    assert json.loads((run / "launches.jsonl").read_text().splitlines()[1])["pid"] > 0


def test_console_lines_printed_before_the_run_folder_exists_are_kept_and_bars_collapse(tmp_path, capsys):
    with ConsoleLog() as console:
        print("before the folder")
        print("bar 10%\rbar 50%\rbar 100%")
        console.attach(tmp_path / "train.log")
        print("after", end="")
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert lines[1:] == ["before the folder", "bar 100%", "after"]
    assert "before the folder" in capsys.readouterr().out  # the console still shows everything


def test_per_expert_loads_reach_wandb_as_histograms():
    pytest = __import__("pytest")
    wandb = pytest.importorskip("wandb")
    from training.metrics import wandb_row

    row = wandb_row({"step": 3, "loss": 2.5, "moe/layer0/load": [0.5, 0.25, 0.25, 0.0], "moe/layer0/dead_experts": 1.0})
    assert row["loss"] == 2.5 and "step" not in row and row["moe/layer0/dead_experts"] == 1.0
    hist = row["moe/layer0/load"]
    assert isinstance(hist, wandb.Histogram) and list(hist.histogram) == [0.5, 0.25, 0.25, 0.0] and len(hist.bins) == 5


def test_launch_history_and_console_log_are_never_written_through_a_link(tmp_path, capsys):
    from training.provenance import record_launch

    target = tmp_path / "elsewhere.txt"
    target.write_text("keep\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "launches.jsonl").symlink_to(target)
    (run / "train.log").symlink_to(target)
    record_launch(run)
    with ConsoleLog() as console:
        console.attach(run / "train.log")
        print("hello")
    assert target.read_text() == "keep\n"
    assert not (run / "launches.jsonl").is_symlink() and not (run / "train.log").is_symlink()
    assert "was a symbolic link" in capsys.readouterr().err
