"""Run logging: ``metrics.jsonl`` (always), Weights & Biases (optional), and the loss plot."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class MetricsLogger:
    """Appends one JSON object per event to ``run_dir/metrics.jsonl`` and mirrors it to wandb.

    Every row has ``step``; train rows have ``loss``, ``lr``, ``tokens_per_s``; eval rows ``val_loss``.
    The file always matches the checkpoint the run continues from: a fresh start truncates it, a
    resume keeps rows up to the resumed step (dropping a torn last line), and it is never written
    through a symbolic link.
    """

    def __init__(self, run_dir: str | Path, logger_cfg, config_dict: dict, resume_step: int | None):
        self.path = Path(run_dir) / METRICS_FILE
        _replace_link(self.path)
        truncate_after(self.path, resume_step if resume_step is not None else -1)
        self._file = open(self.path, "a", buffering=1)
        self.wandb_run = _init_wandb(logger_cfg, Path(run_dir), config_dict) if logger_cfg.name == "wandb" else None

    def log(self, row: dict[str, Any]) -> None:
        clean = {k: _plain(v) for k, v in row.items()}
        self._file.write(json.dumps(clean) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(wandb_row(clean), step=clean["step"])

    def close(self) -> None:
        self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def wandb_row(clean: dict[str, Any]) -> dict[str, Any]:
    """A metrics row as wandb takes it: numbers as they are; per-expert vectors (e.g. ``moe/layer0/load``) as a
    bar-chart histogram (one bin per expert, height = its load)."""
    import wandb

    out: dict[str, Any] = {}
    for key, value in clean.items():
        if key == "step":
            continue
        if isinstance(value, bool):
            out[key] = int(value)
        elif isinstance(value, (int, float)):
            out[key] = value
        elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
            out[key] = wandb.Histogram(np_histogram=(value, list(range(len(value) + 1))))
    return out


class NullLogger:
    """What ranks other than 0 log to: nothing (rank 0 writes metrics.jsonl, wandb and plots)."""

    def log(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def truncate_after(path: Path, step: int) -> None:
    """Keep only rows with ``step <= step`` (a resumed run re-logs the rest; -1: none), atomically.

    A line that is not a JSON object (a crash tore the last write) is dropped with a warning.
    """
    if not path.exists():
        return
    lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            row_step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            where = "its last line" if number >= len(lines) - 1 else f"line {number}"
            warnings.warn(
                f"{path}: dropped {where}, which is not a complete metrics row (torn by a crash): {line[:80]!r}",
                stacklevel=2,
            )
            continue
        if row_step <= step:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _replace_link(path: Path) -> None:
    """A symbolic link at ``path`` is replaced by a regular file holding the same rows (with a warning)."""
    if not path.is_symlink():
        return
    target = os.readlink(path)
    try:
        content = path.read_bytes()
    except OSError:
        content = b""
    path.unlink()
    path.write_bytes(content)
    warnings.warn(
        f"{path} was a symbolic link (to {target}); replaced it by a regular file: outputs of a run are "
        "never written through links",
        stacklevel=3,
    )


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a torn line from a crash (the next resume drops it with a warning)
    return rows


def _plain(value: Any) -> Any:
    """Tensors → Python numbers (scalars) or lists (vectors such as per-expert loads)."""
    if hasattr(value, "numel"):
        return value.item() if value.numel() == 1 else [round(v, 6) for v in value.flatten().tolist()]
    return value


def _init_wandb(logger_cfg, run_dir: Path, config_dict: dict):
    import wandb

    mode = logger_cfg.mode
    if mode == "auto":
        has_key = bool(os.environ.get("WANDB_API_KEY")) or _netrc_has_wandb()
        mode = "online" if has_key else "offline"
    mode = os.environ.get("WANDB_MODE", mode)  # the environment wins (tests set disabled)
    return wandb.init(
        project=logger_cfg.project,
        entity=logger_cfg.entity,
        tags=list(logger_cfg.tags),
        config=config_dict,
        dir=str(run_dir),
        name=run_dir.name,
        id=run_dir.name.replace("/", "-"),
        resume="allow",
        mode=mode,
    )


def _netrc_has_wandb() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def plot_losses(run_dir: str | Path) -> Path | None:
    """Train and val loss against step → ``run_dir/loss.png``."""
    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(run_dir) / PLOT_FILE
    if path.is_symlink():
        warnings.warn(
            f"{path} was a symbolic link (to {os.readlink(path)}); replaced it by a regular file", stacklevel=2
        )
        path.unlink()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
