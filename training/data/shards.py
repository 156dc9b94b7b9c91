"""Token data: tokenize once into memory-mapped shards, then open and verify them.

Shard folder `cache_dir/<label>-<key>/` holds train.bin, val.bin (token ids), train_mask.bin /
val_mask.bin (synthetic tasks only), tokenizer.json (BPE only) and meta.json, which is written last
inside a temporary folder that is then renamed: a folder with meta.json is always complete. meta.json
records each file's sha256 and size and each split's id range; every open verifies them, and a
folder that fails (truncated, zeroed, out-of-vocabulary ids, no meta.json) is rebuilt from the source.
Training windows and eval batches are drawn from the opened streams by :mod:`training.data.windows`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from training.data import synthetic
from training.data.cache import (
    ShardWriter,
    sha256_file,
    sweep_stale_temp,
    temp_name,
    writing,
)
from training.data.errors import DataError
from training.data.sources import (
    SOURCES,
    hash_identity,
    load_documents,
    source_identity,
    split_documents,
)
from training.data.tokenizer import (
    HFTokenizer,
    Tokenizer,
    _cfg_get,
    build_tokenizer,
    tokenizer_from_spec,
    tokenizer_name,
)

FORMAT_VERSION = 2  # 2: meta.json holds each file's sha256 and byte size, and each split's id range
_verified: dict[tuple, dict] = {}  # folder + file stats → meta, so one process hashes a folder once


@dataclass
class TokenData:
    """Prepared token streams (1-D memmaps) and what is needed to read them.

    train_mask / val_mask: same length as the tokens, 1 where the NEXT-token target is scored,
    or None when every target is scored. window_align: training windows should start at a
    multiple of it (synthetic data is packed in blocks of seq_len tokens; text uses 1).
    """

    train: np.ndarray
    val: np.ndarray
    train_mask: np.ndarray | None
    val_mask: np.ndarray | None
    tokenizer: Tokenizer
    val_bytes_per_token: float
    cache_path: Path
    description: str
    window_align: int = 1


class ShardError(DataError):
    """A cached shard folder is incomplete or corrupt; the message names the file and the fault."""


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def _label(data_cfg, source: str) -> str:
    if source == "embedded":
        label = _cfg_get(data_cfg, "name", "embedded")
    elif source == "hf":
        label = _cfg_get(_cfg_get(data_cfg, "hf", {}), "path", "hf")
    elif source == "synthetic":
        label = _cfg_get(_cfg_get(data_cfg, "synthetic", {}), "task", "synthetic")
    else:
        label = "files"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(label))


def prepare_data(data_cfg, *, progress: bool = True) -> TokenData:
    """Tokenize the configured source into cached shards (first call) or open and verify them (later calls).

    A cached folder that fails verification (truncated, zeroed, ids outside the vocabulary, no or
    unreadable meta.json) is named on stderr and rebuilt from the source.
    """
    source = _cfg_get(data_cfg, "source", "embedded")
    if source not in SOURCES:
        raise ValueError(f"unknown data.source={source!r}; expected one of {', '.join(SOURCES)}")
    # Resolved now, so cache_path stays valid if the process later changes directory.
    cache_dir = Path(_cfg_get(data_cfg, "cache_dir", ".cache/data")).expanduser().resolve()
    val_fraction = float(_cfg_get(data_cfg, "val_fraction", 0.05))
    if source == "synthetic":
        params = synthetic.task_params(_cfg_get(data_cfg, "synthetic", {}))
        seq_len = int(_cfg_get(data_cfg, "seq_len", 256))
        identity = {"synthetic": params, "seq_len": seq_len}  # packing depends on seq_len
        tok_name, corpus_id = synthetic.synthetic_tokenizer(params).name, None
    else:
        identity = source_identity(data_cfg)
        corpus_id = hash_identity(identity)
        tok_name = tokenizer_name(_cfg_get(data_cfg, "tokenizer", {}), corpus_id)
    key = hash_identity(
        {"format": FORMAT_VERSION, "identity": identity, "tokenizer": tok_name, "val_fraction": val_fraction}
    )
    folder = cache_dir / f"{_label(data_cfg, source)}-{key[:16]}"
    sweep_stale_temp(cache_dir)
    if folder.exists():
        try:
            return open_shards(folder)
        except ShardError as err:
            print(f"warning: {err}; rebuilding {folder} from the source", file=sys.stderr)
            _discard(folder)
    tmp = cache_dir / temp_name(folder.name)
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(tmp):
        tmp.mkdir(parents=True)
    try:
        if source == "synthetic":
            meta = _write_synthetic(tmp, params, seq_len)
        else:
            meta = _write_text(tmp, data_cfg, cache_dir, corpus_id, val_fraction, progress)
        meta.update(format=FORMAT_VERSION, identity=identity)
        meta["description"] = f"{_label(data_cfg, source)}: {meta['description']}"
        with writing(tmp / "meta.json"):
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        try:
            os.rename(tmp, folder)  # atomic: the folder appears complete, with meta.json, or not at all
        except OSError:
            if not (folder / "meta.json").exists():  # not a concurrent writer finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return open_shards(folder)


def _discard(folder: Path) -> None:
    """Move a bad shard folder out of the way (atomically), then delete it."""
    aside = folder.with_name(temp_name(folder.name, ".corrupt-"))
    try:
        os.rename(folder, aside)
    except FileNotFoundError:  # another process discarded it first
        return
    shutil.rmtree(aside, ignore_errors=True)


def _write_split(path: Path, docs: list[str], tok: Tokenizer, dtype: np.dtype, desc: str, progress: bool):
    """Encode `docs` into `path` with eos between documents; returns (token count, file record, [min, max])."""
    count = 0
    eos = None if tok.eos_id is None else np.array([tok.eos_id], dtype=np.int64)
    writer = ShardWriter(path, dtype)
    try:
        for i, doc in enumerate(tqdm(docs, desc=desc, unit="doc", disable=not progress)):
            if i and eos is not None:
                writer.write(eos)
                count += 1
            ids = tok.encode_array(doc)
            writer.write(ids)
            count += len(ids)
    finally:
        record = writer.close()
    return count, record, [writer.lo, writer.hi]


def _check_written_range(id_range: dict, vocab_size: int, tmp: Path) -> None:
    for split, (lo, hi) in id_range.items():
        if hi is not None and (lo < 0 or hi >= vocab_size):
            raise DataError(
                f"{tmp / (split + '.bin')}: the tokenizer produced ids in [{lo}, {hi}], outside its "
                f"vocabulary [0, {vocab_size})"
            )


def _write_text(tmp: Path, data_cfg, cache_dir: Path, corpus_id: str, val_fraction: float, progress: bool) -> dict:
    docs = load_documents(data_cfg, progress)
    train_docs, val_docs = split_documents(docs, val_fraction)
    tok_cfg = _cfg_get(data_cfg, "tokenizer", {})
    tok = build_tokenizer(tok_cfg, lambda: docs, cache_dir, corpus_id=corpus_id, progress=progress)
    dtype = _token_dtype(tok.vocab_size)
    n_train, train_file, train_range = _write_split(
        tmp / "train.bin", train_docs, tok, dtype, "tokenizing train", progress
    )
    n_val, val_file, val_range = _write_split(tmp / "val.bin", val_docs, tok, dtype, "tokenizing val", progress)
    id_range = {"train": train_range, "val": val_range}
    _check_written_range(id_range, tok.vocab_size, tmp)
    files = {"train.bin": train_file, "val.bin": val_file}
    if isinstance(tok, HFTokenizer):
        with writing(tmp / "tokenizer.json"):
            (tmp / "tokenizer.json").write_text(tok.to_json())
        files["tokenizer.json"] = {
            "sha256": sha256_file(tmp / "tokenizer.json"),
            "bytes": (tmp / "tokenizer.json").stat().st_size,
        }
    val_bytes = sum(len(doc.encode("utf-8")) for doc in val_docs)
    kind = _cfg_get(tok_cfg, "kind", "bpe")
    return {
        "n_train": n_train,
        "n_val": n_val,
        "dtype": dtype.name,
        "has_mask": False,
        "window_align": 1,
        "tokenizer": tok.spec(),
        "vocab_size": tok.vocab_size,
        "id_range": id_range,
        "files": files,
        "val_bytes_per_token": val_bytes / max(n_val, 1),
        "documents": [len(train_docs), len(val_docs)],
        "description": f"{_count(n_train)} train / {_count(n_val)} val tokens "
        f"({len(train_docs)}/{len(val_docs)} docs), {kind} vocab {tok.vocab_size}",
    }


def _write_array(path: Path, array: np.ndarray, dtype) -> dict:
    writer = ShardWriter(path, np.dtype(dtype))
    try:
        writer.write(np.asarray(array))
    finally:
        record = writer.close()
    return record


def _write_synthetic(tmp: Path, params: dict, seq_len: int) -> dict:
    tok, (train, train_mask), (val, val_mask) = synthetic.generate(params, seq_len)
    dtype = _token_dtype(tok.vocab_size)
    files = {}
    for name, array in (("train", train), ("val", val)):
        files[f"{name}.bin"] = _write_array(tmp / f"{name}.bin", array, dtype)
    files["train_mask.bin"] = _write_array(tmp / "train_mask.bin", train_mask, np.uint8)
    files["val_mask.bin"] = _write_array(tmp / "val_mask.bin", val_mask, np.uint8)
    id_range = {
        name: [int(a.min()), int(a.max())] if len(a) else [None, None] for name, a in (("train", train), ("val", val))
    }
    _check_written_range(id_range, tok.vocab_size, tmp)
    return {
        "n_train": len(train),
        "n_val": len(val),
        "dtype": dtype.name,
        "has_mask": True,
        "window_align": seq_len,
        "tokenizer": tok.spec(),
        "vocab_size": tok.vocab_size,
        "id_range": id_range,
        "files": files,
        "val_bytes_per_token": 1.0,
        "description": f"{_count(len(train))} train / {_count(len(val))} val tokens "
        f"({params['num_train']}/{params['num_val']} examples, answers scored), vocab {tok.vocab_size}",
    }


def _memmap(path: Path, dtype, length: int) -> np.ndarray:
    if length == 0:
        return np.zeros(0, dtype=dtype)  # np.memmap refuses empty files
    return np.memmap(path, dtype=dtype, mode="r", shape=(length,))


def _read_meta(folder: Path) -> dict:
    path = folder / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShardError(f"{path}: missing (an incomplete or damaged shard folder)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardError(f"{path}: unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION or "files" not in meta:
        version = meta.get("format") if isinstance(meta, dict) else None
        raise ShardError(f"{path}: shard format {version!r}, this code reads format {FORMAT_VERSION} (with checksums)")
    return meta


def verify_shards(folder: Path) -> dict:
    """meta.json of a complete, intact shard folder; ShardError naming the first bad file otherwise.

    Checks, per file: present, the recorded byte size (a truncated file), token ids inside the
    vocabulary (so an out-of-vocabulary id can never reach the embedding mid-run), and the sha256
    recorded when it was written (zeroed or flipped bytes).
    """
    folder = Path(folder)
    meta = _read_meta(folder)
    files: dict = meta["files"]
    try:
        stats = tuple(
            (name, (folder / name).stat().st_size, (folder / name).stat().st_mtime_ns) for name in sorted(files)
        )
    except FileNotFoundError as err:
        raise ShardError(f"{err.filename}: missing from the shard folder") from None
    cached = _verified.get((str(folder), stats))
    if cached is not None:
        return cached
    dtype, vocab = np.dtype(meta["dtype"]), int(meta["vocab_size"])
    for name, record in files.items():
        path = folder / name
        size = path.stat().st_size
        if size != record["bytes"]:
            raise ShardError(f"{path}: {size} bytes, meta.json records {record['bytes']} (truncated or overwritten)")
        if name.removesuffix(".bin") in ("train", "val") and size:
            tokens = np.memmap(path, dtype=dtype, mode="r")
            hi = int(tokens.max())
            if hi >= vocab:
                where = int(np.argmax(tokens >= vocab))
                raise ShardError(
                    f"{path}: token id {tokens[where]} at position {where} is outside the vocabulary "
                    f"[0, {vocab}) (max id {hi})"
                )
            del tokens
        if sha256_file(path) != record["sha256"]:
            raise ShardError(f"{path}: sha256 does not match meta.json (corrupted: zeroed or changed bytes)")
    _verified[(str(folder), stats)] = meta
    return meta


def load_shard_tokenizer(cache_path: Path) -> Tokenizer:
    """Rebuild the tokenizer of a shard folder (e.g. `TokenData.cache_path` saved with a checkpoint)."""
    meta = _read_meta(Path(cache_path))
    return tokenizer_from_spec(meta["tokenizer"], Path(cache_path) / "tokenizer.json")


def open_shards(folder: Path) -> TokenData:
    """Open a complete shard folder as memmaps (no tokenization), after :func:`verify_shards`."""
    folder = Path(folder)
    meta = verify_shards(folder)
    dtype = np.dtype(meta["dtype"])
    masks = {}
    for split in ("train", "val"):
        n = meta[f"n_{split}"]
        masks[split] = _memmap(folder / f"{split}_mask.bin", np.uint8, n) if meta["has_mask"] else None
    try:
        tokenizer = tokenizer_from_spec(meta["tokenizer"], folder / "tokenizer.json")
    except (OSError, ValueError, KeyError) as err:
        raise ShardError(
            f"{folder / 'tokenizer.json'}: cannot rebuild the shards' tokenizer ({type(err).__name__}: {err})"
        ) from None
    if tokenizer.vocab_size != int(meta["vocab_size"]):
        raise ShardError(
            f"{folder / 'tokenizer.json'}: vocabulary of {tokenizer.vocab_size} tokens, the shards were "
            f"written with {meta['vocab_size']}"
        )
    return TokenData(
        train=_memmap(folder / "train.bin", dtype, meta["n_train"]),
        val=_memmap(folder / "val.bin", dtype, meta["n_val"]),
        train_mask=masks["train"],
        val_mask=masks["val"],
        tokenizer=tokenizer,
        val_bytes_per_token=float(meta["val_bytes_per_token"]),
        cache_path=folder,
        description=meta["description"],
        window_align=int(meta.get("window_align", 1)),
    )


def check_seq_len(data: TokenData, seq_len: int) -> None:
    """ValueError when a split cannot hold one window of seq_len + 1 tokens."""
    n_val, n_train = len(data.val), len(data.train)
    if n_val < seq_len + 1:
        raise ValueError(
            f"data.seq_len={seq_len} is longer than the validation split ({n_val} tokens); "
            f"use data.seq_len <= {max(n_val - 1, 0)} or a larger data.val_fraction"
        )
    if n_train < seq_len + 1:
        raise ValueError(
            f"data.seq_len={seq_len} is longer than the training split ({n_train} tokens); "
            f"use data.seq_len <= {max(n_train - 1, 0)} or more data"
        )
