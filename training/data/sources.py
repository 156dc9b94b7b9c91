"""Text sources: the embedded corpus, local files (.txt/.jsonl/.parquet) and Hugging Face datasets.

Each source gives a list of documents (strings) plus a JSON-able identity used in cache keys:
the identity changes whenever the text could change (file list, sizes, mtimes; hf path/split/limits).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import re
from pathlib import Path

from tqdm.auto import tqdm

from training.data.errors import DataError, SourceUnavailable
from training.data.tokenizer import _cfg_get

SOURCES = ("embedded", "files", "hf", "synthetic")
FILE_TYPES = (".txt", ".jsonl", ".parquet")
CORPUS_DIR = Path(__file__).resolve().parent / "corpus"

# Where one document ends and the next begins in each embedded corpus. Shakespeare's texts are
# joined by blank lines, so a boundary is recognised by the "TITLE\n\nby William Shakespeare" header.
_EMBEDDED_BOUNDARIES = {"shakespeare": r"\n{2,}(?=[^\n]+\n\n?by William Shakespeare\n)"}
_DEFAULT_BOUNDARY = r"\n{3,}"


def hash_identity(identity: dict) -> str:
    """Stable hex digest of a JSON-able dict."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def _file_stat(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


# ------------------------------------------------------------------------------------ embedded


def embedded_path(data_cfg) -> Path:
    """The embedded corpus file; a hidden `corpus_path` key overrides it (tests, custom corpora)."""
    override = _cfg_get(data_cfg, "corpus_path")
    if override:
        return Path(override).expanduser()
    name = _cfg_get(data_cfg, "name", "shakespeare")
    path = CORPUS_DIR / f"{name}.txt.gz"
    if not path.exists():
        available = sorted(p.name.removesuffix(".txt.gz") for p in CORPUS_DIR.glob("*.txt.gz"))
        raise ValueError(f"unknown embedded corpus data.name={name!r}; available: {', '.join(available)}")
    return path


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError) as err:  # unreadable, or a damaged / not-really gzip file
        raise DataError(f"{path}: cannot read ({type(err).__name__}: {err})") from None


def decode_text(data: bytes, where: Path | str) -> str:
    """UTF-8 text of `data`; DataError naming `where` and the line for binary or non-UTF-8 content."""
    nul = data.find(b"\0", 0, 1 << 20)
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise DataError(f"{where}:{line}: looks binary (NUL byte at offset {nul}); text files must be UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"{where}:{line}: not UTF-8 (byte 0x{data[err.start]:02x} at column {column}, offset "
            f"{err.start}); re-encode the file as UTF-8 (e.g. iconv -t UTF-8)"
        ) from None


def _read_text(path: Path) -> str:
    text = decode_text(_read_bytes(path), path)
    if not text.strip():
        raise DataError(f"{path}: empty file (no text); remove it from data.paths")
    return text


def _embedded_boundary(data_cfg) -> str:
    if _cfg_get(data_cfg, "corpus_path"):
        return _DEFAULT_BOUNDARY
    return _EMBEDDED_BOUNDARIES.get(_cfg_get(data_cfg, "name", "shakespeare"), _DEFAULT_BOUNDARY)


def embedded_documents(data_cfg) -> list[str]:
    path = embedded_path(data_cfg)
    docs = [doc.strip("\n") for doc in re.split(_embedded_boundary(data_cfg), _read_text(path))]
    return [doc for doc in docs if doc]


# --------------------------------------------------------------------------------------- files


def expand_globs(patterns) -> list[Path]:
    """Sorted, de-duplicated files matched by `patterns`; ValueError naming a glob that matches nothing."""
    if isinstance(patterns, (str, Path)):
        patterns = [patterns]
    patterns = list(patterns or [])
    if not patterns:
        raise ValueError("data.source=files needs data.paths: a list of globs such as ['corpus/*.txt']")
    files: set[Path] = set()
    for pattern in patterns:
        matched = [Path(p) for p in glob.glob(str(Path(str(pattern)).expanduser()), recursive=True)]
        matched = [p for p in matched if p.is_file()]
        if not matched:
            raise DataError(f"data.paths glob {str(pattern)!r} matches no files (relative to {Path.cwd()})")
        files.update(p.resolve() for p in matched)
    ordered = sorted(files)
    bad = [p for p in ordered if p.suffix not in FILE_TYPES]
    if bad:
        raise ValueError(
            f"unsupported file type {bad[0].suffix or '(none)'!r} for {bad[0]}; supported: {', '.join(FILE_TYPES)}"
        )
    return ordered


def _missing_field(field: str, present, where) -> ValueError:
    return DataError(
        f"text_field {field!r} not found in {where}; fields present: {', '.join(map(str, present))} "
        "(set data.text_field)"
    )


def _jsonl_documents(path: Path, field: str) -> list[str]:
    docs = []
    text = decode_text(_read_bytes(path), path)
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}:{line_no}: not valid JSON ({err.msg} at column {err.colno}); "
                "a .jsonl file holds one JSON object per line"
            ) from None
        if not isinstance(record, dict) or field not in record:
            present = list(record) if isinstance(record, dict) else [type(record).__name__]
            raise _missing_field(field, present, f"{path}:{line_no}")
        docs.append(str(record[field]))
    if not docs:
        raise DataError(f"{path}: empty file (no JSON records); remove it from data.paths")
    return docs


def _parquet_documents(path: Path, field: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError ...
        raise DataError(f"{path}: not a readable parquet file ({type(err).__name__}: {err})") from None
    if field not in names:
        raise _missing_field(field, names, path)
    try:
        docs = [str(t) for t in pq.read_table(path, columns=[field]).column(field).to_pylist() if t is not None]
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{path}: cannot read column {field!r} ({type(err).__name__}: {err})") from None
    if not docs:
        raise DataError(f"{path}: empty file (no rows in column {field!r}); remove it from data.paths")
    return docs


def file_documents(data_cfg, progress: bool = True) -> list[str]:
    """One document per .txt file, per .jsonl line, per .parquet row (in sorted file order)."""
    field = _cfg_get(data_cfg, "text_field", "text")
    files = expand_globs(_cfg_get(data_cfg, "paths", []))
    docs: list[str] = []
    for path in tqdm(files, desc="reading files", unit="file", disable=not progress or len(files) < 20):
        if path.suffix == ".txt":
            docs.append(_read_text(path))
        elif path.suffix == ".jsonl":
            docs.extend(_jsonl_documents(path, field))
        else:
            docs.extend(_parquet_documents(path, field))
    return [doc for doc in docs if doc]


# ------------------------------------------------------------------------------------------ hf


def _hf_cfg(data_cfg) -> dict:
    hf = _cfg_get(data_cfg, "hf", {}) or {}
    keys = ("path", "name", "split", "data_files", "streaming", "max_docs", "max_bytes")
    out = {k: _cfg_get(hf, k) for k in keys}
    if out["data_files"] is not None and not isinstance(out["data_files"], (str, list, dict)):
        from omegaconf import (
            OmegaConf,  # a ListConfig/DictConfig: datasets wants plain containers
        )

        out["data_files"] = OmegaConf.to_container(out["data_files"])
    out["split"] = out["split"] or "train"
    out["streaming"] = True if out["streaming"] is None else bool(out["streaming"])
    if not out["path"]:
        raise ValueError(
            "data.source=hf needs data.hf.path (e.g. roneneldan/TinyStories, or 'text' with data.hf.data_files)"
        )
    return out


def hf_documents(data_cfg, progress: bool = True) -> list[str]:
    """Documents from `datasets.load_dataset`, stopping at hf.max_docs documents or hf.max_bytes bytes."""
    import datasets

    hf = _hf_cfg(data_cfg)
    field = _cfg_get(data_cfg, "text_field", "text")
    try:
        dataset = datasets.load_dataset(
            hf["path"], hf["name"], split=hf["split"], data_files=hf["data_files"], streaming=hf["streaming"]
        )
    except Exception as err:
        raise SourceUnavailable(
            f"datasets.load_dataset({hf['path']!r}, {hf['name']!r}, split={hf['split']!r}) failed: {err}. "
            "Hub datasets need network access or a local cache (check HF_DATASETS_OFFLINE / HF_HUB_OFFLINE)."
        ) from err
    max_docs, max_bytes = hf["max_docs"], hf["max_bytes"]
    docs, total_bytes = [], 0
    bar = tqdm(total=max_bytes, unit="B", unit_scale=True, desc=f"reading {hf['path']}", disable=not progress)
    for record in dataset:
        if max_docs is not None and len(docs) >= int(max_docs):
            break
        if max_bytes is not None and total_bytes >= int(max_bytes):
            break
        if field not in record:
            raise _missing_field(field, list(record), f"dataset {hf['path']!r}")
        text = record[field]
        if not text:
            continue
        size = len(text.encode("utf-8"))
        docs.append(text)
        total_bytes += size
        bar.update(size)
    bar.close()
    return docs


# ------------------------------------------------------------------------------------ identity


def source_identity(data_cfg) -> dict:
    """What determines the text of a text source (never the text itself, so it is cheap)."""
    source = _cfg_get(data_cfg, "source", "embedded")
    field = _cfg_get(data_cfg, "text_field", "text")
    if source == "embedded":
        # Content hash, not mtime: a fresh checkout of the same corpus reuses the cache.
        path = embedded_path(data_cfg)
        return {
            "source": "embedded",
            "name": _cfg_get(data_cfg, "name"),
            "boundary": _embedded_boundary(data_cfg),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
    if source == "files":
        return {
            "source": "files",
            "files": [_file_stat(p) for p in expand_globs(_cfg_get(data_cfg, "paths"))],
            "text_field": field,
        }
    if source == "hf":
        hf = _hf_cfg(data_cfg)
        files = hf["data_files"]
        local = [files] if isinstance(files, str) else files if isinstance(files, list) else []
        stats = [_file_stat(Path(f)) for f in local if Path(f).is_file()]
        # streaming does not change the documents, so both modes share one cache entry.
        return {
            "source": "hf",
            **{k: v for k, v in hf.items() if k != "streaming"},
            "local_files": stats,
            "text_field": field,
        }
    raise ValueError(f"unknown data.source={source!r}; expected one of {', '.join(SOURCES)}")


def load_documents(data_cfg, progress: bool = True) -> list[str]:
    source = _cfg_get(data_cfg, "source", "embedded")
    if source == "embedded":
        return embedded_documents(data_cfg)
    if source == "files":
        return file_documents(data_cfg, progress)
    if source == "hf":
        return hf_documents(data_cfg, progress)
    raise ValueError(f"unknown data.source={source!r}; expected one of {', '.join(SOURCES)}")


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Train = leading documents, val = the last `val_fraction` of them (at least one each).

    A single document is cut at the newline nearest before the (1 - val_fraction) point.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={val_fraction} must be strictly between 0 and 1")
    if not docs:
        raise ValueError("the data source produced no documents (all empty?)")
    if len(docs) == 1:
        text = docs[0]
        cut = int(len(text) * (1.0 - val_fraction))
        newline = text.rfind("\n", 0, cut)
        cut = newline + 1 if newline > 0 else cut
        if not 0 < cut < len(text):
            raise ValueError("the only document is too short to split into train and val")
        return [text[:cut]], [text[cut:]]
    n_val = min(len(docs) - 1, max(1, round(len(docs) * val_fraction)))
    return docs[: len(docs) - n_val], docs[len(docs) - n_val :]
