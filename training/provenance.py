"""Run provenance: every launch into a run folder is appended to ``launches.jsonl``, and
``train.log`` keeps what the console showed.

Hydra rewrites ``.hydra/overrides.yaml`` and the trainer rewrites ``config.yaml`` at each launch, so
on their own they only describe the last one. ``launches.jsonl`` gets one row per launch: the time,
the command-line overrides, the git commit of the code (and whether the checkout had uncommitted
changes), the host and the number of processes. ``train.log`` is appended to, one line per console
line (a progress bar's carriage-return updates collapse to its final state).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCHES = "launches.jsonl"
CONSOLE_LOG = "train.log"


def git_state(root: Path = ROOT) -> dict:
    """{'commit': sha or None, 'dirty': bool or None} of the checkout the code runs from."""

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        status = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}


def hydra_overrides() -> list[str] | None:
    """The command-line overrides of the current Hydra job, or None outside one."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        return None


def _no_link(path: Path) -> Path:
    """Run outputs are never written through a symbolic link planted in the run folder: drop the link."""
    if path.is_symlink():
        print(f"warning: {path} was a symbolic link; replaced by a regular file", file=sys.stderr)
        path.unlink()
    return path


def record_launch(run_dir: Path, world: int = 1) -> dict:
    """Append this launch to ``run_dir/launches.jsonl``; returns the row."""
    row = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "overrides": hydra_overrides(),
        "argv": sys.argv,
        **{f"git_{k}": v for k, v in git_state().items()},
        "host": platform.node(),
        "processes": world,
        "pid": os.getpid(),
    }
    with open(_no_link(Path(run_dir) / LAUNCHES), "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def read_launches(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / LAUNCHES
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


class _Tee:
    """A text stream that writes through to ``stream`` and hands complete lines to ``sink``."""

    def __init__(self, stream, sink):
        self.stream, self.sink, self.partial = stream, sink, ""

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.partial += text
        *lines, self.partial = self.partial.split("\n")
        for line in lines:
            self.sink(line.rsplit("\r", 1)[-1])  # what the terminal shows after carriage returns
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, … of the real stream
        return getattr(self.stream, name)


class ConsoleLog:
    """Copy stdout and stderr lines into a file once ``attach(path)`` names it (lines printed before
    are kept in memory and written then, so nothing is written when a run is refused before it starts)."""

    def __init__(self):
        self.pending: list[str] = []
        self.file = None

    def _line(self, line: str) -> None:
        if self.file is None:
            self.pending.append(line)
        else:
            self.file.write(line + "\n")
            self.file.flush()

    def attach(self, path: Path) -> None:
        self.file = open(_no_link(Path(path)), "a")
        self.file.write(f"--- launch {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n")
        for line in self.pending:
            self.file.write(line + "\n")
        self.pending.clear()
        self.file.flush()

    def __enter__(self) -> ConsoleLog:
        self.saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(sys.stdout, self._line), _Tee(sys.stderr, self._line)
        return self

    def __exit__(self, *exc) -> None:
        for tee in (sys.stdout, sys.stderr):
            if isinstance(tee, _Tee) and tee.partial:
                self._line(tee.partial.rsplit("\r", 1)[-1])
                tee.partial = ""
        sys.stdout, sys.stderr = self.saved
        if self.file is not None:
            self.file.close()
