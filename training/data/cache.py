"""The data cache's housekeeping: temp entries named by their writer, stale-temp sweeping, checksummed
shard writing, and disk errors (ENOSPC, permissions) reported with the path.

Everything in the cache is built under a temp name (``.tmp-<final>-<host>-<pid>``) and renamed into
place, so a killed writer leaves only a temp entry; the next start removes it when that pid is gone
(same host) or when it is older than STALE_TEMP_SECONDS (another host sharing the cache).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import socket
import time
from pathlib import Path

import numpy as np

from training.data.errors import DataError

STALE_TEMP_SECONDS = 24 * 3600
_HOST = re.sub(r"[^A-Za-z0-9]+", "_", socket.gethostname())[:32] or "host"


@contextlib.contextmanager
def writing(path: Path):
    """OSError while writing `path` (disk full, permissions) → DataError naming the path."""
    try:
        yield
    except OSError as err:
        code = errno.errorcode.get(err.errno, err.errno) if err.errno is not None else type(err).__name__
        raise DataError(
            f"cannot write {path}: {err.strerror or err} [{code}]. Nothing partial is kept: the "
            "temporary shard folder is removed and the cache holds only complete, checksummed folders; "
            "free space or point data.cache_dir elsewhere"
        ) from None


def temp_name(final_name: str, prefix: str = ".tmp-", suffix: str = "") -> str:
    """A temp entry for `final_name`, named by host and pid so a later start can tell if its writer died."""
    return f"{prefix}{final_name}-{_HOST}-{os.getpid()}{suffix}"


def _writer_is_dead(name: str) -> bool:
    host_pid = name.rsplit("-", 2)
    if len(host_pid) != 3 or not host_pid[2].split(".")[0].isdigit() or host_pid[1] != _HOST:
        return False
    pid = int(host_pid[2].split(".")[0])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def sweep_stale_temp(cache_dir: Path) -> list[Path]:
    """Remove temp folders / files left in the cache by a killed writer (its pid is gone, or it is old)."""
    removed = []
    for folder in (cache_dir, cache_dir / "tokenizers"):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if not (
                entry.name.startswith(".tmp-")
                or entry.name.startswith(".corrupt-")
                or (entry.name.startswith(".") and entry.name.endswith(".tmp"))
            ):
                continue
            try:
                old = time.time() - entry.lstat().st_mtime > STALE_TEMP_SECONDS
            except FileNotFoundError:
                continue
            if old or _writer_is_dead(entry.name.removesuffix(".tmp")):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


class ShardWriter:
    """Writes one shard file, keeping its sha256, byte count and the min / max id written."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype = path, dtype
        self.digest, self.bytes, self.lo, self.hi = hashlib.sha256(), 0, None, None
        with writing(path):
            self.handle = path.open("wb")

    def write(self, ids: np.ndarray) -> None:
        if len(ids):
            lo, hi = int(ids.min()), int(ids.max())
            self.lo = lo if self.lo is None else min(self.lo, lo)
            self.hi = hi if self.hi is None else max(self.hi, hi)
        data = ids.astype(self.dtype).tobytes()
        with writing(self.path):
            self.handle.write(data)
        self.digest.update(data)
        self.bytes += len(data)

    def close(self) -> dict:
        with writing(self.path):
            self.handle.close()
        return {"sha256": self.digest.hexdigest(), "bytes": self.bytes}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
