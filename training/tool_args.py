"""The one command-line idiom of every non-Hydra tool (sampling, export, reports, converters, merging, the suite).

Every tool builds its parser with ``tool_parser`` and reads it with ``parse``: options are written
``key=value`` (as in ``train.py``) or ``--key value`` / ``--key=value`` (argparse's own form), and
``--help`` lists every option with its type, default and meaning. Options can be declared from a
dataclass (``add_dataclass_options``: one field = one option, its trailing comment-style help given
through ``field(metadata={"help": ...})`` or ``HELP`` on the class). Config overrides that a tool
passes on to a run (``model.ffn.top_k=4``, ``seed=1``) are the ``key=value`` words it does not declare,
returned separately when the tool asks for them (Hydra then checks them against the config).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Any, get_type_hints

from arch.registry import ConfigError, suggest

_KEY_VALUE = re.compile(r"^([A-Za-z_][\w.-]*)=(.*)$", re.S)
_OVERRIDE = re.compile(r"^[A-Za-z_+~][\w./+~-]*=")  # a Hydra override word: key=value, model.ffn.top_k=4, +key=value


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in every option's help, and the description's own line breaks kept."""


def tool_parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser that also reads ``key=value`` words; ``prog`` is the command (``python -m …``)."""
    epilog = (epilog + "\n\n" if epilog else "") + "Options may also be written key=value (e.g. seed=1)."
    return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog, formatter_class=_Formatter)


def _as_option_words(argv: list[str], options: dict[str, argparse.Action]) -> list[str]:
    """``key=value`` → ``--key=value`` for declared options (``flag=true`` → ``--flag`` for switches)."""
    out = []
    for word in argv:
        match = _KEY_VALUE.match(word)
        action = options.get(match.group(1).replace("-", "_")) if match else None
        if action is None:
            out.append(word)
            continue
        option, value = max(action.option_strings, key=len), match.group(2)
        if action.nargs == 0:  # a switch (store_true): key=true turns it on, key=false leaves it off
            if parse_bool(value):
                out.append(option)
        else:
            out.append(f"{option}={value}")
    return out


def _declared(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Each option's dest → its action (``seq_len`` → the ``--seq-len`` action)."""
    return {a.dest: a for a in parser._actions if a.option_strings}


def parse(parser: argparse.ArgumentParser, argv: list[str] | None, overrides: bool = False):
    """Parse ``argv`` (None: ``sys.argv[1:]``). With ``overrides=True`` returns ``(args, [key=value …])``: the
    undeclared ``key=value`` words, which the tool forwards to Hydra as config overrides. Without it an
    undeclared key is an error naming the allowed options."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    declared = _declared(parser)
    words = _as_option_words(argv, declared)
    if not overrides:
        _refuse_unknown_keys(parser, words, declared)
        return parser.parse_args(words)
    forwarded = [w for w in words if _OVERRIDE.match(w)]
    rest = [w for w in words if not _OVERRIDE.match(w)]
    return parser.parse_args(rest), forwarded


def _refuse_unknown_keys(parser: argparse.ArgumentParser, words: list[str], declared: set[str]) -> None:
    for word in words:
        match = _KEY_VALUE.match(word)
        if match and not word.startswith("-"):
            key = match.group(1)
            choices = sorted(set(declared) - {"help"})
            raise ConfigError(f"{parser.prog}: unknown option {key!r}; options are {choices}." + suggest(key, choices))


def parse_bool(raw: str) -> bool:
    """true/false (also 1/0, yes/no) → bool; anything else is an argparse error naming the value."""
    if raw.lower() in ("true", "1", "yes"):
        return True
    if raw.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {raw!r}")


def add_dataclass_options(parser: argparse.ArgumentParser, schema: type, required: tuple[str, ...] = ()) -> None:
    """One option per field of ``schema``, typed by its annotation, defaulting to its default."""
    hints = get_type_hints(schema)
    helps = getattr(schema, "HELP", {})
    for f in dataclasses.fields(schema):
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        text = f.metadata.get("help") or helps.get(f.name) or f.name.replace("_", " ")
        convert = parse_bool if kind is bool else kind
        parser.add_argument(
            f"--{f.name}",
            type=convert,
            default=default,
            required=f.name in required,
            help=text,
            metavar=getattr(kind, "__name__", "VALUE").upper(),
        )


def dataclass_from(args: argparse.Namespace, schema: type) -> Any:
    """The ``schema`` instance from the parsed options of ``add_dataclass_options``."""
    return schema(**{f.name: getattr(args, f.name) for f in dataclasses.fields(schema)})


__all__ = ["ConfigError", "add_dataclass_options", "dataclass_from", "parse", "parse_bool", "tool_parser"]
