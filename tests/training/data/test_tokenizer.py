"""Tokenizers: exact round trips, the BPE cache, and clear errors."""

import pytest

from training.data import tokenizer as tokmod
from training.data.tokenizer import (
    BytesTokenizer,
    build_tokenizer,
    load_hf_tokenizer,
    tokenizer_from_spec,
)

TRICKY = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\r\nCRLF",
    "unicode: café naïve — “quotes” 日本語 emoji 🙂👍🏽 ∑∫",
    "",
    " ",
    "\n",
    "<|endoftext|> literal",
]
TRAINING = ["To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"] * 30


def bpe_cfg(vocab_size=300):
    return {"kind": "bpe", "vocab_size": vocab_size, "name": None}


def test_bytes_round_trip_and_vocab():
    tok = BytesTokenizer()
    assert tok.vocab_size == 257 and tok.eos_id == 256 and tok.name == "bytes"
    for text in TRICKY:
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == text
    assert tok.decode(tok.encode("a") + [256] + tok.encode("b")) == "a<|endoftext|>b"


def test_bpe_round_trip_on_tricky_text(tmp_path):
    tok = build_tokenizer(bpe_cfg(), lambda: iter(TRAINING), tmp_path)
    assert tok.vocab_size <= 300 and tok.eos_id is not None
    assert tok.name.startswith("bpe300-")
    for text in TRICKY + ["".join(TRICKY)]:
        assert tok.decode(tok.encode(text)) == text, repr(text)
    # Merges learned from the training text compress it below one token per byte.
    sample = TRAINING[0]
    assert len(tok.encode(sample)) < len(sample.encode()) / 2


def test_bpe_cache_hit_does_not_retrain(tmp_path, monkeypatch):
    first = build_tokenizer(bpe_cfg(), lambda: iter(TRAINING), tmp_path, corpus_id="abc123")
    cache_file = tmp_path / "tokenizers" / f"{first.name}.json"
    assert cache_file.exists()
    mtime = cache_file.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been loaded")

    def no_text():
        raise AssertionError("the training text should not be read on a cache hit")

    monkeypatch.setattr(tokmod, "_train_bpe", no_training)
    second = build_tokenizer(bpe_cfg(), no_text, tmp_path, corpus_id="abc123")
    assert second.name == first.name and cache_file.stat().st_mtime_ns == mtime
    assert second.encode("to be or not") == first.encode("to be or not")
    # Another vocab size or corpus is another cache entry.
    with pytest.raises(AssertionError, match="cached tokenizer"):
        build_tokenizer(bpe_cfg(400), lambda: iter(TRAINING), tmp_path, corpus_id="abc123")


def test_bpe_corpus_id_defaults_to_text_hash(tmp_path):
    a = build_tokenizer(bpe_cfg(), lambda: iter(TRAINING), tmp_path)
    b = build_tokenizer(bpe_cfg(), lambda: iter(TRAINING + ["other text"]), tmp_path)
    assert a.name != b.name


def test_spec_round_trip(tmp_path):
    tok = build_tokenizer(bpe_cfg(), lambda: iter(TRAINING), tmp_path)
    path = tmp_path / "tok.json"
    path.write_text(tok.to_json())
    rebuilt = tokenizer_from_spec(tok.spec(), path)
    assert rebuilt.name == tok.name and rebuilt.encode(TRICKY[3]) == tok.encode(TRICKY[3])
    assert tokenizer_from_spec(BytesTokenizer().spec()).name == "bytes"


def test_hf_tokenizer_from_local_file_and_offline_error(tmp_path):
    trained = build_tokenizer(bpe_cfg(), lambda: iter(TRAINING), tmp_path)
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "tokenizer.json").write_text(trained.to_json())
    tok = build_tokenizer({"kind": "hf", "name": str(tmp_path / "local")}, lambda: iter(()), tmp_path)
    assert tok.name.startswith("hf-") and tok.decode(tok.encode(TRICKY[2])) == TRICKY[2]
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        load_hf_tokenizer("no-such-org/no-such-tokenizer-xyz")


def test_unknown_kind_and_small_vocab(tmp_path):
    with pytest.raises(ValueError, match="bpe, bytes, hf"):
        build_tokenizer({"kind": "wordpiece"}, lambda: iter(()), tmp_path)
    with pytest.raises(ValueError, match="too small"):
        build_tokenizer(bpe_cfg(100), lambda: iter(TRAINING), tmp_path)
    with pytest.raises(ValueError, match="tokenizer.name"):
        build_tokenizer({"kind": "hf", "name": None}, lambda: iter(()), tmp_path)
