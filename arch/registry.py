"""Name → class registries for the pluggable blocks (attention, ffn, depth scheme).

A block is chosen in YAML by ``name`` (``model.attention.name: mha``); every other key of that
YAML node is a keyword-only constructor argument of the class. Positional constructor
arguments (``d_model``, ``n_heads``, ``layer_idx`` …) are supplied by the model, never by YAML.
So "the YAML's keys are exactly the class's constructor arguments" is checked mechanically,
before any tensor is allocated (see :func:`Registry.validate_options`).

A block also declares what it can do, as a class attribute ``capabilities = Capabilities(...)``
(see :class:`Capabilities`), read through :meth:`Registry.capabilities`; its option defaults are
its constructor's (:meth:`Registry.resolved_options`). Nothing outside the block file lists
blocks by name.

This module does not import torch: ``training.config`` imports it to validate configs. Reading a
block's options, defaults or capabilities loads its class (and so torch) on first use, once, at
validation time; importing ``training.config`` stays torch-free.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Capabilities:
    """What a block declares about itself (class attribute ``capabilities``; the default: none of these).

    ``expert_banks``: routed experts; a token reads k of E. ``elastic_width``: supports elastic
    expert subsets and elastic top-k (``ElasticSetting.expert_mask_E`` / ``top_k``); such a block
    takes ``n_experts`` and ``top_k`` constructor options. ``expert_parallel``: its expert banks
    shard over ranks (``expert_parallel_params()`` through ``arch/ffn/expert_parallel.py``).
    ``hf_export``: the options the Hugging Face exporter maps for it (None: not exportable; an
    option missing here is refused by the exporter until someone decides how it maps).
    ``needs_attention``: the attention blocks it works with (None: any).
    """

    expert_banks: bool = False
    elastic_width: bool = False
    expert_parallel: bool = False
    hf_export: tuple[str, ...] | None = None
    needs_attention: tuple[str, ...] | None = None

    @property
    def exportable(self) -> bool:
        return self.hf_export is not None


NO_CAPABILITIES = Capabilities()


class ConfigError(ValueError):
    """A config value or key is invalid. The message says what was wrong and what is allowed."""


def suggest(bad: str, allowed) -> str:
    """' Did you mean X?' when a close match exists, else ''."""
    close = difflib.get_close_matches(str(bad), [str(a) for a in allowed], n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


class Registry:
    """Maps block names to classes. Classes register themselves with ``@REGISTRY.register(name)``.

    Entries may also be registered lazily as ``"module.path:ClassName"`` strings so that looking
    up the valid names never requires importing torch.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[type], type]:
        def decorator(cls: type) -> type:
            existing = self._entries.get(name)
            if existing is not None and existing is not cls and not isinstance(existing, str):
                raise ValueError(f"{self.kind} block {name!r} is registered twice ({existing} and {cls})")
            self._entries[name] = cls
            cls.registry_name = name
            return cls

        return decorator

    def register_lazy(self, name: str, target: str) -> None:
        self._entries.setdefault(name, target)

    def unregister(self, name: str) -> None:
        """Forget block `name` (a block registered for one experiment or test)."""
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> type:
        if name not in self._entries:
            raise ConfigError(
                f"unknown {self.kind} block {name!r}; registered {self.kind} blocks: {self.names()}."
                + suggest(name, self.names())
            )
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            entry = getattr(importlib.import_module(module), attr)
            self._entries[name] = entry
        return entry

    def options(self, name: str) -> dict[str, inspect.Parameter]:
        """The keyword-only constructor parameters of block `name`: exactly its YAML keys."""
        signature = inspect.signature(self.get(name).__init__)
        return {p.name: p for p in signature.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def resolved_options(self, name: str, options: dict) -> dict:
        """Every keyword option of block `name`: the given values, the constructor's defaults for the rest."""
        resolved = {k: p.default for k, p in self.options(name).items() if p.default is not inspect.Parameter.empty}
        return {**resolved, **{k: v for k, v in options.items() if k != "name"}}

    def capabilities(self, name: str) -> Capabilities:
        """What block `name` declares (``cls.capabilities``), checked for consistency with its options."""
        cls = self.get(name)
        caps = getattr(cls, "capabilities", NO_CAPABILITIES)
        if not isinstance(caps, Capabilities):
            raise TypeError(f"{cls.__qualname__}.capabilities must be an arch.registry.Capabilities, got {caps!r}")
        if caps.elastic_width and not {"n_experts", "top_k"} <= set(self.options(name)):
            raise TypeError(
                f"{cls.__qualname__} declares elastic_width but lacks the n_experts / top_k options it implies"
            )
        return caps

    def with_capability(self, flag: str) -> list[str]:
        """Names of the registered blocks whose capability `flag` is set (loads every class)."""
        return [n for n in self.names() if getattr(self.capabilities(n), flag)]

    def validate_options(self, name: str, options: dict, where: str) -> None:
        """Raise ConfigError for unknown keys, missing required keys or values of the wrong type."""
        params = self.options(name)
        for key, value in options.items():
            if key not in params:
                raise ConfigError(
                    f"{where}.{key}: {self.kind} block {name!r} has no option {key!r}; "
                    f"its options are {sorted(params)}." + suggest(key, params)
                )
            _check_type(f"{where}.{key}", value, params[key].annotation, self.get(name))
        missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in options]
        if missing:
            raise ConfigError(f"{where}: {self.kind} block {name!r} needs options {missing}")

    def build(self, name: str, *args, **options):
        return self.get(name)(*args, **options)


def _check_type(where: str, value: Any, annotation: Any, owner: type) -> None:
    """Check `value` against a simple annotation: int/float/bool/str, Optional, Literal, list/tuple."""
    if annotation is inspect.Parameter.empty:
        return
    if isinstance(annotation, str):  # `from __future__ import annotations`
        try:
            module = importlib.import_module(owner.__module__)
            annotation = eval(annotation, vars(module))  # noqa: S307 - our own annotations
        except Exception:
            return
    if not _matches(value, annotation):
        choices = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else None
        allowed = f"one of {list(choices)}" if choices else f"a value of type {_type_name(annotation)}"
        raise ConfigError(f"{where}={value!r} is invalid; expected {allowed}.")


def _matches(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return True
    if origin is typing.Literal:
        return value in args
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        return any(_matches(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        try:
            from omegaconf import ListConfig

            return isinstance(value, (list, tuple, ListConfig))
        except ImportError:  # pragma: no cover
            return isinstance(value, (list, tuple))
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation))


ATTENTION = Registry("attention")
FFN = Registry("ffn")
DEPTH = Registry("depth")

# Lazy entries: the names are known without importing torch; the classes load on first use.
ATTENTION.register_lazy("mha", "arch.attention.mha:MultiHeadAttention")
ATTENTION.register_lazy("dha", "arch.attention.dha:DecoupledHeadAttention")
ATTENTION.register_lazy("mohd_mha", "arch.attention.mohd_attention:MoHDAttention")
FFN.register_lazy("swiglu", "arch.ffn.mlp:SwiGLUMLP")
FFN.register_lazy("moe", "arch.ffn.moe:MoEFFN")
FFN.register_lazy("emoe", "arch.ffn.moe:MoEFFN")  # same class; conf/model/ffn/emoe.yaml turns EMoE on
FFN.register_lazy("mhmoe", "arch.ffn.mhmoe:MultiHeadMoEFFN")  # Multi-Head MoE (sub-token routing)
FFN.register_lazy("moue", "arch.ffn.universal:UniversalMoEFFN")  # Mixture of Universal Experts (reconstruction)
FFN.register_lazy("mohd", "arch.ffn.mohd:MoHDFFN")
DEPTH.register_lazy("plain", "arch.depth.plain:PlainDepth")
DEPTH.register_lazy("loop", "arch.depth.loop:LoopDepth")
DEPTH.register_lazy("recurrent", "arch.depth.loop:RecurrentDepth")
DEPTH.register_lazy("itt", "arch.depth.itt:ITTDepth")
DEPTH.register_lazy("sgt", "arch.depth.sgt:SGTDepth")

REGISTRIES = {"attention": ATTENTION, "ffn": FFN, "depth": DEPTH}
