"""Tokenizers: byte-level BPE (trained and cached), raw bytes, Hugging Face, and fixed vocabularies.

Every tokenizer has `vocab_size`, `eos_id` (the id placed between documents, or None), a short
`name` that identifies it in cache keys, and `encode(str) -> list[int]` / `decode(list[int]) -> str`.
`spec()` returns a plain dict from which `tokenizer_from_spec` rebuilds the same tokenizer (it is
stored in each shard's meta.json, so a checkpoint sampler needs no training text).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from training.data.cache import temp_name, writing
from training.data.errors import SourceUnavailable

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_KINDS = ("bpe", "bytes", "hf")


def _cfg_get(cfg, key: str, default=None):
    """Read `key` from a DictConfig or a plain dict (None-safe)."""
    if cfg is None:
        return default
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


class Tokenizer:
    """Protocol shared by all tokenizers (see module docstring)."""

    vocab_size: int
    eos_id: int | None
    name: str

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of `text` as a 1-D int64 array (subclasses override when they can skip lists)."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def spec(self) -> dict:
        """Plain-dict description for `tokenizer_from_spec`."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class BytesTokenizer(Tokenizer):
    """Raw UTF-8 bytes: ids 0..255, plus eos = 256 (vocab 257)."""

    vocab_size = 257
    eos_id = 256
    name = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        # Split at eos so a multi-byte character is never glued across a document boundary.
        parts, current = [], bytearray()
        for i in ids:
            if int(i) == self.eos_id:
                parts.append(current.decode("utf-8", errors="replace"))
                current = bytearray()
            else:
                current.append(int(i))
        parts.append(current.decode("utf-8", errors="replace"))
        return EOS_TOKEN.join(parts)

    def spec(self) -> dict:
        return {"kind": "bytes"}


class HFTokenizer(Tokenizer):
    """Wraps a `tokenizers.Tokenizer` (our trained BPE, or one from the Hugging Face hub / a local path)."""

    def __init__(self, backend, name: str, spec: dict):
        self._backend = backend
        self.name = name
        self._spec = spec
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.eos_id = _find_eos_id(backend)

    def encode(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_json(self) -> str:
        return self._backend.to_str()

    def spec(self) -> dict:
        return dict(self._spec)


class FixedVocabTokenizer(Tokenizer):
    """Whitespace-separated words from a fixed list (synthetic tasks); decode gives e.g. "k3 v7 ? k3 -> v7 ."."""

    def __init__(self, words: Sequence[str], eos: str, name: str, spec: dict | None = None):
        self.words = list(words)
        self._index = {w: i for i, w in enumerate(self.words)}
        if len(self._index) != len(self.words):
            raise ValueError("FixedVocabTokenizer words must be unique")
        self.vocab_size = len(self.words)
        self.eos_id = self._index[eos]
        self.name = name
        self._spec = spec or {"kind": "fixed", "words": self.words, "eos": eos, "name": name}

    def token_id(self, word: str) -> int:
        return self._index[word]

    def encode(self, text: str) -> list[int]:
        try:
            return [self._index[w] for w in text.split()]
        except KeyError as err:
            raise ValueError(f"{err.args[0]!r} is not in the {self.name} vocabulary") from None

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.words[int(i)] for i in ids)

    def spec(self) -> dict:
        return dict(self._spec)


def _find_eos_id(backend) -> int | None:
    for token in (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "[SEP]"):
        token_id = backend.token_to_id(token)
        if token_id is not None:
            return token_id
    return None


# ----------------------------------------------------------------------------------------- BPE

# BPE training cost grows with the square of a word's length: one 2 MB run without whitespace kept
# training busy for more than 300 s. So for *training only* a run of non-whitespace characters is cut
# into pieces of at most MAX_TRAIN_WORD_CHARS (each piece its own training text, so merges never
# span a cut). Encoding still sees the whole text: decode(encode(s)) == s is unaffected.
MAX_TRAIN_WORD_CHARS = 256
_LONG_RUN = re.compile(rf"\S{{{MAX_TRAIN_WORD_CHARS}}}")


def training_pieces(text: str) -> Iterator[str]:
    """`text` cut after every MAX_TRAIN_WORD_CHARS characters of an unbroken non-whitespace run."""
    start = 0
    for match in _LONG_RUN.finditer(text):
        yield text[start : match.end()]
        start = match.end()
    if start < len(text):
        yield text[start:]


def _bounded(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        yield from training_pieces(text)


def _train_bpe(texts: Iterable[str], vocab_size: int, progress: bool = False):
    """Train a byte-level BPE (ByteLevel pre-tokenizer and decoder, so decode(encode(s)) == s).

    Words longer than MAX_TRAIN_WORD_CHARS are cut for training (bounded time on pathological lines).
    """
    from tokenizers import Tokenizer as _Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from tqdm.auto import tqdm

    backend = _Backend(models.BPE())
    # add_prefix_space=False keeps the text unchanged; use_regex keeps GPT-2's word splitting.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        # The full 256-byte alphabet guarantees every string is encodable, even unseen characters.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    total = len(texts) if hasattr(texts, "__len__") else None
    reading = tqdm(texts, total=total, desc="training BPE tokenizer: reading", unit="doc", disable=not progress)
    backend.train_from_iterator(_bounded(reading), trainer=trainer)  # then tokenizers' own bar shows merges
    reading.close()
    return backend


def _text_hash(texts: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def bpe_name(vocab_size: int, corpus_id: str) -> str:
    """Cache identity of a BPE tokenizer: vocab size + the identity of its training corpus."""
    return f"bpe{vocab_size}-{corpus_id[:12]}"


def tokenizer_name(tok_cfg, corpus_id: str) -> str:
    """The `name` `build_tokenizer` will give, computed without building (for shard cache keys)."""
    kind = _cfg_get(tok_cfg, "kind", "bpe")
    if kind == "bpe":
        return bpe_name(int(_cfg_get(tok_cfg, "vocab_size", 2048)), corpus_id)
    if kind == "bytes":
        return "bytes"
    if kind == "hf":
        return "hf-" + re.sub(r"[^A-Za-z0-9._-]+", "_", str(_require_hf_name(tok_cfg)))
    raise ValueError(f"unknown data.tokenizer.kind={kind!r}; expected one of {', '.join(TOKENIZER_KINDS)}")


def _require_hf_name(tok_cfg) -> str:
    name = _cfg_get(tok_cfg, "name")
    if not name:
        raise ValueError("data.tokenizer.kind=hf needs data.tokenizer.name (a hub id such as 'gpt2' or a local path)")
    return str(name)


def _bpe_from_json(path: Path, name: str, vocab_size: int) -> HFTokenizer:
    from tokenizers import Tokenizer as _Backend

    backend = _Backend.from_file(str(path))
    return HFTokenizer(backend, name, {"kind": "bpe", "vocab_size": vocab_size, "name": name})


def load_tokenizer_from_cache(tok_cfg, corpus_id: str, cache_dir: Path) -> Tokenizer | None:
    """The tokenizer for (tok_cfg, corpus_id) if it needs no training or is cached, else None."""
    kind = _cfg_get(tok_cfg, "kind", "bpe")
    name = tokenizer_name(tok_cfg, corpus_id)
    if kind == "bpe":
        path = Path(cache_dir) / "tokenizers" / f"{name}.json"
        return _bpe_from_json(path, name, int(_cfg_get(tok_cfg, "vocab_size"))) if path.exists() else None
    if kind == "bytes":
        return BytesTokenizer()
    return load_hf_tokenizer(_require_hf_name(tok_cfg))


def build_tokenizer(
    tok_cfg,
    training_text_iter_factory: Callable[[], Iterator[str]],
    cache_dir: Path,
    corpus_id: str | None = None,
    progress: bool = False,
) -> Tokenizer:
    """Build the tokenizer that `tok_cfg` describes.

    bpe: loads `cache_dir/tokenizers/<name>.json` when present, else trains on the texts that
    `training_text_iter_factory()` yields and writes that file atomically. `corpus_id` names the
    training corpus in the cache key; when None the training text itself is hashed.
    """
    kind = _cfg_get(tok_cfg, "kind", "bpe")
    if kind == "bpe":
        vocab_size = int(_cfg_get(tok_cfg, "vocab_size", 2048))
        if vocab_size < 257:
            raise ValueError(f"data.tokenizer.vocab_size={vocab_size} is too small for byte-level BPE (needs >= 257)")
        if corpus_id is None:
            corpus_id = _text_hash(training_text_iter_factory())
    cached = load_tokenizer_from_cache(tok_cfg, corpus_id or "", cache_dir)
    if cached is not None:
        return cached
    name = tokenizer_name(tok_cfg, corpus_id)
    backend = _train_bpe(training_text_iter_factory(), vocab_size, progress=progress)
    path = Path(cache_dir) / "tokenizers" / f"{name}.json"
    tmp = path.with_name(temp_name(path.name, prefix=".", suffix=".tmp"))  # swept by cache.sweep_stale_temp if killed
    with writing(tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            backend.save(str(tmp))
            os.replace(tmp, path)  # atomic: a reader sees either no file or the whole file
        except Exception as err:
            tmp.unlink(missing_ok=True)
            if isinstance(err, OSError):
                raise
            raise OSError(errno.EIO, str(err)) from None  # tokenizers reports I/O failures as a plain Exception
    return _bpe_from_json(path, name, vocab_size)


def load_hf_tokenizer(name_or_path: str, display_name: str | None = None) -> HFTokenizer:
    """A tokenizer from a local folder / tokenizer.json, or from the Hugging Face hub.

    `display_name` (default: name_or_path) is what its `name` and `spec()` record.
    """
    from tokenizers import Tokenizer as _Backend

    display_name = display_name or name_or_path
    name = "hf-" + re.sub(r"[^A-Za-z0-9._-]+", "_", display_name)
    spec = {"kind": "hf", "name": display_name}
    local = Path(name_or_path).expanduser()
    if local.is_dir() and (local / "tokenizer.json").exists():
        return HFTokenizer(_Backend.from_file(str(local / "tokenizer.json")), name, spec)
    if local.is_file():
        return HFTokenizer(_Backend.from_file(str(local)), name, spec)
    try:
        backend = _Backend.from_pretrained(name_or_path)
    except Exception as err:  # the hub raises several types (offline, 404, connection)
        offline = os.environ.get("HF_HUB_OFFLINE", "0")
        raise SourceUnavailable(
            f"could not load Hugging Face tokenizer {name_or_path!r} ({type(err).__name__}: {err}). "
            f"It must be in the local hub cache or reachable online (HF_HUB_OFFLINE={offline}; "
            "unset HF_HUB_OFFLINE to download it), or pass a local folder holding tokenizer.json."
        ) from err
    return HFTokenizer(backend, name, spec)


def tokenizer_from_spec(spec: dict, json_path: Path | None = None) -> Tokenizer:
    """Rebuild a tokenizer from `Tokenizer.spec()` (and, for BPE, its saved JSON file)."""
    kind = spec["kind"]
    if kind == "bytes":
        return BytesTokenizer()
    if kind == "bpe":
        if json_path is None or not Path(json_path).exists():
            raise FileNotFoundError(f"BPE tokenizer {spec['name']} needs its JSON file (looked for {json_path})")
        return _bpe_from_json(Path(json_path), spec["name"], int(spec["vocab_size"]))
    if kind == "hf":
        # The copy saved next to the shards works offline; fall back to the hub / original path.
        if json_path is not None and Path(json_path).exists():
            return load_hf_tokenizer(str(json_path), display_name=spec["name"])
        return load_hf_tokenizer(spec["name"])
    if kind == "fixed":
        return FixedVocabTokenizer(spec["words"], spec["eos"], spec["name"], spec)
    raise ValueError(f"unknown tokenizer spec kind {kind!r}")
