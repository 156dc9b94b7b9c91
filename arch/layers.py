"""Shared layers: RMSNorm, rotary position embedding, and the forward context blocks receive.

Legend: B batch, T query length, S key length, D d_model, H heads, Hk key/value heads, d head dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): x / rms(x) * weight, computed in fp32 for stability."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


def autocast_operands(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The floating tensors cast to the autocast dtype when autocast is on for their device, else unchanged.

    Autocast casts only the ops on its lists (F.linear, matmul …); our custom kernels (expert MLPs, MoHD's
    group GEMMs) are not on them, so under bf16 autocast their fp32 weights would keep them in fp32. The cast
    is differentiable: gradients reach the fp32 master weights, as autocast's own casts do.
    """
    device_type = tensors[0].device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021) tables for positions [0, max_seq_len). Buffers are not saved in checkpoints."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles_TF = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        self.register_buffer("cos_TF", angles_TF.cos(), persistent=False)
        self.register_buffer("sin_TF", angles_TF.sin(), persistent=False)
        self.max_seq_len = max_seq_len

    def span(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for positions [start, start + length): the forward pass's call. The bound is checked
        on Python ints, so it costs no host↔device sync and traces under torch.compile."""
        if start + length > self.max_seq_len:
            raise ValueError(
                f"position {start + length - 1} is beyond model.max_seq_len={self.max_seq_len}; "
                "raise model.max_seq_len or shorten the input"
            )
        return self.cos_TF[start : start + length], self.sin_TF[start : start + length]

    def forward(self, positions_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for arbitrary positions. Checking them reads the largest one on the host (a sync):
        use ``span`` on the hot path."""
        if positions_T.numel() and int(positions_T.max()) >= self.max_seq_len:
            raise ValueError(
                f"position {int(positions_T.max())} is beyond model.max_seq_len={self.max_seq_len}; "
                "raise model.max_seq_len or shorten the input"
            )
        return self.cos_TF[positions_T], self.sin_TF[positions_T]


def apply_rope(x_BTHd: torch.Tensor, cos_TF: torch.Tensor, sin_TF: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) by the position angles (the LLaMA "half" layout)."""
    x1, x2 = x_BTHd.float().chunk(2, dim=-1)
    cos, sin = cos_TF[None, :, None, :], sin_TF[None, :, None, :]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x_BTHd)


class KVCache:
    """Per-call key/value cache for generation.

    Each attention call in a forward pass gets the next slot, so any depth scheme that runs its
    layers in a fixed order (plain, repeated, looped) caches correctly without knowing about it.
    """

    def __init__(self, batch_size: int, max_len: int):
        self.batch_size, self.max_len = batch_size, max_len
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.length = 0  # tokens already cached (same for every slot)

    def update(self, slot: int, k_BTHd: torch.Tensor, v_BTHd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this call's new keys/values and return all cached ones, (B, S, Hk, d)."""
        T = k_BTHd.shape[1]
        if slot == len(self.k):  # first forward: allocate this slot
            shape_k = (self.batch_size, self.max_len, *k_BTHd.shape[2:])
            shape_v = (self.batch_size, self.max_len, *v_BTHd.shape[2:])
            self.k.append(k_BTHd.new_zeros(shape_k))
            self.v.append(v_BTHd.new_zeros(shape_v))
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache full: {self.length}+{T} tokens > max_len={self.max_len}")
        self.k[slot][:, self.length : self.length + T] = k_BTHd
        self.v[slot][:, self.length : self.length + T] = v_BTHd
        end = self.length + T
        return self.k[slot][:, :end], self.v[slot][:, :end]

    def bytes_per_token(self) -> int:
        return sum(t[0, 0].numel() * t.element_size() for t in self.k + self.v)


@dataclass(frozen=True)
class ElasticSetting:
    """A sub-network of the trained model (ERNIE 5.0 §3.3 elastic training; evaluation sweeps).

    ``active_layers``: indices of the blocks that run (others pass the residual through);
    ``expert_mask_E``: bool mask of experts routing may choose (None = all); ``top_k``: experts
    per token (None = each MoE layer's own). ``None`` everywhere is the full model.
    """

    active_layers: tuple[int, ...] | None = None
    expert_mask_E: torch.Tensor | None = None
    top_k: int | None = None
    # experts the mask keeps, counted once here (settings are built on the host between steps) so
    # that routing sizes its top-k from a Python int instead of reading the mask in every layer
    n_routable: int | None = field(default=None, init=False, compare=False)

    def __post_init__(self):
        if self.expert_mask_E is not None:
            object.__setattr__(self, "n_routable", int(self.expert_mask_E.sum()))

    @property
    def is_full(self) -> bool:
        return self.active_layers is None and self.expert_mask_E is None and self.top_k is None


FULL_MODEL = ElasticSetting()


class ModelShared(nn.Module):
    """Model-wide facts and modules that several layers share, passed to every block's constructor.

    ``n_layers`` lets a layer know the depth (e.g. to place rotational windows); ``get_or_create``
    hands every caller the same module (e.g. one expert pool used by all layers, registered once
    here so its parameters are counted and stored once).
    """

    def __init__(self, d_model: int, n_layers: int, n_heads: int):
        super().__init__()
        self.d_model, self.n_layers, self.n_heads = d_model, n_layers, n_heads
        self.modules_by_name = nn.ModuleDict()

    def get_or_create(self, name: str, factory) -> nn.Module:
        if name not in self.modules_by_name:
            self.modules_by_name[name] = factory()
        return self.modules_by_name[name]


@dataclass
class ForwardContext:
    """What every block sees besides its input: positions, RoPE tables, cache, and the aux-loss sink.

    Sparse blocks call ``add_aux_loss`` / ``add_metric``; the model sums the losses into the
    training loss and returns both dicts, so the trainer never needs to know about them. Metrics
    are only gathered when ``collect_metrics`` is set (the trainer sets it on log steps). A loss
    that needs statistics pooled over all layers accumulates them in ``state`` and registers a
    finalizer, which the model calls once after the last layer.
    """

    cos_TF: torch.Tensor
    sin_TF: torch.Tensor
    positions_T: torch.Tensor
    kv_cache: KVCache | None = None
    elastic: ElasticSetting = FULL_MODEL
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)  # per-forward state carried across layers
    finalizers: list[Callable[[ForwardContext], None]] = field(default_factory=list)  # run after the last layer
    collect_metrics: bool = True  # False on training steps that are not logged: diagnostics are not computed
    _attention_calls: int = 0

    def next_cache_slot(self) -> int:
        slot = self._attention_calls
        self._attention_calls += 1
        return slot

    def add_aux_loss(self, name: str, value: torch.Tensor) -> None:
        """Accumulate an already-weighted auxiliary loss (summed over layers)."""
        self.aux_losses[name] = self.aux_losses[name] + value if name in self.aux_losses else value

    def add_metric(self, name: str, value: torch.Tensor) -> None:
        """Record a detached diagnostic (averaging across layers is the caller's choice of name).

        Metrics stay device tensors; whoever logs them converts them to numbers (one host read per
        log step, none on other steps). Blocks whose statistics cost work check ``collect_metrics``
        first; ignoring it is harmless, the value is simply not kept."""
        if self.collect_metrics:
            self.metrics[name] = value.detach()
