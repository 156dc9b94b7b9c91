"""Friendly command-line errors: unknown keys list the keys allowed there; bad values say what is allowed.

Hydra rejects an unknown key with "Key 'x' is not in struct" but does not say what the valid
keys are. ``check_overrides`` composes the config first (the same way Hydra will) and turns such
failures, and our own validation errors, into one clear message and exit status 2, before any
work is done.
"""
from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
_NOT_IN_STRUCT = re.compile(r"Could not override '([^']+)'|Key '([^']+)' is not in struct")


def _key_overrides(argv: list[str]) -> list[str]:
    return [a for a in argv if "=" in a and not a.startswith("-") and not a.lstrip("+~").startswith("hydra")]


def compose(overrides: list[str]):
    """Compose ``conf/config.yaml`` with overrides, as ``train.py`` would (no Hydra run folder)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def explain_override_error(error: Exception, overrides: list[str]) -> str:
    """Hydra's message, plus the keys that exist where an unknown key was given."""
    from omegaconf import DictConfig

    message = str(error)
    match = _NOT_IN_STRUCT.search(message)
    if not match:
        return message
    key = (match.group(1) or match.group(2)).lstrip("+~")
    others = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key]
    try:
        cfg = compose(others)
    except Exception:
        return message
    parent_path, _, leaf = key.rpartition(".")
    node = cfg
    for part in filter(None, parent_path.split(".")):
        node = node.get(part) if isinstance(node, DictConfig) else None
    if not isinstance(node, DictConfig):
        return message
    from arch.registry import suggest

    where = parent_path or "the top level"
    return f"unknown config key {key!r}: {where} has keys {sorted(node.keys())}.{suggest(leaf, list(node.keys()))}"


def check_overrides(argv: list[str]) -> None:
    """Validate a single-run command line before Hydra starts; exit 2 with a clear message if invalid."""
    if any(a in ("-m", "--multirun") or a.startswith("--") or a in ("-h", "-c", "-i") for a in argv):
        return  # sweeps and Hydra's own flags: each job validates itself when it starts
    from training.config import ConfigError, validate

    overrides = _key_overrides(argv)
    try:
        cfg = compose(overrides)
    except Exception as e:  # Hydra composition errors (unknown key, unknown option, bad syntax)
        _fail(explain_override_error(e, overrides))
    try:
        validate(cfg)
    except ConfigError as e:
        _fail(str(e))


def _fail(message: str) -> None:
    print(f"config error: {message}", file=sys.stderr)
    sys.exit(2)


@contextlib.contextmanager
def report_errors():
    """Turn the errors a user can fix (config, checkpoint, data) into one line and exit status 2."""
    from training.errors import CheckpointError
    from training.config import ConfigError
    from training.errors import NonFiniteLossError

    try:
        yield
    except (ConfigError, CheckpointError, NonFiniteLossError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
