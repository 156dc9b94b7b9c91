"""Hostile and corrupted checkpoints through every entry point: no code runs, each refusal names the file.

A code-running pickle is planted in each file a checkpoint consists of (a sharded folder's
``.metadata``, ``extra.pt`` and ``.distcp`` shard; a single ``.pt`` file), with the folder's
``manifest.json`` rewritten to match, so that the checksum does not hide the unpickling defence.
Every entry point must refuse, name the file, and leave the marker the payload would create absent.
"""

import contextlib
import dataclasses
import io
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_config
from training.checkpoint import files as ckpt
from training.checkpoint import integrity
from training.checkpoint.safe_pickle import MetadataUnpickler, read_metadata
from training.errors import CheckpointError
from training.trainer import Trainer, train

ROOT = Path(__file__).resolve().parents[3]
COMMON = [
    "trainer.max_steps=2",
    "trainer.checkpoint_every=2",
    "trainer.eval_every=2",
    "trainer.sample_tokens=0",
    "trainer.keep_last=1",
]
DCP = ["trainer.checkpoint_format=dcp"]


class Payload:
    """Unpickling this runs ``open(marker, 'w')``: the proof that a loader executed checkpoint code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    train(tiny_config(base / "pt", *COMMON))
    train(tiny_config(base / "dcp", *COMMON, *DCP))
    return base


def _reseal(folder: Path) -> None:
    """What an attacker (or a careless copy) would do: a manifest that matches the planted files."""
    (folder / integrity.MANIFEST).write_bytes(integrity.manifest_of(folder, 2, ckpt.FORMAT_VERSION))


def plant_metadata(folder: Path, marker: Path) -> Path:
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    _reseal(folder)
    return folder / ".metadata"


def plant_extra(folder: Path, marker: Path) -> Path:
    torch.save({"format_version": ckpt.FORMAT_VERSION, "step": 2, "evil": Payload(marker)}, folder / "extra.pt")
    _reseal(folder)
    return folder / "extra.pt"


def plant_distcp(folder: Path, marker: Path) -> Path:
    """Every item of the shard file becomes a torch.save'd payload; the metadata's offsets are rewritten to match."""
    metadata = read_metadata(folder)
    evil = io.BytesIO()
    torch.save(Payload(marker), evil)
    blob, offset, storage = b"", 0, {}
    for index, info in sorted(metadata.storage_data.items(), key=lambda kv: kv[1].offset):
        storage[index] = dataclasses.replace(info, offset=offset, length=len(evil.getvalue()))
        blob += evil.getvalue()
        offset += len(evil.getvalue())
    metadata.storage_data = storage
    shard = next(folder.glob("*.distcp"))
    shard.write_bytes(blob)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    _reseal(folder)
    return shard


def plant_pt(path: Path, marker: Path) -> Path:
    torch.save({"format_version": ckpt.FORMAT_VERSION, "step": 2, "model": Payload(marker), "config": {}}, path)
    return path


PLANTS = {
    "dcp .metadata": ("dcp", plant_metadata),
    "dcp extra.pt": ("dcp", plant_extra),
    "dcp .distcp": ("dcp", plant_distcp),
    "single .pt": ("pt", plant_pt),
}


def _refusal(fn) -> str:
    """Run an entry point; return its error text (CheckpointError message or stderr of a CLI exit 2)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            rc = fn()
        except CheckpointError as e:
            return str(e)
        except SystemExit as e:
            assert e.code not in (0, None), f"exited {e.code}"
            return err.getvalue()
    assert rc not in (0, None), f"returned {rc}: {err.getvalue()}"
    return err.getvalue()


def _entry_points(run: Path, planted_ckpt: Path, tmp_path: Path, overrides: list[str]):
    from recipes.merge import merge
    from training.checkpoint import sharded
    from training.eval import sample
    from training.export import hf

    def resume_auto_latest():
        Trainer(tiny_config(run, *overrides))

    def resume_auto_fallback():  # a garbage `latest`: discovery falls back to the planted checkpoint
        (run / "checkpoints" / "latest").write_bytes(b"\xff\xfe\x00garbage")
        Trainer(tiny_config(run, *overrides))

    def resume_path():
        Trainer(tiny_config(tmp_path / "other", *overrides, f"trainer.resume={planted_ckpt}"))

    def evaluate_cli():
        proc = subprocess.run(
            [sys.executable, "evaluate.py", f"ckpt={run}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        sys.stderr.write(proc.stderr)
        return proc.returncode

    return {
        "resume=auto (latest names it)": resume_auto_latest,
        "resume=auto (falls back to it)": resume_auto_fallback,
        "resume=<path>": resume_path,
        "sample <run>": lambda: sample.main([str(run), "--tokens", "4"]),
        "sample <checkpoint>": lambda: sample.main([str(planted_ckpt), "--tokens", "4"]),
        "evaluate.py": evaluate_cli,
        "export.hf": lambda: hf.main([str(run), str(tmp_path / "hf")]),
        "sharded consolidate": lambda: sharded.main(
            ["consolidate", str(planted_ckpt), str(tmp_path / "c.safetensors")]
        ),
        "merge": lambda: merge.main(["--base", str(run), "--sources", str(run), "--out", str(tmp_path / "merged")]),
    }


@pytest.mark.slow
@pytest.mark.parametrize("plant", list(PLANTS))
def test_planted_code_never_runs_and_every_entry_point_names_the_file(runs, tmp_path, plant):
    kind, planter = PLANTS[plant]
    overrides = [*COMMON, *(DCP if kind == "dcp" else [])]
    marker, run = tmp_path / "pwned", tmp_path / kind
    planted_ckpt = run / "checkpoints" / ckpt.list_checkpoints(runs / kind)[-1].name
    for name, entry in _entry_points(run, planted_ckpt, tmp_path, overrides).items():
        for stale in (run, tmp_path / "other"):  # each entry point gets an untouched copy
            shutil.rmtree(stale, ignore_errors=True)
        shutil.copytree(runs / kind, run)
        planted_file = planter(planted_ckpt, marker)
        message = _refusal(entry)
        assert not marker.exists(), f"{name}: the planted payload ran"
        assert str(planted_file) in message, f"{name} did not name {planted_file}: {message[-600:]}"


def test_the_safe_loader_still_reads_every_legitimate_checkpoint(runs, tmp_path, capsys):
    """The defences refuse only what is wrong: sampling, consolidation and export work on both kinds."""
    from safetensors.torch import load_file

    from training.checkpoint import sharded
    from training.eval import sample
    from training.eval.loss import load_trained

    folder = ckpt.list_checkpoints(runs / "dcp")[-1]
    for target in (runs / "pt", runs / "dcp", folder, ckpt.list_checkpoints(runs / "pt")[-1]):
        assert sample.main([str(target), "--tokens", "4", "--prompt", "AB"]) == 0, capsys.readouterr().err
        assert capsys.readouterr().out.startswith("AB")
    sharded.main(["consolidate", str(folder), str(tmp_path / "c.safetensors")])
    consolidated, exported = (
        load_file(str(tmp_path / "c.safetensors")),
        load_file(str(runs / "dcp" / "model.safetensors")),
    )
    assert all(torch.equal(consolidated[name], tensor) for name, tensor in exported.items())
    model, *_ = load_trained(folder, "cpu")
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in exported.items())


def test_the_metadata_unpickler_admits_dcp_metadata_and_refuses_other_globals(runs):
    folder = ckpt.list_checkpoints(runs / "dcp")[-1]
    metadata = read_metadata(folder)
    assert "model.embed.weight" in metadata.state_dict_metadata
    for evil in (pickle.dumps(print), pickle.dumps(Payload(Path("/nonexistent/x"))), pickle.dumps(shutil.rmtree)):
        with pytest.raises(pickle.UnpicklingError, match="is not allowed in DCP metadata"):
            MetadataUnpickler(io.BytesIO(evil)).load()


def _flip_in_tensor_bytes(path: Path, tensor: torch.Tensor) -> None:
    data = bytearray(path.read_bytes())
    at = data.find(tensor.detach().contiguous().numpy().tobytes()[:64])
    assert at >= 0, "tensor bytes not found in the file"
    data[at + 13] ^= 0x10  # one bit of one weight
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["pt", "dcp"])
def test_a_flipped_bit_in_tensor_data_is_named_and_resume_falls_back(tmp_path, kind):
    run = tmp_path / "run"
    overrides = [
        "trainer.max_steps=4",
        "trainer.checkpoint_every=2",
        "trainer.eval_every=2",
        "trainer.sample_tokens=0",
        "trainer.export_safetensors=false",
        *(DCP if kind == "dcp" else []),
    ]
    trainer = Trainer(tiny_config(run, *overrides))
    trainer.fit()
    older, newest = ckpt.list_checkpoints(run)[-2:]
    weight = trainer.model.depth.blocks[0].ffn.w_down.weight
    target = newest if kind == "pt" else next(newest.glob("*.distcp"))
    _flip_in_tensor_bytes(target, weight)
    with pytest.raises(CheckpointError, match=rf"{target}.* failed its checksum"):
        ckpt.load_checkpoint(newest)
    with pytest.warns(UserWarning, match=rf"{target}.* failed its checksum"):
        resumed = Trainer(tiny_config(run, *overrides, "trainer.max_steps=6"))
    assert resumed.step == 2 and resumed.last_checkpoint == older
