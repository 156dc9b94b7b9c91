"""Friendly command-line errors, checked before Hydra writes anything.

Hydra rejects an unknown key with "Key 'x' is not in struct" but does not say what the valid keys
are, reports an unknown group option as a multi-line "Could not find", silently skips an unknown
``experiment=`` (the group is optional), and creates ``run_dir/.hydra/`` before our code runs.
:func:`preflight` therefore does everything that can refuse a command line first: compose the
config (Hydra's part included), validate it, check what only the machine and the files can say
(device, resume path, meta-device model build, data sources, the token shards), and prints one line
naming the key, the value and what is allowed, with exit status 2 and no traceback.
"""

from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
_NOT_IN_STRUCT = re.compile(r"Could not override '([^']+)'|Key '([^']+)' is not in struct")
_MISSING_OPTION = re.compile(r"Could not find '([^']+)'")
_MERGING = re.compile(r"Error merging override (\S+)")
# Hydra flags that only print (help, config, info): nothing is run or written, so nothing to refuse.
_INFO_FLAGS = ("-h", "--help", "--hydra-help", "--version", "-c", "--cfg", "-i", "--info", "--shell-completion", "-sc")
# Flags that change which config is composed; preflight cannot reproduce them, so it steps aside.
_CONFIG_FLAGS = ("-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir", "--experimental-rerun")


def _key_overrides(argv: list[str], hydra_keys: bool = False) -> list[str]:
    """The ``key=value`` overrides of a command line (flags and their values dropped)."""
    out = [a for a in argv if "=" in a and not a.startswith("-")]
    return out if hydra_keys else [a for a in out if not a.lstrip("+~").startswith("hydra")]


def compose(overrides: list[str], with_hydra: bool = False):
    """Compose ``conf/config.yaml`` with overrides, as ``train.py`` would (no Hydra run folder).

    with_hydra: also compose (and so check) Hydra's own node; the result then holds ``hydra``.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=with_hydra)


def group_choices(group: str) -> list[str] | None:
    """The options of config group `group` (``model/ffn``), or None if it is not a group folder."""
    folder = CONF_DIR / group
    if not group or not folder.is_dir():
        return None
    return sorted(p.stem for p in folder.glob("*.yaml"))


def check_group_options(overrides: list[str]) -> None:
    """ConfigError for ``group=option`` naming an option that does not exist, with the choices.

    Hydra only says so for mandatory groups, and in several lines; ``experiment`` is optional, so
    ``experiment=nope`` would otherwise train the default model without a word.
    """
    from arch.registry import suggest
    from training.config import ConfigError

    for override in overrides:
        key, _, value = override.partition("=")
        group = key.lstrip("+~").split("@")[0]
        # Hydra's own groups (hydra/launcher ...) live partly in its package: Hydra lists those.
        choices = None if group.startswith("hydra") else group_choices(group)
        if choices is None or value in ("", "null") or "," in value or "(" in value:
            continue  # not a group, deleted / null, or a sweep (each job checks itself)
        if value not in choices:
            raise ConfigError(
                f"{group}={value}: no such option in config group {group!r}; choices: "
                f"{', '.join(choices)}.{suggest(value, choices)}"
            )


def explain_override_error(error: Exception, overrides: list[str], compose_fn=None) -> str:
    """Hydra's composition error as one line: the key, the value and what is allowed there."""
    from omegaconf import DictConfig

    message = str(error)
    first = message.strip().splitlines()[0] if message.strip() else type(error).__name__
    missing = _MISSING_OPTION.search(message)
    if missing:
        group, _, value = missing.group(1).rpartition("/")
        listed = re.search(r"Available options in '[^']+':\n((?:\t[^\n]*\n?)+)", message)
        choices = [c.strip() for c in listed.group(1).splitlines() if c.strip()] if listed else group_choices(group)
        if choices:
            from arch.registry import suggest

            return (
                f"{group}={value}: no such option in config group {group!r}; choices: "
                f"{', '.join(choices)}.{suggest(value, choices)}"
            )
        return first
    merging = _MERGING.search(message)
    if merging:
        cause = error.__cause__ or error.__context__
        detail = str(cause).strip().splitlines()[0] if cause is not None and str(cause).strip() else "wrong type"
        return f"{merging.group(1)}: {detail}"
    if type(error).__name__ == "OverrideParseException":
        bad = next((o for o in overrides if _unbalanced(o)), None)
        return (
            f"cannot parse override {bad or ''!r}: {first} (see https://hydra.cc/docs/advanced/override_grammar/basic)"
        )
    match = _NOT_IN_STRUCT.search(message)
    if not match:
        return " ".join(line.strip() for line in message.strip().splitlines()[:3])
    key = (match.group(1) or match.group(2)).lstrip("+~")
    others = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key]
    try:
        cfg = compose_fn(others) if compose_fn else compose(others, with_hydra=key.startswith("hydra"))
    except Exception:  # noqa: BLE001 - the plain message is still useful
        return first
    # Walk down to the first part of the key that does not exist and list the keys at that level.
    node, parents, leaf = cfg, [], key
    for part in key.split("."):
        if not isinstance(node, DictConfig):
            return first
        if part not in node:
            leaf = part
            break
        node, parents = node.get(part), [*parents, part]
    if not isinstance(node, DictConfig):
        return first
    from arch.registry import suggest

    where = ".".join(parents) or "the top level"
    return f"unknown config key {key!r}: {where} has keys {sorted(node.keys())}.{suggest(leaf, list(node.keys()))}"


def _unbalanced(override: str) -> bool:
    return any(override.count(a) != override.count(b) for a, b in ("[]", "{}", "()")) or override.count("'") % 2 == 1


def _validated(overrides: list[str], with_hydra: bool):
    """Compose and validate; ConfigError (one line) on any failure."""
    from omegaconf import open_dict

    from training.config import ConfigError, validate

    check_group_options(overrides)
    try:
        cfg = compose(overrides, with_hydra=with_hydra)
    except Exception as e:  # noqa: BLE001 - Hydra composition errors (unknown key / option, bad syntax, types)
        raise ConfigError(explain_override_error(e, overrides)) from None
    if with_hydra:
        with open_dict(cfg):
            cfg.pop("hydra")
    return validate(cfg)


def preflight(argv: list[str], *, data: bool = True) -> None:
    """Refuse a bad command line before anything is written: exit 2 with one line on stderr.

    Single runs get every check, the data included (the token shards are prepared here, into the
    data cache, so a bad file is named before the run folder exists). For a sweep (``-m``) each
    grid point of the command line is checked without the data (jobs differ only in the keys swept).
    """
    if any(a in _INFO_FLAGS for a in argv) or any(a.split("=")[0] in _CONFIG_FLAGS for a in argv):
        return
    multirun = any(a in ("-m", "--multirun") for a in argv)
    overrides = _key_overrides(argv, hydra_keys=True)
    with report_errors():
        if multirun:
            for job in _sweep_jobs(overrides):
                _check_one(job, data=False)
        else:
            _check_one(overrides, data=data)


def _check_one(overrides: list[str], data: bool) -> None:
    from training.distributed.env import env_world

    root = _validated(overrides, with_hydra=True)
    from training.run_config import continue_from_folder

    continued = continue_from_folder(overrides, root)  # run_dir=R with a saved config: R's config is the base
    if continued is not None:
        root = continued[0]
    _, _, world = env_world()
    from training.build import check_runtime

    check_runtime(root, world)
    if data:
        check_data(root)


def check_data(root) -> None:
    """Prepare (or open and verify) the token shards and check they fit the model and seq_len."""
    from training.build import check_vocab
    from training.data.shards import check_seq_len, prepare_data

    prepared = prepare_data(root.data, progress=root.trainer.progress)
    check_seq_len(prepared, root.data.seq_len)
    check_vocab(root, prepared.tokenizer.vocab_size)


def _sweep_jobs(overrides: list[str], limit: int = 256) -> list[list[str]]:
    """The command line's grid points as plain override lists (Hydra's basic sweeper's expansion).

    Sweeps it cannot expand (Optuna intervals) and grids over `limit` jobs are checked with the
    swept keys left at their defaults; each job still validates itself when it starts.
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:  # noqa: BLE001
        from training.config import ConfigError

        raise ConfigError(explain_override_error(e, overrides)) from None
    try:
        batches = BasicSweeper.split_arguments(parsed, None)
        jobs = [job for batch in batches for job in batch]
    except Exception:  # noqa: BLE001 - not a grid (interval(), tag() ...)
        jobs = []
    if not jobs or len(jobs) > limit:
        return [[o.input_line for o in parsed if not o.is_sweep_override()]]
    return jobs


EVALUATE_ANALYSES = ("elastic", "routing", "depth", "all")


def check_evaluate_arguments(argv: list[str]) -> None:
    """``evaluate.py``'s command line: known keys, a checkpoint that exists, values in range (exit 2)."""
    if any(a in _INFO_FLAGS for a in argv):
        return
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from training.config import ConfigError

    def compose_evaluate(overrides):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name="evaluate", overrides=overrides)

    overrides = _key_overrides(argv)
    with report_errors():
        try:
            cfg = compose_evaluate(overrides)
        except Exception as e:  # noqa: BLE001 - composition errors: unknown key, bad syntax
            message = explain_override_error(e, overrides, compose_evaluate)
            raise ConfigError(message.replace("unknown config key", "unknown evaluate.py key")) from None
        if OmegaConf.is_missing(cfg, "ckpt"):
            raise ConfigError("ckpt is required: python evaluate.py ckpt=<run folder or checkpoint .pt>")
        if not Path(str(cfg.ckpt)).expanduser().exists():
            raise ConfigError(f"ckpt={cfg.ckpt}: no such run folder or checkpoint file")
        if cfg.analysis not in EVALUATE_ANALYSES:
            raise ConfigError(f"analysis={cfg.analysis!r} is invalid; allowed: one of {list(EVALUATE_ANALYSES)}")
        for key in ("batch_size", "eval_batches", "sweep.subset_draws"):
            value = OmegaConf.select(cfg, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{key}={value!r} must be a positive integer")
        if cfg.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device={cfg.device!r} is invalid; allowed: one of ['auto', 'cpu', 'cuda']")
        if cfg.device == "cuda":
            from training.build import resolve_device

            resolve_device("cuda", key="device")


def check_overrides(argv: list[str]) -> None:
    """The config part of :func:`preflight` (no data): kept for callers that only compose."""
    preflight(argv, data=False)


@contextlib.contextmanager
def report_errors(prefix: str = "error"):
    """Turn the errors a user can fix (config, checkpoint, data) into one line and exit status 2."""
    from training.config import ConfigError
    from training.errors import CheckpointError, NonFiniteLossError

    try:
        yield
    except (ConfigError, CheckpointError, NonFiniteLossError, FileNotFoundError, ValueError) as e:
        print(f"{prefix}: {e}", file=sys.stderr)
        sys.exit(2)
