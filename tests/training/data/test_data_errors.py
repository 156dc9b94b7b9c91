"""Bad data is named, never trained on (issue 20, items 2 and 6): source files, token shards, the cache.

Sources: binary, non-UTF-8, bad JSONL, empty files and unmatched globs name the file (and line).
Shards: meta.json records each file's sha256 / size and the id range; a truncated, zeroed,
out-of-vocabulary or meta-less folder is rebuilt from the source, or refused by name when opened
without one. A killed writer's temp folder is swept; a full disk names the path.
"""

import errno
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from omegaconf import OmegaConf

from tests.training.data.test_data import DOCS, make_cfg, write_corpus
from training.data import cache as cache_mod
from training.data.errors import DataError
from training.data.shards import ShardError, open_shards, prepare_data
from training.data.tokenizer import (
    MAX_TRAIN_WORD_CHARS,
    build_tokenizer,
    training_pieces,
)


def _files_cfg(tmp_path, *paths, **overrides):
    return make_cfg(tmp_path, source="files", paths=[str(p) for p in paths], **overrides)


# --------------------------------------------------------------------------------- sources


def test_binary_file_is_named_with_its_line(tmp_path):
    path = tmp_path / "image.txt"
    path.write_bytes(b"first line\nsecond\x00\x01\x02 line\n")
    with pytest.raises(DataError, match=rf"{path}:2: looks binary \(NUL byte at offset 17\)"):
        prepare_data(_files_cfg(tmp_path, path), progress=False)


def test_non_utf8_file_is_named_with_line_and_column(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("line one\nline two\ncaf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(DataError, match=rf"{path}:3: not UTF-8 \(byte 0xe9 at column 4"):
        prepare_data(_files_cfg(tmp_path, path), progress=False)


def test_non_utf8_jsonl_is_named(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: not UTF-8"):
        prepare_data(_files_cfg(tmp_path, path), progress=False)


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"}\n{"text": "three",\n')
    with pytest.raises(DataError, match=rf"{path}:4: not valid JSON"):
        prepare_data(_files_cfg(tmp_path, path), progress=False)


@pytest.mark.parametrize("name, content", [("empty.txt", b""), ("blank.txt", b"\n  \n"), ("empty.jsonl", b"\n")])
def test_empty_file_is_named(tmp_path, name, content):
    good = write_corpus(tmp_path)
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"{path}: empty file"):
        prepare_data(_files_cfg(tmp_path, good, path), progress=False)


def test_unreadable_parquet_is_named(tmp_path):
    path = tmp_path / "table.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=rf"{path}: not a readable parquet file"):
        prepare_data(_files_cfg(tmp_path, path), progress=False)


def test_missing_glob_is_named(tmp_path):
    with pytest.raises(DataError, match=r"data.paths glob '.*/nothing/\*.txt' matches no files"):
        prepare_data(_files_cfg(tmp_path, tmp_path / "nothing" / "*.txt"), progress=False)


# ------------------------------------------------------------------------------ tokenizer


def test_training_pieces_cut_only_long_runs():
    text = "short words " + "x" * (2 * MAX_TRAIN_WORD_CHARS + 5) + " tail"
    pieces = list(training_pieces(text))
    assert "".join(pieces) == text
    assert max(len(run) for piece in pieces for run in piece.split()) <= MAX_TRAIN_WORD_CHARS
    assert list(training_pieces("no long words here")) == ["no long words here"]


def test_bpe_training_on_a_2mb_line_without_whitespace_takes_seconds(tmp_path):
    """Uncut, this line kept BPE training busy for more than 300 s."""
    docs = DOCS + ["z" * 2_000_000, "".join(chr(ord("a") + i % 26) for i in range(1_000_000))]
    start = time.perf_counter()
    tok = build_tokenizer({"kind": "bpe", "vocab_size": 400}, lambda: docs, tmp_path, corpus_id="long-line")
    elapsed = time.perf_counter() - start
    assert elapsed < 30, f"BPE training took {elapsed:.1f} s"
    assert tok.decode(tok.encode(DOCS[0])) == DOCS[0]


def test_bpe_training_shows_progress(tmp_path, capsys):
    build_tokenizer({"kind": "bpe", "vocab_size": 300}, lambda: DOCS, tmp_path, corpus_id="progress", progress=True)
    assert "training BPE tokenizer" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- shards


def _prepared(tmp_path, **overrides):
    cfg = make_cfg(tmp_path, corpus_path=str(write_corpus(tmp_path)), **overrides)
    return cfg, prepare_data(cfg, progress=False)


def test_meta_records_checksums_and_id_range(tmp_path):
    _, data = _prepared(tmp_path)
    meta = json.loads((data.cache_path / "meta.json").read_text())
    for name in ("train.bin", "val.bin"):
        assert meta["files"][name]["bytes"] == (data.cache_path / name).stat().st_size
        assert len(meta["files"][name]["sha256"]) == 64
    train = np.asarray(data.train)
    assert meta["id_range"]["train"] == [int(train.min()), int(train.max())]
    assert meta["vocab_size"] == data.tokenizer.vocab_size == 257


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-7])


def _zero(path):
    path.write_bytes(bytes(path.stat().st_size))


def _out_of_vocab(path):
    tokens = np.fromfile(path, dtype=np.uint16)
    tokens[len(tokens) // 2] = 60000  # >= the 257-token byte vocabulary
    tokens.tofile(path)


@pytest.mark.parametrize(
    "damage, refusal",
    [
        (_truncate, r"train.bin: \d+ bytes, meta.json records \d+ \(truncated"),
        (_zero, r"train.bin: sha256 does not match meta.json"),
        (_out_of_vocab, r"train.bin: token id 60000 at position \d+ is outside the vocabulary \[0, 257\)"),
        (lambda path: (path.parent / "meta.json").unlink(), r"meta.json: missing"),
        (lambda path: (path.parent / "meta.json").write_text("{not json"), r"meta.json: unreadable"),
    ],
    ids=["truncated", "zeroed", "out-of-vocabulary", "no-meta", "bad-meta"],
)
def test_a_damaged_shard_is_refused_by_name_and_rebuilt_from_the_source(tmp_path, capsys, damage, refusal):
    cfg, data = _prepared(tmp_path)
    folder, good = data.cache_path, np.asarray(data.train).copy()
    del data
    damage(folder / "train.bin")
    with pytest.raises(ShardError, match=refusal):  # opened without a source: refused, never read
        open_shards(folder)
    rebuilt = prepare_data(cfg, progress=False)  # with the source: named, then rebuilt
    assert "rebuilding" in capsys.readouterr().err
    assert rebuilt.cache_path == folder
    np.testing.assert_array_equal(np.asarray(rebuilt.train), good)
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []


def test_a_bpe_shard_folder_with_a_damaged_tokenizer_is_rebuilt(tmp_path, capsys):
    cfg, data = _prepared(tmp_path, tokenizer={"kind": "bpe", "vocab_size": 300})
    folder, good = data.cache_path, np.asarray(data.train).copy()
    meta = json.loads((folder / "meta.json").read_text())
    assert "tokenizer.json" in meta["files"]
    (folder / "tokenizer.json").write_text((folder / "tokenizer.json").read_text().replace('"', "'", 3))
    with pytest.raises(ShardError, match=r"tokenizer.json: sha256 does not match"):
        open_shards(folder)
    np.testing.assert_array_equal(np.asarray(prepare_data(cfg, progress=False).train), good)
    assert "rebuilding" in capsys.readouterr().err


def test_stale_temp_folders_of_killed_writers_are_swept(tmp_path):
    cfg, data = _prepared(tmp_path)
    cache = data.cache_path.parent
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead_pid = int(dead.stdout)  # a process that has exited
    stale = cache / f".tmp-files-0123-{cache_mod._HOST}-{dead_pid}"
    (stale / "sub").mkdir(parents=True)
    (stale / "train.bin").write_bytes(b"\0" * 100)
    stale_tok = cache / "tokenizers" / f".bpe300-x.json-{cache_mod._HOST}-{dead_pid}.tmp"
    stale_tok.parent.mkdir(exist_ok=True)
    stale_tok.write_text("{}")
    live = cache / f".tmp-files-4567-{cache_mod._HOST}-{os.getpid()}"  # a writer still running: kept
    live.mkdir()
    old_other_host = cache / ".tmp-files-89ab-otherhost-1"
    old_other_host.mkdir()
    os.utime(old_other_host, (time.time() - 2 * cache_mod.STALE_TEMP_SECONDS,) * 2)
    prepare_data(cfg, progress=False)
    assert not stale.exists() and not stale_tok.exists() and not old_other_host.exists()
    assert live.exists()


def test_sigkill_during_tokenisation_leaves_no_temp_folder_after_the_next_start(tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("some words to tokenize slowly\n" * 200_000)
    cfg = _files_cfg(tmp_path, big, tokenizer={"kind": "bpe", "vocab_size": 300})  # BPE: seconds to kill it in
    code = (
        "from omegaconf import OmegaConf; from training.data.shards import prepare_data; "
        f"prepare_data(OmegaConf.create({OmegaConf.to_container(cfg)!r}), progress=False)"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    cache = tmp_path / "cache"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and not any(cache.glob(".tmp-*")):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert any(cache.glob(".tmp-*")), "the writer was killed before it created its temp folder"
    prepare_data(make_cfg(tmp_path, corpus_path=str(write_corpus(tmp_path))), progress=False)  # any next start
    assert not list(cache.glob(".tmp-*"))


def test_disk_full_while_writing_a_shard_names_the_path(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, corpus_path=str(write_corpus(tmp_path)))
    real_write = cache_mod.ShardWriter.write
    calls = {"n": 0}

    def full_disk(self, ids):
        calls["n"] += 1
        if calls["n"] > 3:
            with cache_mod.writing(self.path):
                raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, ids)

    monkeypatch.setattr(cache_mod.ShardWriter, "write", full_disk)
    with pytest.raises(DataError, match=r"cannot write .*/\.tmp-[^/]+/train\.bin: No space left on device \[ENOSPC\]"):
        prepare_data(cfg, progress=False)
    assert list((tmp_path / "cache").iterdir()) == [], "a partial shard folder was kept"
    monkeypatch.undo()
    assert len(prepare_data(cfg, progress=False).train) > 0  # space back: builds normally
