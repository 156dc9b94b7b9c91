"""Measuring a real forward with ``torch.utils.flop_counter.FlopCounterMode`` to check blocks' own ``cost()``.

Conventions the comparison states (everything else must match exactly):

- **Causal attention.** The reference attention (``backend: reference``) materialises the whole
  T×S score matrix and masks it, so FlopCounterMode counts QKᵀ and PV over the full square:
  2·2·H·d·S per query token. ``cost()`` counts each causal pair once, 2·2·H·d·(T + 1)/2 per
  token. So the counter's figure is ``matmul_flops + attention_flops · 2T/(T + 1)`` (S = T; for
  ITT's gathered queries against all T keys the same factor holds). SDPA on CPU is not seen by
  FlopCounterMode at all, which is why every case runs the reference backend.
- **Per token** = counted FLOPs / (B·T), targets given so the LM head runs on every position.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from arch.cost import Cost, CostSetting
from arch.layers import KVCache
from arch.model import LanguageModel
from training.config_schema import ModelConfig

D, H, V, L = 32, 4, 64, 2
BASE = dict(
    vocab_size=V, d_model=D, n_layers=L, n_heads=H, max_seq_len=16, attention={"name": "mha", "backend": "reference"}
)
ROWS: list[str] = []  # "case | module | cost() | FlopCounterMode" lines, printed by the tests (pytest -s)


def build(seed: int = 0, **overrides) -> LanguageModel:
    """A tiny model on the reference backends (attention and, where the block has one, the FFN)."""
    torch.manual_seed(seed)
    cfg = {**BASE, **overrides}
    cfg["attention"] = {"backend": "reference", **cfg["attention"]}
    if cfg.get("ffn", {}).get("name") not in (None, "swiglu"):
        cfg["ffn"] = {"backend": "reference", **cfg["ffn"]}
    return LanguageModel(ModelConfig(**cfg))


def tokens(batch: int, seq_len: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def count(model: LanguageModel, idx_BT: torch.Tensor) -> dict[str, float]:
    """FlopCounterMode over one forward (with targets): FLOPs per token by module path ("Global" = all)."""
    with FlopCounterMode(display=False) as counter:
        model(idx_BT, idx_BT)
    n = idx_BT.numel()
    return {name: sum(ops.values()) / n for name, ops in counter.get_flop_counts().items()}


def as_counted(cost: Cost, seq_len: int) -> float:
    """The figure FlopCounterMode should show for ``cost`` (the causal convention above)."""
    return cost.matmul_flops + cost.attention_flops * 2 * seq_len / (seq_len + 1)


def record(case: str, module: str, ours: float, counted: float) -> None:
    ROWS.append(f"{case:<34} {module:<28} cost {ours:>12.1f}   FlopCounterMode {counted:>12.1f}")
    print(ROWS[-1])


def kv_bytes_in_cache(model: LanguageModel, idx_BT: torch.Tensor) -> float:
    """KV-cache bytes per token the model really allocates in one prefill (fp32: 4 bytes an element)."""
    cache = KVCache(idx_BT.shape[0], idx_BT.shape[1])
    with torch.no_grad():
        model(idx_BT, kv_cache=cache)
    return cache.bytes_per_token()


def setting(seq_len: int, **kwargs) -> CostSetting:
    return CostSetting(seq_len, dtype_bytes=4, **kwargs)
