"""Parameter, FLOP and KV-cache accounting for any model config, any block and any elastic setting.

    python -m training.accounting.account model=moe_tiny model.ffn.top_k=4      # the table for a config
    python -m training.accounting.account model=dense_124m --vocab-size 50304 --seq-len 1024

``account(model, seq_len, elastic)`` reads a built model (or a sub-network of it);
``account_config(cfg, seq_len, vocab_size)`` builds the model on the ``meta`` device first, so a
config of any size is accounted in well under a second without allocating its weights. This
module only walks the model and sums: every block answers its own ``cost(setting)`` from its own
file (the record and the shared conventions are in ``arch/cost.py``).

Conventions (every number is per token):

- **Parameters.** ``total_params``: every stored parameter once (tied embeddings once), less
  what an elastic sub-network leaves out (skipped layers, masked experts). ``embedding_params``:
  the vocabulary matrices (input table, plus the LM head when untied). ``active_params``: the
  parameters one token's forward reads, vocabulary matrices included in full (the "activated
  parameters" of MoE papers: Mixtral, OLMoE); ``active_non_embedding_params`` leaves them out
  (Kaplan et al.'s N). A weight reused by loops, recurrence, ITT steps or several layers (a MoUE
  pool) counts once; routed experts count k per MoE call, capped by the experts that exist (an
  upper bound on the distinct experts a token touches). MoHD counts its active groups only.
- **FLOPs.** 2 per multiply-accumulate of every matmul a token goes through, plus causal
  attention: QKᵀ and PV cost 2·2·H·d·(T + 1)/2 per layer call (query i meets i keys; the mean
  over positions counts each causal pair once). Norms, activations, softmax, RoPE, gating and the
  embedding lookup are not counted. Routed blocks count activated compute only (k experts,
  selected ITT tokens, MoHD's active groups), dropless (capacity drops are not subtracted).
  ``train_flops_per_token`` = 3 × forward (backward ≈ 2 × forward), except that work run under
  ``no_grad`` (Huginn's truncated-backprop iterations) costs 1 ×.
- **Mode.** Training mode uses the training routing (top_k, the sampler's expected recurrence
  counts); eval mode uses eval_top_k and eval_iterations. **KV cache**: K and V of every
  attention call that keeps a cache slot in generation (each loop repeat, recurrence at the
  evaluation iteration count, each ITT step, each SGT loop pass), at ``dtype_bytes`` per element;
  DHA stores its g_K + g_V shared heads, GQA its n_kv_heads, MoHD attention all of its heads.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from arch.cost import Cost, CostSetting, cost_of, linear_flops, numel
from arch.layers import ElasticSetting

_DTYPE_NAMES = {1: "fp8/int8", 2: "bf16/fp16", 4: "fp32"}


@dataclass(frozen=True)
class ModelAccounting:
    """Per-token parameters, FLOPs and KV-cache bytes of a model run (see the module docstring)."""

    total_params: int  # stored (of the sub-network, if elastic), tied weights once
    embedding_params: int  # vocabulary matrices: input table (+ LM head if untied)
    active_params: float  # read by one token's forward, vocabulary matrices included
    active_non_embedding_params: float  # the same without the vocabulary matrices
    forward_flops_per_token: float  # matmuls + causal attention
    attention_flops_per_token: float  # the QKᵀ + PV part of the forward
    train_flops_per_token: float  # 3 × forward, no-grad work 1 ×
    kv_cache_bytes_per_token: float  # K and V of every cached attention call, dtype_bytes each
    seq_len: int
    dtype_bytes: int = 2
    mode: str = "train"  # routing accounted: "train" or "eval"
    elastic: str = "full model"  # or a description of the sub-network
    notes: tuple = field(default_factory=tuple)  # approximations made (unknown blocks …)

    @property
    def non_embedding_params(self) -> int:
        return self.total_params - self.embedding_params

    def to_dict(self) -> dict[str, float]:
        """The numbers, for logging (the trainer logs them with an ``acct/`` prefix)."""
        return {k: v for k, v in asdict(self).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def account(
    model: nn.Module,
    seq_len: int,
    elastic: ElasticSetting | None = None,
    *,
    training: bool | None = None,
    dtype_bytes: int = 2,
) -> ModelAccounting:
    """Account a built ``LanguageModel`` (any device, ``meta`` included) at sequence length ``seq_len``.

    ``elastic``: a sub-network (layers, expert subset, top-k); None = the model's current setting.
    ``training``: account training-mode (True) or eval-mode (False) routing; None = the model's mode.
    ``dtype_bytes``: bytes per KV-cache element (2 = bf16).
    """
    setting = model.elastic if elastic is None else elastic
    training = model.training if training is None else training
    usage = CostSetting.from_elastic(seq_len, setting, training=training, dtype_bytes=dtype_bytes)
    depth = model.depth
    cost = cost_of(depth, usage) + Cost(
        {
            id(model.embed.weight): model.embed.weight.numel(),
            id(model.lm_head.weight): model.lm_head.weight.numel(),
            id(model.norm): numel(model.norm),
        },
        matmul_flops=linear_flops(model.lm_head),
    )
    tied = model.lm_head.weight is model.embed.weight
    embedding = model.embed.weight.numel() + (0 if tied else model.lm_head.weight.numel())
    skipped = [i for i in range(len(depth.blocks)) if not usage.runs(i)]
    thinking = getattr(depth, "thinking", {})  # ITT's per-layer step parameters leave with their layer
    dropped = sum(numel(depth.blocks[i]) + (numel(thinking[str(i)]) if str(i) in thinking else 0) for i in skipped)
    dropped += sum(cost.dropped.values())
    active = cost.active_params()
    return ModelAccounting(
        total_params=int(stored_params(model) - dropped),
        embedding_params=int(embedding),
        active_params=active,
        active_non_embedding_params=active - embedding,
        forward_flops_per_token=cost.forward_flops,
        attention_flops_per_token=cost.attention_flops,
        train_flops_per_token=cost.train_flops,
        kv_cache_bytes_per_token=cost.kv_bytes,
        seq_len=seq_len,
        dtype_bytes=dtype_bytes,
        mode="train" if training else "eval",
        elastic=describe_setting(setting),
        notes=tuple(usage.notes),
    )


def stored_params(model: nn.Module) -> int:
    """``num_parameters()``, with expert banks split over ranks by expert parallelism counted whole
    (a module with ``expert_shard`` keeps 1/size of the experts named by ``expert_parallel_params()``)."""
    total = model.num_parameters()
    for module in model.modules():
        shard = getattr(module, "expert_shard", None)
        if shard is not None and hasattr(module, "expert_parallel_params"):
            total += (shard.size - 1) * sum(getattr(module, name).numel() for name in module.expert_parallel_params())
    return total


def account_config(
    cfg,
    seq_len: int,
    vocab_size: int | None = None,
    elastic: ElasticSetting | None = None,
    *,
    training: bool = True,
    dtype_bytes: int = 2,
) -> ModelAccounting:
    """Account a config without allocating it: the model is built on the ``meta`` device.

    ``cfg``: a ``RootConfig`` or ``ModelConfig``, or a composed Hydra config / dict (the whole
    root or its ``model`` node). ``vocab_size`` fills ``model.vocab_size`` when that is null.
    """
    from arch.model import LanguageModel

    model_cfg = _model_config(cfg)
    if model_cfg.vocab_size is None:
        if vocab_size is None:
            raise ValueError("model.vocab_size is null: pass vocab_size (the tokenizer's vocabulary size)")
        model_cfg.vocab_size = vocab_size
    with torch.device("meta"):
        model = LanguageModel(model_cfg)
    return account(model, seq_len, elastic, training=training, dtype_bytes=dtype_bytes)


def _model_config(cfg):
    """A private ModelConfig copy from any of the forms ``account_config`` accepts."""
    from training.config import _to_plain, validate
    from training.config_schema import ModelConfig, RootConfig

    if isinstance(cfg, RootConfig):
        return copy.deepcopy(cfg.model)
    if isinstance(cfg, ModelConfig):
        return copy.deepcopy(cfg)
    plain = _to_plain(cfg)
    if "model" in plain:
        return validate(plain).model
    return validate({"model": plain, "data": {"seq_len": 1}}).model  # seq_len 1: any max_seq_len passes


def describe_setting(setting: ElasticSetting) -> str:
    if setting.is_full:
        return "full model"
    parts = []
    if setting.active_layers is not None:
        parts.append(f"layers {list(setting.active_layers)}")
    if setting.expert_mask_E is not None:
        parts.append(f"experts {int(setting.expert_mask_E.sum())}/{setting.expert_mask_E.numel()}")
    if setting.top_k is not None:
        parts.append(f"top-k {setting.top_k}")
    return "sub-network: " + ", ".join(parts)


def _si(value: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _bytes(value: float) -> str:
    for scale, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if value >= scale:
            return f"{value / scale:.3g} {suffix}"
    return f"{value:.0f} B"


def format_accounting(acc: ModelAccounting) -> str:
    """A few human-readable lines (printed at the start of a run)."""
    attention_share = (
        acc.attention_flops_per_token / acc.forward_flops_per_token if acc.forward_flops_per_token else 0.0
    )
    dtype = _DTYPE_NAMES.get(acc.dtype_bytes, f"{acc.dtype_bytes}-byte")
    lines = [
        f"accounting ({acc.elastic}, {acc.mode} mode, seq_len {acc.seq_len}), per token:",
        f"  parameters  total {_si(acc.total_params)} ({_si(acc.non_embedding_params)} non-embedding + "
        f"{_si(acc.embedding_params)} embedding); active {_si(acc.active_params)} "
        f"({_si(acc.active_non_embedding_params)} non-embedding, {acc.active_params / acc.total_params:.1%} of total)",
        f"  FLOPs       forward {_si(acc.forward_flops_per_token)} (attention {_si(acc.attention_flops_per_token)}, "
        f"{attention_share:.1%}); train {_si(acc.train_flops_per_token)}",
        f"  KV cache    {_bytes(acc.kv_cache_bytes_per_token)} per token ({dtype})",
    ]
    lines += [f"  note: {note}" for note in acc.notes]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- command line
def _vocab_size(root, given: int | None) -> int:
    if root.model.vocab_size is not None:
        return root.model.vocab_size
    if given is not None:
        return given
    tokenizer = root.data.tokenizer
    if root.data.source != "synthetic" and tokenizer.kind == "bytes":
        return 257  # training.data.tokenizer.BytesTokenizer: 256 bytes + end of document
    if root.data.source != "synthetic" and tokenizer.kind == "bpe":
        return tokenizer.vocab_size  # the BPE's target size (a small corpus may train slightly fewer)
    raise SystemExit("the vocabulary comes from a tokenizer that must be loaded: pass --vocab-size N")


def main(argv: list[str] | None = None) -> None:
    from training.tool_args import parse, tool_parser

    parser = tool_parser(
        "python -m training.accounting.account",
        __doc__.split("\n\n")[0],
        epilog="Other key=value words are Hydra overrides of the model config.",
    )
    parser.add_argument("--seq-len", type=int, help="sequence length (default: data.seq_len)")
    parser.add_argument("--vocab-size", type=int, help="vocabulary size when model.vocab_size is null")
    parser.add_argument("--dtype-bytes", type=int, default=2, help="bytes per KV-cache element (2 = bf16)")
    parser.add_argument("--eval", action="store_true", help="account eval-mode routing (eval_top_k, eval_iterations)")
    parser.add_argument("--layers", help="elastic depth: comma-separated layer indices that run")
    parser.add_argument("--experts", type=int, help="elastic width: only the first N experts are routable")
    parser.add_argument("--top-k", type=int, help="elastic sparsity: experts per token")
    args, overrides = parse(parser, argv, overrides=True)
    from training.cli import check_overrides, compose
    from training.config import ConfigError, elastic_dims, validate

    check_overrides(overrides)  # an unknown key or bad value: one line naming it, exit 2

    try:
        root = validate(compose(overrides))
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    mask_E = None
    if args.experts is not None:
        _, n_experts, _ = elastic_dims(root.model)
        if n_experts is None:
            raise SystemExit(
                f"--experts needs an FFN with elastic widths; model.ffn.name={root.model.ffn['name']!r} has none"
            )
        mask_E = torch.arange(n_experts) < args.experts
    layers = tuple(int(i) for i in args.layers.split(",")) if args.layers else None
    setting = ElasticSetting(active_layers=layers, expert_mask_E=mask_E, top_k=args.top_k)
    vocab_size = _vocab_size(root, args.vocab_size)
    acc = account_config(
        root,
        args.seq_len or root.data.seq_len,
        vocab_size,
        setting,
        training=not args.eval,
        dtype_bytes=args.dtype_bytes,
    )
    print(f"model: {root.model.name} (vocabulary {vocab_size})")
    print(format_accounting(acc))


if __name__ == "__main__":
    main(sys.argv[1:])
