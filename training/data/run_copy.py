"""What a run folder keeps of its data, so that the folder alone can be sampled, evaluated and exported.

At the start of training the trainer writes ``<run_dir>/data/``: the tokenizer (its spec and, for BPE and
Hugging Face tokenizers, ``tokenizer.json``), the validation tokens (and their target mask) as ``.npy``
files, and ``meta.json`` (bytes per token for bits-per-byte, the description, the window alignment).
``training.eval.loss.load_trained`` opens that copy instead of preparing the data again, so sampling,
evaluate.py, the Hugging Face export and the lm-eval adapter work after the training files and the data
cache are gone, and never reach for a hub. Runs trained before this copy existed fall back to the cache.

Legend: V validation tokens (at most ``MAX_VAL_TOKENS`` are kept: evaluation reads a few hundred
thousand at most).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from training.data.errors import DataError

RUN_DATA = "data"
MAX_VAL_TOKENS = 4_000_000  # 16 MB of uint32 at most; eval_batches × batch × seq_len is far below
FORMAT = 1


def run_data_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / RUN_DATA


def save_run_data(run_dir: str | Path, data) -> Path:
    """Write ``<run_dir>/data/`` from prepared ``TokenData`` once (atomically: a temp folder renamed)."""
    folder = run_data_dir(run_dir)
    if (folder / "meta.json").is_file():
        return folder
    tmp = folder.with_name(f".{RUN_DATA}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n_val = min(len(data.val), MAX_VAL_TOKENS)
    np.save(tmp / "val.npy", np.asarray(data.val[:n_val]))
    if data.val_mask is not None:
        np.save(tmp / "val_mask.npy", np.asarray(data.val_mask[:n_val]))
    tokenizer_json = Path(data.cache_path) / "tokenizer.json" if data.cache_path is not None else None
    if tokenizer_json is not None and tokenizer_json.is_file():
        shutil.copyfile(tokenizer_json, tmp / "tokenizer.json")
    meta = {
        "format": FORMAT,
        "tokenizer": data.tokenizer.spec(),
        "vocab_size": data.tokenizer.vocab_size,
        "val_bytes_per_token": float(data.val_bytes_per_token),
        "description": data.description,
        "window_align": int(data.window_align),
        "n_val": int(n_val),
        "n_val_source": int(len(data.val)),
        "has_mask": data.val_mask is not None,
        "dtype": str(np.asarray(data.val[:1]).dtype),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    if folder.exists():  # a partial folder from an earlier crash (no meta.json): replace it
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def open_run_data(run_dir: str | Path):
    """``TokenData`` from ``<run_dir>/data/`` (no training split: ``train`` is empty), or None when the folder
    has no copy (a run from before it existed). A damaged copy raises DataError naming the file."""
    from training.data.shards import TokenData
    from training.data.tokenizer import tokenizer_from_spec

    folder = run_data_dir(run_dir)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        val = np.load(folder / "val.npy", mmap_mode="r")
        mask = np.load(folder / "val_mask.npy", mmap_mode="r") if meta["has_mask"] else None
        tokenizer = tokenizer_from_spec(meta["tokenizer"], folder / "tokenizer.json")
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{folder}: the run folder's data copy is unreadable ({type(err).__name__}: {err})") from None
    if len(val) != meta["n_val"] or tokenizer.vocab_size != meta["vocab_size"]:
        raise DataError(
            f"{folder}: val.npy holds {len(val)} tokens and the tokenizer {tokenizer.vocab_size} ids, "
            f"meta.json says {meta['n_val']} and {meta['vocab_size']}"
        )
    return TokenData(
        train=np.zeros(0, dtype=val.dtype),
        val=val,
        train_mask=None if mask is None else np.zeros(0, np.uint8),
        val_mask=mask,
        tokenizer=tokenizer,
        val_bytes_per_token=meta["val_bytes_per_token"],
        cache_path=folder,
        description=meta["description"] + " (the run folder's copy)",
        window_align=meta["window_align"],
    )
