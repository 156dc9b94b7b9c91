"""Run bookkeeping that never lies: unusable checkpoints stop the run, pruning keeps ``latest``,
metrics.jsonl matches the checkpoint after any crash, no temp files or links survive, disk errors
name the path and what was kept, skipped non-finite steps still evaluate and checkpoint."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_config
from training.checkpoint import files as ckpt
from training.cli import report_errors
from training.errors import CheckpointError
from training.metrics import read_metrics
from training.trainer import Trainer, train

ROOT = Path(__file__).resolve().parents[3]
QUICK = [
    "trainer.max_steps=4",
    "trainer.checkpoint_every=2",
    "trainer.eval_every=2",
    "trainer.sample_tokens=0",
    "trainer.export_safetensors=false",
]


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((4,), value)}, "config": {"model": {"d_model": 8}}}


def _names(run) -> list[str]:
    return [p.name for p in ckpt.list_checkpoints(run)]


def test_every_checkpoint_unreadable_stops_with_exit_2_naming_each_and_restart_only_when_asked(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, *QUICK))
    for path in ckpt.list_checkpoints(run):
        path.write_bytes(b"\x00" * 100)
    before = {p.name: p.read_bytes() for p in ckpt.list_checkpoints(run)}
    cli = [sys.executable, "train.py", f"run_dir={run}"]  # continues the folder's saved config
    proc = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for name in before:
        assert name in proc.stderr, f"{name} not named: {proc.stderr[-1500:]}"
    assert "trainer.resume=restart" in proc.stderr
    assert {p.name: p.read_bytes() for p in ckpt.list_checkpoints(run)} == before  # nothing overwritten

    trainer = Trainer(tiny_config(run, *QUICK, "trainer.resume=restart"))
    assert trainer.step == 0 and _names(run) == []
    assert sorted(p.name for p in (run / "checkpoints" / "discarded" / "0").iterdir()) == sorted([*before, "latest"])


def test_pruning_never_removes_the_checkpoint_latest_names(tmp_path):
    for step in (10, 20, 30):
        ckpt.save_checkpoint(tmp_path, step, _state(step), keep_last=3)
    with pytest.warns(UserWarning, match="removing .*step_00000020.pt: it is newer than step_00000015.pt"):
        newest = ckpt.save_checkpoint(tmp_path, 15, _state(15.0), keep_last=2)  # a run continued from step 10
    assert (tmp_path / "checkpoints" / "latest").read_text() == newest.name
    assert _names(tmp_path) == ["step_00000010.pt", "step_00000015.pt"]
    ckpt.save_checkpoint(tmp_path, 16, _state(16.0), keep_last=1)
    assert _names(tmp_path) == ["step_00000016.pt"]
    path, state = ckpt.find_resume_checkpoint(tmp_path)
    assert path.name == "step_00000016.pt" and state["step"] == 16


def test_a_garbage_latest_falls_back_and_names_the_file(tmp_path):
    ckpt.save_checkpoint(tmp_path, 10, _state(1.0), keep_last=3)
    ckpt.save_checkpoint(tmp_path, 20, _state(2.0), keep_last=3)
    pointer = tmp_path / "checkpoints" / "latest"
    pointer.write_bytes(b"\xff\xfe\xfa not utf-8")
    with pytest.warns(UserWarning, match=rf"ignoring {pointer}: not a readable UTF-8"):
        path, _ = ckpt.find_resume_checkpoint(tmp_path)
    assert path.name == "step_00000020.pt"
    pointer.write_text("../../etc/passwd")
    with pytest.warns(UserWarning, match="is not a checkpoint name"):
        assert ckpt.find_resume_checkpoint(tmp_path)[0].name == "step_00000020.pt"


def test_metrics_torn_line_dropped_fresh_start_truncates_finished_rerun_adds_nothing(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, *QUICK))
    finished = (run / "metrics.jsonl").read_text()
    train(tiny_config(run, *QUICK))  # re-running a finished run: no new rows (no duplicate final eval)
    assert (run / "metrics.jsonl").read_text() == finished

    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.2')  # a crash tore the last write
    with pytest.warns(UserWarning, match="dropped its last line"):
        train(tiny_config(run, *QUICK, "trainer.max_steps=6"))
    rows = read_metrics(run)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 2, 4, 6]

    fresh = tmp_path / "fresh"  # killed before its first checkpoint: the rows it logged are not kept
    fresh.mkdir()
    (fresh / "metrics.jsonl").write_text('{"step": 0, "val_loss": 9.0}\n{"step": 1, "loss": 9.0}\n')
    train(tiny_config(fresh, *QUICK))
    rows = read_metrics(fresh)
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 2, 4] and 9.0 not in [r.get("loss") for r in rows]


def test_stale_temp_files_and_unfinished_folders_are_swept_at_start(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, *QUICK))
    folder = run / "checkpoints"
    dead_pid = 2**22 + 12345  # above pid_max's default: no such process
    stale = [folder / f".step_00000006.pt.tmp-{dead_pid}", folder / f".latest.tmp-{dead_pid}"]
    for p in stale:
        p.write_bytes(b"partial")
    (folder / "step_00000006").mkdir()  # a sharded save that died before DCP wrote .metadata
    (folder / "step_00000006" / "__0_0.distcp").write_bytes(b"partial")
    Trainer(tiny_config(run, *QUICK, "trainer.max_steps=8"))
    assert not any(p.exists() for p in stale) and not (folder / "step_00000006").exists()


def test_outputs_are_never_written_through_symbolic_links(tmp_path):
    run, outside = tmp_path / "run", tmp_path / "outside"
    run.mkdir(), outside.mkdir()
    for name in ("metrics.jsonl", "config.yaml", "sample.txt", "loss.png"):
        (outside / name).write_text("precious")
        (run / name).symlink_to(outside / name)
    with pytest.warns(UserWarning, match="was a symbolic link"):
        train(tiny_config(run, *QUICK, "trainer.sample_tokens=4"))
    for name in ("metrics.jsonl", "config.yaml", "sample.txt", "loss.png"):
        assert (outside / name).read_text() == "precious", name
        assert not (run / name).is_symlink() and (run / name).stat().st_size > 0, name

    linked = tmp_path / "linked"
    linked.mkdir()
    (outside / "ckpts").mkdir()
    (linked / "checkpoints").symlink_to(outside / "ckpts")
    with pytest.raises(CheckpointError, match="checkpoints is a symbolic link"):
        train(tiny_config(linked, *QUICK))
    assert list((outside / "ckpts").iterdir()) == []


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS])
@pytest.mark.parametrize("kind", ["pt", "dcp"])
def test_disk_full_or_read_only_names_the_path_keeps_the_previous_checkpoint_and_exits_2(
    tmp_path, monkeypatch, error, kind
):
    run = tmp_path / "run"
    overrides = [*QUICK, *(["trainer.checkpoint_format=dcp"] if kind == "dcp" else [])]
    real_fsync = os.fsync

    def failing_fsync(fd):
        if trainer.step >= 4:  # the second checkpoint's first write
            raise OSError(error, os.strerror(error))
        return real_fsync(fd)

    trainer = Trainer(tiny_config(run, *overrides))
    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(SystemExit) as exit_info, report_errors():
        trainer.fit()
    assert exit_info.value.code == 2
    monkeypatch.setattr(os, "fsync", real_fsync)
    previous = ckpt.list_checkpoints(run)[0]
    assert previous.name.startswith("step_00000002")
    assert (run / "checkpoints" / "latest").read_text() == previous.name
    assert not [p for p in (run / "checkpoints").rglob("*") if ".tmp-" in p.name]
    assert Trainer(tiny_config(run, *overrides)).step == 2  # what was kept still resumes


def test_disk_error_message_names_the_file_the_reason_and_what_was_kept(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 10, _state(1.0), keep_last=3)
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(CheckpointError) as info:
        ckpt.save_checkpoint(tmp_path, 20, _state(2.0), keep_last=3)
    message = str(info.value)
    assert "step_00000020.pt" in message and "the disk is full" in message
    assert f"the previous checkpoint {tmp_path / 'checkpoints' / 'step_00000010.pt'} is intact" in message


def _poison_after(step_to_poison):
    def callback(trainer, event, step):
        if event == "step_end" and step == step_to_poison:
            with torch.no_grad():
                trainer.model.depth.blocks[0].ffn.w_down.weight.fill_(float("nan"))

    return callback


def test_a_skipped_step_still_evaluates_checkpoints_and_logs_the_skip_count_and_the_sample_refuses(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = tiny_config(
        run,
        "trainer.max_steps=6",
        "trainer.checkpoint_every=2",
        "trainer.eval_every=2",
        "trainer.sample_tokens=8",
        "trainer.export_safetensors=false",
    )
    summary = Trainer(cfg, callbacks=(_poison_after(3),)).fit()  # steps 4, 5, 6 see NaN weights
    rows = read_metrics(run)
    assert [(r["step"], r["nonfinite_skipped"]) for r in rows if "loss" not in r and "nonfinite_skipped" in r] == [
        (4, 1),
        (5, 2),
        (6, 3),
    ]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 2, 4, 6]
    assert _names(run)[-2:] == ["step_00000004.pt", "step_00000006.pt"]
    assert summary["nonfinite_skipped"] == 3
    out = capsys.readouterr()
    assert "sample skipped: the model gives non-finite logits" in out.out + out.err
    assert not (run / "sample.txt").exists()
    from training.eval import sample

    assert sample.main([str(run), "--tokens", "4"]) == 2
    assert "non-finite logits" in capsys.readouterr().err
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 6
