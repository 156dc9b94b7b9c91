"""Data preparation (all sources), shard caching, window sampling and eval batches."""

import copy
import json
import time

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from training.data.shards import (
    TokenData,
    check_seq_len,
    load_shard_tokenizer,
    prepare_data,
)
from training.data.windows import WindowSampler, iter_eval_batches

BASE = {
    "source": "embedded",
    "name": "shakespeare",
    "seq_len": 32,
    "val_fraction": 0.25,
    "cache_dir": None,
    "tokenizer": {"kind": "bytes", "vocab_size": 300, "name": None},
    "paths": [],
    "text_field": "text",
    "hf": {
        "path": None,
        "name": None,
        "split": "train",
        "data_files": None,
        "streaming": True,
        "max_docs": None,
        "max_bytes": 20000000,
    },
    "synthetic": {"task": "assoc_recall", "num_train": 400, "num_val": 50, "n_keys": 4, "modulus": 13},
}
DOCS = [f"Document {i}: " + " ".join(f"word{i}_{j}" for j in range(40)) + "\n" for i in range(8)]


def make_cfg(tmp_path, **overrides):
    cfg = copy.deepcopy(BASE)
    cfg["cache_dir"] = str(tmp_path / "cache")
    for key, value in overrides.items():
        if isinstance(value, dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return OmegaConf.create(cfg)


def write_corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n\n\n".join(DOCS))
    return path


def decode(data: TokenData, ids) -> str:
    return data.tokenizer.decode([int(i) for i in ids])


# ----------------------------------------------------------------------------- text sources


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_embedded_override_split_and_cache(tmp_path, kind):
    cfg = make_cfg(tmp_path, corpus_path=str(write_corpus(tmp_path)), tokenizer={"kind": kind})
    data = prepare_data(cfg, progress=False)
    train_text, val_text = decode(data, data.train), decode(data, data.val)
    # val is the last 25% of documents (2 of 8), joined by eos; train is the rest.
    eos = "<|endoftext|>"
    assert val_text == eos.join(d.strip("\n") for d in DOCS[6:])
    assert train_text == eos.join(d.strip("\n") for d in DOCS[:6])
    assert data.train.dtype == np.uint16 and data.train_mask is None and data.window_align == 1
    assert data.val_bytes_per_token == pytest.approx(sum(len(d.strip("\n")) for d in DOCS[6:]) / len(data.val))
    meta = data.cache_path / "meta.json"
    mtime = meta.stat().st_mtime_ns
    again = prepare_data(cfg, progress=False)
    assert again.cache_path == data.cache_path and meta.stat().st_mtime_ns == mtime
    assert np.array_equal(again.train, data.train) and np.array_equal(again.val, data.val)
    assert isinstance(again.train, np.memmap)
    assert load_shard_tokenizer(data.cache_path).encode("word1_2") == data.tokenizer.encode("word1_2")
    assert not list((tmp_path / "cache").glob(".tmp-*"))  # temp folders are cleaned up


def test_cache_key_changes_with_config(tmp_path):
    corpus = write_corpus(tmp_path)
    a = prepare_data(make_cfg(tmp_path, corpus_path=str(corpus)), progress=False)
    b = prepare_data(make_cfg(tmp_path, corpus_path=str(corpus), val_fraction=0.5), progress=False)
    assert a.cache_path != b.cache_path and len(b.val) > len(a.val)
    time.sleep(0.01)
    corpus.write_text("\n\n\n\n".join(DOCS[:4]))  # edited corpus -> new shards
    c = prepare_data(make_cfg(tmp_path, corpus_path=str(corpus)), progress=False)
    assert c.cache_path != a.cache_path and len(c.train) < len(a.train)


def test_interrupted_preparation_is_not_reused(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, corpus_path=str(write_corpus(tmp_path)))
    import training.data.shards as data_mod

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(data_mod, "_write_split", crash)
        with pytest.raises(KeyboardInterrupt):
            prepare_data(cfg, progress=False)
    assert not list((tmp_path / "cache").iterdir())
    assert len(prepare_data(cfg, progress=False).train) > 0


def test_single_document_splits_at_a_newline(tmp_path):
    lines = [f"line {i} of the only document" for i in range(100)]
    path = tmp_path / "one.txt"
    path.write_text("\n".join(lines))
    data = prepare_data(make_cfg(tmp_path, source="files", paths=[str(path)], val_fraction=0.1), progress=False)
    train_text, val_text = decode(data, data.train), decode(data, data.val)
    assert train_text + val_text == "\n".join(lines)
    assert train_text.endswith("\n") and val_text.startswith("line ")
    assert 0.05 < len(val_text) / len(train_text + val_text) < 0.15


def test_files_txt_jsonl_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "a.txt").write_text("plain text file\nsecond line")
    (folder / "b.jsonl").write_text(
        "\n".join(json.dumps({"text": f"json record {i}", "id": i}) for i in range(3)) + "\n"
    )
    table = pa.table({"text": ["parquet row 0", "parquet row 1"], "n": [0, 1]})
    pq.write_table(table, folder / "c.parquet")
    cfg = make_cfg(
        tmp_path,
        source="files",
        paths=[str(folder / "*.txt"), str(folder / "*.jsonl"), str(folder / "*.parquet")],
        val_fraction=0.3,
    )
    data = prepare_data(cfg, progress=False)
    everything = decode(data, data.train) + "<|endoftext|>" + decode(data, data.val)
    expected = [
        "plain text file\nsecond line",
        "json record 0",
        "json record 1",
        "json record 2",
        "parquet row 0",
        "parquet row 1",
    ]
    assert everything.split("<|endoftext|>") == expected
    assert decode(data, data.val).split("<|endoftext|>") == expected[-2:]  # last 30% of 6 documents


def test_files_errors(tmp_path):
    with pytest.raises(ValueError, match=r"nothing-here/\*\.txt.*matches no files"):
        prepare_data(make_cfg(tmp_path, source="files", paths=[str(tmp_path / "nothing-here/*.txt")]), progress=False)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"'\.csv'.*supported: \.txt, \.jsonl, \.parquet"):
        prepare_data(make_cfg(tmp_path, source="files", paths=[str(tmp_path / "*.csv")]), progress=False)
    (tmp_path / "d.jsonl").write_text(json.dumps({"content": "x", "id": 1}) + "\n")
    with pytest.raises(ValueError, match=r"text_field 'text' not found.*fields present: content, id"):
        prepare_data(make_cfg(tmp_path, source="files", paths=[str(tmp_path / "*.jsonl")]), progress=False)
    with pytest.raises(ValueError, match="embedded, files, hf, synthetic"):
        prepare_data(make_cfg(tmp_path, source="ftp"), progress=False)
    with pytest.raises(ValueError, match="bpe, bytes, hf"):
        prepare_data(make_cfg(tmp_path, tokenizer={"kind": "chars"}), progress=False)
    with pytest.raises(ValueError, match="unknown embedded corpus"):
        prepare_data(make_cfg(tmp_path, name="no_such_corpus"), progress=False)


@pytest.mark.parametrize("streaming", [True, False])
def test_hf_local_text_loader(tmp_path, streaming):
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(f"hf line number {i}" for i in range(20)) + "\n")
    hf = {"path": "text", "data_files": str(path), "streaming": streaming, "max_docs": 10}
    data = prepare_data(make_cfg(tmp_path, source="hf", hf=hf, val_fraction=0.2), progress=False)
    docs = (decode(data, data.train) + "<|endoftext|>" + decode(data, data.val)).split("<|endoftext|>")
    assert docs == [f"hf line number {i}" for i in range(10)]  # max_docs stops after 10
    limited = prepare_data(
        make_cfg(tmp_path, source="hf", hf={**hf, "max_docs": None, "max_bytes": 50}), progress=False
    )
    assert 50 <= len(limited.train) + len(limited.val) < 80  # stops once 50 bytes are read


# -------------------------------------------------------------------------------- synthetic


def test_assoc_recall_masks_only_answers(tmp_path):
    cfg = make_cfg(tmp_path, source="synthetic")
    data = prepare_data(cfg, progress=False)
    assert data.val_bytes_per_token == 1.0 and data.window_align == cfg.seq_len
    words = decode(data, data.train).split()
    assert data.train_mask.sum() == 400 and data.val_mask.sum() == 50
    for position in np.flatnonzero(np.asarray(data.train_mask))[:25]:
        assert words[position] == "->"
        query, answer = words[position - 1], words[position + 1]
        start = position - 2 - 2 * 4  # the 4 key/value pairs of this example
        pairs = dict(zip(words[start : position - 2 : 2], words[start + 1 : position - 2 : 2]))
        assert len(pairs) == 4 and pairs[query] == answer
    assert not np.array_equal(data.train[: len(data.val)], data.val)
    again = prepare_data(cfg, progress=False)
    assert again.cache_path == data.cache_path and np.array_equal(again.train, data.train)


def test_mod_add_masks_only_answers(tmp_path):
    data = prepare_data(make_cfg(tmp_path, source="synthetic", synthetic={"task": "mod_add"}), progress=False)
    words = decode(data, data.val).split()
    scored = np.flatnonzero(np.asarray(data.val_mask))
    assert len(scored) == 50
    for position in scored:
        a, plus, b, equals, c = words[position - 3 : position + 2]
        assert (plus, equals) == ("+", "=") and int(c) == (int(a) + int(b)) % 13
    train_words = decode(data, data.train).split()
    train_pairs = {tuple(train_words[p - 3 : p]) for p in np.flatnonzero(np.asarray(data.train_mask))}
    val_pairs = {tuple(words[p - 3 : p]) for p in scored}
    assert not train_pairs & val_pairs  # val pairs are held out


def test_synthetic_windows_hold_whole_examples(tmp_path):
    data = prepare_data(make_cfg(tmp_path, source="synthetic"), progress=False)
    sampler = WindowSampler(data.train, data.train_mask, 32, 8, seed=0, align=data.window_align)
    x, y = sampler.get_batch(3)
    for row_x, row_y in zip(x, y):
        text = data.tokenizer.decode(row_x.tolist())
        assert text.startswith("k")  # windows start at an example boundary
        scored = (row_y != -100).nonzero().flatten()
        assert len(scored) == 32 // 13  # 13-token examples, two per 32-token block
        assert all(data.tokenizer.decode([int(row_x[i])]) == "->" for i in scored)


# ------------------------------------------------------------------------- sampling and eval


def test_window_sampler():
    tokens = np.arange(1000, dtype=np.uint16)
    mask = (np.arange(1000) % 3 == 0).astype(np.uint8)
    sampler = WindowSampler(tokens, mask, seq_len=16, batch_size=4, seed=7)
    x, y = sampler.get_batch(5, micro_step=1)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    x2, y2 = WindowSampler(tokens, mask, 16, 4, seed=7).get_batch(5, micro_step=1)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, sampler.get_batch(6, 1)[0]) and not torch.equal(x, sampler.get_batch(5, 0)[0])
    assert not torch.equal(x, WindowSampler(tokens, mask, 16, 4, seed=8).get_batch(5, 1)[0])
    scored = mask[x.numpy()].astype(bool)  # token value == position here
    assert torch.equal(y[torch.from_numpy(scored)], x[torch.from_numpy(scored)] + 1)
    assert (y[torch.from_numpy(~scored)] == -100).all()
    plain_x, plain_y = WindowSampler(tokens, None, 16, 4, seed=7).get_batch(5, 1)
    assert torch.equal(plain_y[:, :-1], plain_x[:, 1:]) and torch.equal(plain_y, plain_x + 1)

    state = sampler.state_dict()
    assert state == {"seed": 7, "seq_len": 16, "batch_size": 4, "align": 1, "position": 5}
    json.dumps(state)
    resumed = WindowSampler(tokens, mask, 16, 4, seed=0)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.get_batch(9)[0], sampler.get_batch(9)[0])
    with pytest.raises(ValueError, match="seq_len=16.*seq_len=32"):
        WindowSampler(tokens, mask, 32, 4, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size=4.*batch_size=2"):
        WindowSampler(tokens, mask, 16, 2, seed=7).load_state_dict(state)


def test_iter_eval_batches():
    tokens = np.arange(100, dtype=np.uint16)
    batches = list(iter_eval_batches(tokens, None, seq_len=10, batch_size=4, max_batches=None))
    assert [b[0].shape[0] for b in batches] == [4, 4, 1]  # 9 windows of 11 tokens, stride 10
    x = torch.cat([b[0] for b in batches])
    assert torch.equal(x[:, 0], torch.arange(0, 90, 10)) and torch.equal(batches[0][1], batches[0][0] + 1)
    assert len(list(iter_eval_batches(tokens, None, 10, 4, max_batches=2))) == 2
    again = list(iter_eval_batches(tokens, None, 10, 4, None))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))


def test_check_seq_len(tmp_path):
    data = prepare_data(make_cfg(tmp_path, corpus_path=str(write_corpus(tmp_path))), progress=False)
    n_val = len(data.val)
    check_seq_len(data, n_val - 1)
    message = (
        f"data.seq_len={n_val} is longer than the validation split ({n_val} tokens); "
        f"use data.seq_len <= {n_val - 1} or a larger data.val_fraction"
    )
    with pytest.raises(ValueError) as info:
        check_seq_len(data, n_val)
    assert str(info.value) == message


# ---------------------------------------------------------------------------- real corpus


def test_embedded_shakespeare_bytes(tmp_path):
    start = time.perf_counter()
    data = prepare_data(make_cfg(tmp_path, val_fraction=0.05), progress=False)
    assert time.perf_counter() - start < 10
    assert len(data.train) > 4_500_000 and len(data.val) > 100_000
    assert json.loads((data.cache_path / "meta.json").read_text())["documents"] == [40, 2]
    assert decode(data, data.train[:25]) == "ALL'S WELL THAT ENDS WELL"
    assert decode(data, data.val[:27]) == "THE TWO GENTLEMEN OF VERONA"


def test_embedded_shakespeare_bpe(tmp_path):
    """Full-corpus BPE training takes about 3 s on 2 cores."""
    cfg = make_cfg(tmp_path, val_fraction=0.05, tokenizer={"kind": "bpe", "vocab_size": 2048})
    data = prepare_data(cfg, progress=False)
    assert data.tokenizer.vocab_size == 2048
    assert 2.5 < data.val_bytes_per_token < 3.5 and 1_000_000 < len(data.train) < 2_500_000
    sample = "O Romeo, Romeo! wherefore art thou Romeo?\n"
    assert data.tokenizer.decode(data.tokenizer.encode(sample)) == sample
    start = time.perf_counter()
    again = prepare_data(cfg, progress=False)
    assert time.perf_counter() - start < 1.0 and again.cache_path == data.cache_path
