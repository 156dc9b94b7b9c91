"""Continuing a run from its own folder: ``python train.py run_dir=R [overrides]`` trains R's saved config.

A run folder holds the config it was trained with (``config.yaml``, written by the trainer). Converted,
merged and fused runs (MoE → MoUE, MHA → DHA/GQA, TIES + HARC) hold a config that ``conf/`` cannot
compose, so re-launching into a folder must start from that saved config, not from the defaults:

- the saved config is the base;
- each key the command line names (``trainer.max_steps=2000``; a group choice such as ``model/ffn=moe``
  names its whole node) takes the command line's value, and every value that changes is reported;
- a change under ``model`` is refused when the folder already holds checkpoints (the weights were
  trained with the saved model; start a new ``run_dir`` instead);
- how the launch runs (device, parallelism, threads, checkpoint format, logger: ``LAUNCH_KEYS``) is always this
  command line's, so a 2-process run continues on one process.

Sweeps (``-m``) always train fresh numbered folders and never come here. Torch-free.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

SAVED_CONFIG = "config.yaml"
_ENTRY_KEYS = {"run_dir"}  # where the run lives, not what it trains
# How this launch runs, not what the run trains: always the current command line's (or its defaults'), so a
# run started on 2 processes with expert parallelism continues on 1, and a GPU run continues on a CPU.
LAUNCH_KEYS = (
    ("trainer", "device"),
    ("trainer", "parallel"),
    ("trainer", "expert_parallel"),
    ("trainer", "threads"),
    ("trainer", "progress"),
    ("trainer", "checkpoint_format"),
    ("trainer", "checkpoint_async"),
    ("trainer", "compile"),
    ("trainer", "resume"),
    ("logger",),
)


def saved_config_path(overrides: list[str]) -> Path | None:
    """R/config.yaml when the command line names a run_dir R that already holds one."""
    for word in overrides:
        key, eq, value = word.lstrip("+~").partition("=")
        if eq and key == "run_dir" and value:
            path = Path(value) / SAVED_CONFIG
            return path if path.is_file() else None
    return None


def _named_paths(overrides: list[str], plain: dict) -> list[tuple[str, ...]]:
    """The config paths a command line names: ``a.b=v`` → (a, b); ``g/sub=x`` → (g, sub); ``experiment=x``
    → every top-level section (an experiment preset may set anything)."""
    paths = []
    for word in overrides:
        key, eq, _ = word.lstrip("+~").partition("=")
        if not eq or key.startswith("hydra") or key in _ENTRY_KEYS:
            continue
        if key == "experiment":
            paths += [(k,) for k in plain if k not in _ENTRY_KEYS]
        else:
            paths.append(tuple(key.replace("/", ".").split(".")))
    return paths


def _get(node: Any, path: tuple[str, ...]):
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _set(node: dict, path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


_MISSING = object()


def _diff(before: Any, after: Any, prefix: str) -> list[str]:
    if isinstance(before, dict) and isinstance(after, dict):
        keys = sorted(set(before) | set(after))
        return [line for k in keys for line in _diff(before.get(k, _MISSING), after.get(k, _MISSING), f"{prefix}.{k}")]
    if before == after:
        return []
    show = lambda v: "(absent)" if v is _MISSING else repr(v)  # noqa: E731
    return [f"{prefix}: {show(before)} → {show(after)}"]


def _keep_built_vocab(composed_model: dict, saved_model: Any) -> dict:
    """``model.vocab_size: null`` means "the tokenizer's", which the saved config has already filled in."""
    if isinstance(saved_model, dict) and composed_model.get("vocab_size", 0) is None and "vocab_size" in saved_model:
        return {**composed_model, "vocab_size": saved_model["vocab_size"]}
    return composed_model


def continue_from_folder(overrides: list[str], composed_root) -> tuple[Any, list[str], Path] | None:
    """(the RootConfig to train, the changed values, R/config.yaml) when the command line's run_dir holds a
    saved config; None otherwise. ``composed_root``: the validated config of ``conf/`` + these overrides
    (it supplies the values of the keys the command line names). Raises ConfigError for a model change
    in a folder that holds checkpoints."""
    import yaml

    from training.config import ConfigError, validate

    path = saved_config_path(overrides)
    if path is None:
        return None
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(
            f"{path} is not a readable config ({type(e).__name__}: {e}); move it aside to start a fresh run there"
        ) from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} does not hold a config mapping; move it aside to start a fresh run there")
    composed = asdict(composed_root)
    merged = yaml.safe_load(yaml.safe_dump(saved))  # a deep copy
    changes = []
    for named in _named_paths(overrides, composed):
        value = _get(composed, named)
        if value is _MISSING:
            continue
        if named == ("model",) and isinstance(value, dict):
            value = _keep_built_vocab(value, _get(saved, named))
        changes += _diff(_get(saved, named), value, ".".join(named))
        _set(merged, named, value)
    for key in LAUNCH_KEYS:  # the launch's own settings (reported when they differ from the saved ones)
        value = _get(composed, key)
        if value is not _MISSING and _get(saved, key) is not _MISSING:
            changes += _diff(_get(saved, key), value, ".".join(key))
            _set(merged, key, value)
    merged["run_dir"] = composed["run_dir"]
    model_changes = [c for c in changes if c.startswith("model.") or c.startswith("model:")]
    has_checkpoints = any((path.parent / "checkpoints").glob("step_*"))
    if model_changes and has_checkpoints:
        raise ConfigError(
            f"run_dir={path.parent} was trained with another model; its checkpoints cannot take "
            f"{'; '.join(model_changes[:4])}{' …' if len(model_changes) > 4 else ''}. A run's model is fixed "
            "on resume: give a new run_dir to train this model"
        )
    return validate(merged), sorted(set(changes)), path


def describe(path: Path, changes: list[str]) -> str:
    """The line train.py prints when it continues a run from its folder."""
    head = f"continuing {path.parent} from its saved {path.name}"
    return head + (": " + "; ".join(changes) if changes else " (no command-line changes)")
