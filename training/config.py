"""The config's validation. Imports neither torch nor the model code.

Hydra composes ``conf/``; :func:`validate` then checks every key and value against the
dataclasses of ``training/config_schema.py`` and against the block registries, *before* any data
is read or tensor allocated. Every error says what was wrong and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Literal

from arch.registry import FFN, REGISTRIES, ConfigError, _matches, suggest
from training.config_schema import ModelConfig, RootConfig

# Keys Hydra adds that are not ours to validate.
_IGNORED_ROOT_KEYS = {"hydra"}


def validate(cfg: Any) -> RootConfig:
    """Check a composed config (DictConfig or dict) and return it as typed dataclasses.

    Raises ConfigError naming the key, the bad value and what is allowed.
    """
    plain = _to_plain(cfg)
    root = _build("", plain, RootConfig)
    _check_values(root)
    return root


def _to_plain(cfg: Any) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return dict(cfg)


def _build(where: str, node: Any, schema: type) -> Any:
    """Recursively turn a dict into `schema`, rejecting unknown keys and wrongly-typed values."""
    if not isinstance(node, dict):
        raise ConfigError(
            f"{where or 'config'} must be a mapping with keys {[f.name for f in dataclasses.fields(schema)]}, got "
            f"{node!r}"
        )
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    kwargs = {}
    for key, value in node.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            if not where and key in _IGNORED_ROOT_KEYS:
                continue
            raise ConfigError(f"unknown key {path!r}; allowed keys here: {sorted(fields)}." + suggest(key, fields))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(path, value, hint)
            continue
        if not _matches(value, hint):
            choices = typing.get_args(hint) if typing.get_origin(hint) is Literal else None
            allowed = f"one of {list(choices)}" if choices else f"a {_hint_name(hint)}"
            extra = suggest(value, choices) if choices else ""
            raise ConfigError(f"{path}={value!r} is invalid; allowed: {allowed}.{extra}")
        kwargs[key] = value
    return schema(**kwargs)


def _hint_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if args:
        return " or ".join(_hint_name(a) for a in args)
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_values(root: RootConfig) -> None:
    """Cross-field and range checks that a type cannot express."""
    m, d, o, s, t = root.model, root.data, root.optim, root.schedule, root.trainer
    _check_finite("", dataclasses.asdict(root))
    _require(0 <= root.seed < 2**32, f"seed={root.seed} must be in [0, 2**32) (numpy's seed range)")
    _require(d.seq_len > 0, f"data.seq_len={d.seq_len} must be positive")  # first: model.max_seq_len defaults to it
    for key in ("d_model", "n_layers", "n_heads", "max_seq_len"):
        _require(getattr(m, key) > 0, f"model.{key}={getattr(m, key)} must be a positive integer")
    for key in ("norm_eps", "rope_theta", "init_std"):
        _require(getattr(m, key) > 0, f"model.{key}={getattr(m, key)} must be > 0")
    _require(
        m.vocab_size is None or m.vocab_size > 0,
        f"model.vocab_size={m.vocab_size} must be positive or null (from the tokenizer)",
    )
    _require(m.d_model % m.n_heads == 0, f"model.d_model={m.d_model} must be divisible by model.n_heads={m.n_heads}")
    _require(
        (m.d_model // m.n_heads) % 2 == 0,
        f"model head dim d_model/n_heads={m.d_model // m.n_heads} must be even (RoPE)",
    )
    for group in ("attention", "ffn", "depth"):
        node = getattr(m, group)
        registry = REGISTRIES[group]
        _require(
            isinstance(node, dict) and "name" in node, f"model.{group} needs a 'name'; registered: {registry.names()}"
        )
        registry.get(node["name"])  # unknown name → ConfigError listing the registered ones
        registry.validate_options(node["name"], {k: v for k, v in node.items() if k != "name"}, f"model.{group}")
        _check_block_ranges(f"model.{group}", node)
    for group in ("ffn", "depth"):  # a block may declare the attention blocks it works with
        needs = REGISTRIES[group].capabilities(getattr(m, group)["name"]).needs_attention
        _require(
            needs is None or m.attention["name"] in needs,
            f"model.{group}.name={getattr(m, group)['name']!r} cannot be combined with model.attention.name="
            f"{m.attention['name']!r}; it needs model.attention.name in {list(needs or ())}",
        )
    n_kv = m.attention.get("n_kv_heads")
    if n_kv is not None:
        _require(
            n_kv > 0 and m.n_heads % n_kv == 0,
            f"model.attention.n_kv_heads={n_kv} must divide model.n_heads={m.n_heads}",
        )

    _require(
        d.seq_len <= m.max_seq_len,
        f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}; raise model.max_seq_len or lower "
        "data.seq_len",
    )
    _require(0 < d.val_fraction < 1, f"data.val_fraction={d.val_fraction} must be in (0, 1)")
    _require(
        d.tokenizer.kind != "bpe" or d.tokenizer.vocab_size >= 257,
        f"data.tokenizer.vocab_size={d.tokenizer.vocab_size} must be >= 257 for a byte-level BPE",
    )
    _require(
        d.tokenizer.kind != "hf" or bool(d.tokenizer.name),
        "data.tokenizer.kind=hf needs data.tokenizer.name (a Hugging Face tokenizer name or path)",
    )
    _require(
        d.source != "files" or len(d.paths) > 0,
        "data.source=files needs data.paths: a list of globs of .txt, .jsonl or .parquet files",
    )
    _require(d.source != "hf" or bool(d.hf.path), "data.source=hf needs data.hf.path (e.g. roneneldan/TinyStories)")
    _require(bool(d.cache_dir), "data.cache_dir='' must be a folder path (token shards are cached there)")
    _require(bool(d.text_field), "data.text_field='' must name the text column of the .jsonl / .parquet / hf records")
    _require(d.tokenizer.vocab_size >= 1, f"data.tokenizer.vocab_size={d.tokenizer.vocab_size} must be positive")
    _require(
        d.tokenizer.vocab_size <= 2**32 - 1,
        f"data.tokenizer.vocab_size={d.tokenizer.vocab_size} must be < 2**32 (uint32 shards)",
    )
    for key in ("max_docs", "max_bytes"):
        value = getattr(d.hf, key)
        _require(value is None or value > 0, f"data.hf.{key}={value} must be positive or null (no limit)")
    syn = d.synthetic
    for key in ("num_train", "num_val", "n_keys"):
        _require(getattr(syn, key) > 0, f"data.synthetic.{key}={getattr(syn, key)} must be a positive integer")
    _require(syn.modulus >= 2, f"data.synthetic.modulus={syn.modulus} must be >= 2")
    _require(0 <= syn.seed < 2**32, f"data.synthetic.seed={syn.seed} must be in [0, 2**32)")

    _require(o.lr > 0, f"optim.lr={o.lr} must be > 0")
    _require(o.eps > 0, f"optim.eps={o.eps} must be > 0 (it keeps Adam's denominator away from zero)")
    _require(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    _require(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be >= 0 (0 disables clipping)")
    _require(
        len(o.betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in o.betas),
        f"optim.betas={o.betas} must be two numbers in [0, 1)",
    )
    _require(s.warmup_steps >= 0, f"schedule.warmup_steps={s.warmup_steps} must be >= 0")
    _require(0 <= s.min_lr_ratio <= 1, f"schedule.min_lr_ratio={s.min_lr_ratio} must be in [0, 1]")
    _require(0 < s.decay_fraction <= 1, f"schedule.decay_fraction={s.decay_fraction} must be in (0, 1]")

    for key in ("max_steps", "batch_size", "grad_accum", "log_every", "eval_every", "checkpoint_every", "keep_last"):
        _require(getattr(t, key) > 0, f"trainer.{key}={getattr(t, key)} must be a positive integer")
    _require(t.eval_batches > 0, f"trainer.eval_batches={t.eval_batches} must be positive")
    _require(t.sample_tokens >= 0, f"trainer.sample_tokens={t.sample_tokens} must be >= 0")
    _require(t.sample_temperature >= 0, f"trainer.sample_temperature={t.sample_temperature} must be >= 0")
    _require(
        t.sample_top_k is None or t.sample_top_k >= 1,
        f"trainer.sample_top_k={t.sample_top_k} must be >= 1 or null (sample from the whole vocabulary)",
    )
    _require(bool(t.resume), "trainer.resume='' must be auto, none or a checkpoint path")
    _require(t.threads is None or t.threads > 0, f"trainer.threads={t.threads} must be positive or null")
    _require(
        t.expert_parallel >= 1, f"trainer.expert_parallel={t.expert_parallel} must be >= 1 (1 = no expert parallelism)"
    )
    _require(
        t.expert_parallel == 1 or FFN.capabilities(m.ffn["name"]).expert_parallel,
        f"trainer.expert_parallel={t.expert_parallel} needs an expert FFN whose experts shard over ranks "
        f"(model/ffn in {FFN.with_capability('expert_parallel') if t.expert_parallel != 1 else []}), "
        f"got model.ffn.name={m.ffn['name']!r}",
    )
    _require(
        not t.checkpoint_async or t.checkpoint_format != "torch",
        "trainer.checkpoint_async=true needs trainer.checkpoint_format=dcp or auto (torch.save is synchronous)",
    )
    _require(bool(root.run_dir), "run_dir='' must be a non-empty path")
    _check_elastic(root)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_finite(where: str, node: Any) -> None:
    """Every float anywhere in the config must be finite: nan/inf pass every `> 0` test but train garbage."""
    if isinstance(node, dict):
        for key, value in node.items():
            _check_finite(f"{where}.{key}" if where else str(key), value)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            _check_finite(f"{where}[{i}]", value)
    elif isinstance(node, float):
        _require(math.isfinite(node), f"{where}={node} must be a finite number")


# Ranges of block options, by option name: a name means the same thing in every block that has it
# (arch/registry.py: the YAML keys are the constructor's arguments). Constructors check what needs the
# other options (top_k <= n_experts, n_groups divides d_model ...); these are the single-option ranges.
# Each entry: (test, what is allowed). `None` passes wherever the option's type allows null.
_POSITIVE = (lambda v: v > 0, "must be > 0")
_AT_LEAST_1 = (lambda v: v >= 1, "must be >= 1")
_NON_NEGATIVE = (lambda v: v >= 0, "must be >= 0")
_PROBABILITY = (lambda v: 0 <= v <= 1, "must be in [0, 1]")
_HALF_OPEN_UNIT = (lambda v: 0 <= v < 1, "must be in [0, 1)")
BLOCK_OPTION_RANGES: dict[str, tuple] = {
    **dict.fromkeys(
        (
            "n_experts",
            "top_k",
            "expert_hidden",
            "hidden_dim",
            "multiple_of",
            "xmoe_dim",
            "eval_top_k",
            "k_ideal",
            "n_clusters",
            "n_groups",
            "n_active",
            "n_universal",
            "window_size",
            "window_stride",
            "widen_to",
            "trajectory_dim",
            "n_kv_heads",
            "n_heads",
            "steps",
            "repeats",
            "mean_recurrence",
            "mean_backprop_depth",
            "core_layers",
            "first_selection_step",
            "top_k_layers",
            "max_selected_layers",
            "max_loop_depth",
            "num_keep_heads",
            "k_heads",
            "v_heads",
        ),
        _AT_LEAST_1,
    ),
    **dict.fromkeys(
        ("xmoe_temperature", "width_multiplier", "sigma", "state_std", "state_scale", "capacity_factor"), _POSITIVE
    ),
    "eval_capacity_fraction": (lambda v: 0 < v <= 1, "must be in (0, 1] (a fraction of the tokens per expert)"),
    **dict.fromkeys(
        (
            "n_shared_experts",
            "n_shared",
            "n_local",
            "widen_start",
            "widen_steps",
            "prelude_layers",
            "coda_layers",
            "router_noise",
            "balance_loss_coef",
            "seq_balance_loss_coef",
            "z_loss_coef",
            "bias_update_rate",
            "hier_loss_coef",
            "cluster_var_loss_coef",
        ),
        _NON_NEGATIVE,
    ),
    **dict.fromkeys(("coactivation_prob", "ema_decay"), _PROBABILITY),
    **dict.fromkeys(("cluster_dropout", "threshold_momentum", "trajectory_decay"), _HALF_OPEN_UNIT),
    "hier_gamma": (lambda v: 0 < v <= 1, "must be in (0, 1] (target weights gamma^rank decay with rank)"),
    "seed": (lambda v: 0 <= v < 2**32, "must be in [0, 2**32)"),
}


def _check_block_ranges(where: str, node: dict) -> None:
    for key, value in node.items():
        rule = BLOCK_OPTION_RANGES.get(key)
        if rule is None or not _is_number(value):  # null / lists: the constructor judges them
            continue
        test, allowed = rule
        _require(test(value), f"{where}.{key}={value} {allowed}" + (" or null" if key in _NULLABLE_OPTIONS else ""))


_NULLABLE_OPTIONS = {
    "expert_hidden",
    "hidden_dim",
    "eval_top_k",
    "k_ideal",
    "window_stride",
    "widen_to",
    "n_kv_heads",
    "state_std",
    "state_scale",
    "capacity_factor",
    "eval_capacity_fraction",
    "k_heads",
    "v_heads",
}


def elastic_dims(model: ModelConfig) -> tuple[int, int | None, int | None]:
    """(n_layers, n_experts, top_k) for elastic sub-networks: the expert count and top-k of an FFN that
    declares ``elastic_width`` (its options, else its constructor's defaults), (n_layers, None, None) otherwise."""
    name = model.ffn["name"]
    if not FFN.capabilities(name).elastic_width:
        return model.n_layers, None, None
    options = FFN.resolved_options(name, model.ffn)
    return model.n_layers, options["n_experts"], options["top_k"]


def _check_elastic(root: RootConfig) -> None:
    e, ffn = root.elastic, root.model.ffn
    for key in ("depth_full_prob", "width_full_prob", "topk_full_prob"):
        _require(0 <= getattr(e, key) <= 1, f"elastic.{key}={getattr(e, key)} must be a probability in [0, 1]")
    _require(
        all(isinstance(s, int) and not isinstance(s, bool) for s in e.subset_sizes),
        f"elastic.subset_sizes={e.subset_sizes} must be a list of integers (expert-subset sizes)",
    )
    # Single-option ranges hold even while elastic training is off (the preset may turn it on later).
    _require(e.depth_min >= 1, f"elastic.depth_min={e.depth_min} must be >= 1 (layers kept)")
    _require(e.topk_min >= 1, f"elastic.topk_min={e.topk_min} must be >= 1")
    _require(e.topk_max is None or e.topk_max >= 1, f"elastic.topk_max={e.topk_max} must be >= 1 or null (top_k - 1)")
    if not e.enabled:
        return
    _require(
        1 <= e.depth_min <= root.model.n_layers,
        f"elastic.depth_min={e.depth_min} must be in [1, model.n_layers={root.model.n_layers}]",
    )
    _, n_experts, top_k = elastic_dims(root.model)
    sparse = n_experts is not None
    if not sparse and (e.width_full_prob != 1 or e.topk_full_prob != 1):
        raise ConfigError(
            "elastic width/top-k need an MoE FFN that declares elastic widths (model/ffn in "
            f"{FFN.with_capability('elastic_width')}), "
            f"got model.ffn.name={ffn.get('name')!r}; set elastic.width_full_prob=1 elastic.topk_full_prob=1 for "
            "elastic depth alone"
        )
    if sparse:
        _require(
            all(1 <= s <= n_experts for s in e.subset_sizes),
            f"elastic.subset_sizes={e.subset_sizes} must lie in [1, n_experts={n_experts}]",
        )
        _require(1 <= e.topk_min <= top_k, f"elastic.topk_min={e.topk_min} must be in [1, model.ffn.top_k={top_k}]")
        _require(
            e.topk_max is None or e.topk_min <= e.topk_max <= top_k,
            f"elastic.topk_max={e.topk_max} must be in [topk_min={e.topk_min}, top_k={top_k}]",
        )
