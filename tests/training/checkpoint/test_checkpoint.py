"""Checkpoints: atomic keep-last-K, corrupt files rejected by name, resume falls back, config checks."""

import random

import numpy as np
import pytest
import torch

from training.checkpoint import files as ckpt


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((4,), value)}, "config": {"model": {"d_model": 8}}}


def test_save_keeps_last_k_and_points_latest_at_newest(tmp_path):
    for step in (10, 20, 30, 40):
        ckpt.save_checkpoint(tmp_path, step, _state(step), keep_last=2)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step_00000030.pt", "step_00000040.pt"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000040.pt"
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))  # no temp files left behind
    path, state = ckpt.find_resume_checkpoint(tmp_path)
    assert path.name == "step_00000040.pt" and state["step"] == 40


def test_truncated_checkpoint_is_rejected_by_name_and_resume_uses_previous(tmp_path):
    ckpt.save_checkpoint(tmp_path, 10, _state(1.0), keep_last=3)
    newest = ckpt.save_checkpoint(tmp_path, 20, _state(2.0), keep_last=3)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # truncated in the middle
    with pytest.raises(ckpt.CheckpointError, match=r"step_00000020\.pt is unreadable \(truncated or corrupt"):
        ckpt.load_checkpoint(newest)
    with pytest.warns(UserWarning, match="step_00000020.pt"):
        path, state = ckpt.find_resume_checkpoint(tmp_path)
    assert path.name == "step_00000010.pt"
    assert torch.equal(state["model"]["w"], torch.full((4,), 1.0))


def test_garbage_and_foreign_files_are_rejected(tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a zip file at all")
    with pytest.raises(ckpt.CheckpointError, match="garbage.pt"):
        ckpt.load_checkpoint(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ckpt.CheckpointError, match="not a checkpoint of this framework"):
        ckpt.load_checkpoint(foreign)
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "missing.pt")


def test_loading_never_executes_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format_version": ckpt.FORMAT_VERSION, "model": Evil()}, path)
    with pytest.raises(ckpt.CheckpointError, match="evil.pt"):
        ckpt.load_checkpoint(path)


def test_model_config_mismatch_names_the_keys(tmp_path):
    ckpt.save_checkpoint(tmp_path, 5, _state(0.0), keep_last=1)
    with pytest.raises(ckpt.CheckpointError, match=r"model.d_model: checkpoint has 8, config has 16"):
        ckpt.find_resume_checkpoint(tmp_path, {"d_model": 16})


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    ckpt.save_checkpoint(tmp_path, 1, {"model": {}, "rng": ckpt.rng_state()}, keep_last=1)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    _, state = ckpt.find_resume_checkpoint(tmp_path)
    ckpt.set_rng_state(state["rng"])
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2])


def test_safetensors_export_round_trip(tmp_path):
    from safetensors.torch import load_file

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    path = ckpt.export_safetensors(model, tmp_path / "m.safetensors")
    loaded = load_file(str(path))
    assert torch.equal(loaded["0.weight"], model[0].weight.detach())


def test_a_missing_resume_path_fails_before_the_run_folder_is_written(tmp_path):
    from tests.helpers import tiny_config
    from training.errors import CheckpointError
    from training.trainer import Trainer

    run_dir = tmp_path / "run"
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        Trainer(tiny_config(run_dir, f"trainer.resume={tmp_path / 'nope.pt'}"))
    assert not run_dir.exists()
