"""The cost record every block returns: parameters a token reads, forward FLOPs, KV-cache bytes.

Each attention, FFN and depth block answers ``block.cost(setting) -> Cost`` from its own file,
reading its attributes and shapes, never its tensor values, so a model built on the ``meta``
device costs as little to account as a real one. ``training.accounting.account`` only walks the
model (embedding, depth scheme, head) and sums. This module imports neither torch nor a block.

Conventions (every number is per token; ``training/accounting/account.py`` lists them in full):

- **Parameters** are keyed by the module (or tensor) that owns them, so a block run several times
  (loops, recurrence, ITT steps) or a tensor shared by several layers (a MoUE pool, tied
  embeddings) counts once when costs are added. Routed experts are counted as calls (k per MoE
  call) capped by the experts that exist: an upper bound on the distinct experts a token touches.
- **FLOPs**: 2 per multiply-accumulate of every matmul a token goes through; causal attention's
  QKᵀ and PV cost 2·2·H·d·(T + 1)/2 (query i meets i keys, each causal pair counted once).
  Norms, activations, softmax, RoPE, gating and the embedding lookup are not counted. Routed
  blocks count activated compute only, dropless.
- **KV cache**: K and V of every attention call that keeps a cache slot in generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass
class CostSetting:
    """How a block is run when its cost is asked.

    ``seq_len``: tokens per sequence T. ``training``: training routing (top_k, the sampler's
    expected recurrence) or evaluation routing (eval_top_k, eval_iterations). ``top_k``: elastic
    experts per token (None = each MoE layer's own). ``routable_experts``: elastic width, the first
    N experts routable (None = all). ``active_layers``: elastic depth (None = all layers).
    ``iterations`` / ``ratios`` / ``repeats``: recurrent-depth iterations at evaluation, ITT
    selection ratios per extra step, loop repeats (None = the block's current value).
    ``dtype_bytes``: bytes per KV-cache element. ``notes`` collects approximations made.
    """

    seq_len: int
    training: bool = True
    top_k: int | None = None
    routable_experts: int | None = None
    active_layers: tuple[int, ...] | None = None
    iterations: int | None = None
    ratios: tuple[float, ...] | None = None
    repeats: int | None = None
    dtype_bytes: int = 2
    notes: list = field(default_factory=list, compare=False)

    def __post_init__(self):
        if not isinstance(self.seq_len, int) or isinstance(self.seq_len, bool) or self.seq_len < 1:
            raise ValueError(f"seq_len={self.seq_len!r} must be a positive integer")
        for name in ("top_k", "routable_experts", "iterations", "repeats"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive integer or None")
        if self.dtype_bytes not in (1, 2, 4, 8):
            raise ValueError(f"dtype_bytes={self.dtype_bytes!r} must be one of [1, 2, 4, 8]")

    @classmethod
    def from_elastic(cls, seq_len: int, elastic: Any = None, **kwargs) -> CostSetting:
        """From an ``arch.layers.ElasticSetting`` (layers, expert mask, top-k); the mask's count is read once."""
        if elastic is None:
            return cls(seq_len, **kwargs)
        mask_E = elastic.expert_mask_E
        routable = None if mask_E is None else int(mask_E.sum())
        layers = None if elastic.active_layers is None else tuple(elastic.active_layers)
        return cls(seq_len, top_k=elastic.top_k, routable_experts=routable, active_layers=layers, **kwargs)

    def runs(self, layer: int) -> bool:
        return self.active_layers is None or layer in self.active_layers

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


@dataclass
class ExpertUse:
    """Routed experts of one pool: calls per token, parameters per expert, experts a token may reach."""

    calls: float
    params_per_expert: float
    n_experts: int


@dataclass
class Cost:
    """What a token costs in one or more calls of a block (see the module docstring)."""

    params: dict = field(default_factory=dict)  # owner key → parameters read (counted once per key)
    experts: dict = field(default_factory=dict)  # pool key → ExpertUse
    dropped: dict = field(default_factory=dict)  # owner key → stored parameters an elastic sub-network leaves out
    matmul_flops: float = 0.0  # forward, per token, attention scores/values excluded
    attention_flops: float = 0.0  # forward QKᵀ + PV, per token
    no_grad_flops: float = 0.0  # the part of the forward run without autograd (cost 1×, not 3×)
    kv_bytes: float = 0.0  # KV-cache bytes per token

    def __add__(self, other: Cost) -> Cost:
        experts = dict(self.experts)
        for key, use in other.experts.items():
            experts[key] = replace(use, calls=use.calls + experts[key].calls) if key in experts else use
        return Cost(
            {**self.params, **other.params},
            experts,
            {**self.dropped, **other.dropped},
            self.matmul_flops + other.matmul_flops,
            self.attention_flops + other.attention_flops,
            self.no_grad_flops + other.no_grad_flops,
            self.kv_bytes + other.kv_bytes,
        )

    def repeated(self, times: float, kv_times: float | None = None, no_grad_times: float = 0.0) -> Cost:
        """``times`` calls (fractional = run on that share of the tokens), ``no_grad_times`` of them
        without autograd, ``kv_times`` of them keeping a KV-cache slot (default: all)."""
        experts = {key: replace(use, calls=use.calls * times) for key, use in self.experts.items()}
        return Cost(
            dict(self.params),
            experts,
            dict(self.dropped),
            self.matmul_flops * times,
            self.attention_flops * times,
            self.no_grad_flops * times + self.forward_flops * no_grad_times,
            self.kv_bytes * (times if kv_times is None else kv_times),
        )

    @property
    def forward_flops(self) -> float:
        return self.matmul_flops + self.attention_flops

    @property
    def train_flops(self) -> float:
        """3 × forward (backward ≈ 2 × forward), except that no-grad work costs 1 ×."""
        return 3 * self.forward_flops - 2 * self.no_grad_flops

    def active_params(self) -> float:
        routed = sum(min(u.calls, u.n_experts) * u.params_per_expert for u in self.experts.values())
        return sum(self.params.values()) + routed


# ---------------------------------------------------------------------------------------- helpers
def causal_attention_flops(n_heads: int, head_dim: int, seq_len: int) -> float:
    """Forward FLOPs per token of QKᵀ and PV in one causal self-attention call over T tokens.

    Query i (1-based) meets i keys: 2·d FLOPs per key for its score and 2·d for the value sum, per
    head. Averaged over the T positions (Σ i / T = (T + 1)/2), each causal pair counted once:
    2·2·H·d·(T + 1)/2. (FlashAttention's benchmark and ``FlopCounterMode`` count the full T×T
    square, 2·2·H·d·T per token: a factor 2T/(T + 1) more.)
    """
    return 2 * 2 * n_heads * head_dim * (seq_len + 1) / 2


def is_linear(module: Any) -> bool:
    """An ``nn.Linear`` (told by its attributes, so this module need not import torch)."""
    return type(module).__name__ == "Linear" and hasattr(module, "in_features") and hasattr(module, "out_features")


def linear_flops(module: Any) -> float:
    """2·in·out per token for every nn.Linear inside ``module`` (biases and activations not counted)."""
    if module is None:
        return 0.0
    return float(sum(2 * m.in_features * m.out_features for m in module.modules() if is_linear(m)))


def numel(module: Any) -> int:
    """Parameters of a module (0 for None); a bare tensor counts its own elements."""
    if module is None:
        return 0
    if hasattr(module, "parameters"):
        return sum(p.numel() for p in module.parameters())
    return module.numel()


def dense_cost(module: Any) -> Cost:
    """A module every token reads in full: all its parameters, the FLOPs of its Linears."""
    return Cost({id(module): numel(module)}, matmul_flops=linear_flops(module))


def cost_of(module: Any, setting: CostSetting) -> Cost:
    """``module.cost(setting)``; a module without one is costed as dense, and ``setting.notes`` says so."""
    if hasattr(module, "cost"):
        return module.cost(setting)
    setting.note(
        f"{type(module).__name__}: no cost(); all its parameters counted active, FLOPs from its Linears, no KV cache"
    )
    return dense_cost(module)


def block_cost(block: Any, setting: CostSetting) -> Cost:
    """One pre-norm block (``arch.model.Block``): its two norms, attention and FFN."""
    if not all(hasattr(block, name) for name in ("attn", "ffn", "attn_norm", "ffn_norm")):
        return cost_of(block, setting)
    norms = Cost({id(block.attn_norm): numel(block.attn_norm), id(block.ffn_norm): numel(block.ffn_norm)})
    return norms + cost_of(block.attn, setting) + cost_of(block.ffn, setting)
