"""The language model: embeddings → depth scheme of pre-norm blocks → final norm → LM head.

Reads top to bottom like nanoGPT. Attention, FFN and depth scheme are chosen by name from
``arch.registry``; each block adds its auxiliary losses to the ForwardContext, and
``LanguageModel.forward`` returns them beside the loss so the trainer stays block-agnostic.

Legend: B batch, T tokens, D d_model, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from arch.depth.sampler import generate_parallel
from arch.layers import FULL_MODEL, ElasticSetting, ForwardContext, KVCache, ModelShared, RMSNorm, RotaryEmbedding
from arch.registry import ATTENTION, DEPTH, FFN
from arch.sampling import generate_sequential


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V); only the last position when generating
    loss: torch.Tensor | None = None  # cross-entropy + Σ aux losses (what backward sees)
    lm_loss: torch.Tensor | None = None  # cross-entropy alone (what is reported as "loss")
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg, layer_idx: int, shared: ModelShared):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = ATTENTION.build(
            cfg.attention["name"], cfg.d_model, cfg.n_heads, layer_idx, shared, **_options(cfg.attention)
        )
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = FFN.build(cfg.ffn["name"], cfg.d_model, layer_idx, shared, **_options(cfg.ffn))

    def forward(self, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), ctx)
        return x_BTD + self.ffn(self.ffn_norm(x_BTD), ctx)


class LanguageModel(nn.Module):
    """A LLaMA-style decoder LM whose blocks come from the registries.

    ``cfg`` is the ``model`` config node (see ``conf/model/*.yaml``); ``cfg.vocab_size`` must be set.
    """

    def __init__(self, cfg):
        super().__init__()
        if not cfg.vocab_size:
            raise ValueError("model.vocab_size is unset; the trainer fills it from the tokenizer")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rope = RotaryEmbedding(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.shared = ModelShared(cfg.d_model, cfg.n_layers, cfg.n_heads)  # built before the blocks that use it
        self.depth = DEPTH.build(
            cfg.depth["name"], cfg.n_layers, lambda i: Block(cfg, i, self.shared), self.shared, **_options(cfg.depth)
        )
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.elastic = FULL_MODEL  # the sub-network to run; see set_elastic
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init_weights(self, module: nn.Module) -> None:
        # Normal(0, 0.02); residual output projections scaled by 1/sqrt(2·n_layers) (GPT-2) so the
        # residual stream's variance does not grow with depth.
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        if hasattr(module, "init_parameters"):  # blocks with raw parameters (expert weight tensors …)
            module.init_parameters(std, residual_std)
        if isinstance(module, nn.Linear):
            nn.init.normal_(
                module.weight, 0.0, residual_std if getattr(module, "is_residual_projection", False) else std
            )
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)

    def forward(
        self,
        idx_BT: torch.Tensor,
        targets_BT: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        last_position_only: bool = False,
        collect_metrics: bool = True,
    ) -> ModelOutput:
        """idx_BT (B, T) token ids → ``ModelOutput`` with logits (B, T, V) for every position, like any
        causal LM library. With ``targets_BT`` (B, T; -100 = ignored) also the loss. Generation passes
        ``last_position_only=True`` to compute the head for the last position only: logits (B, 1, V).
        ``collect_metrics=False`` skips the blocks' diagnostics (router loads, entropy …): the trainer
        asks for them only on the steps it logs."""
        B, T = idx_BT.shape
        start = kv_cache.length if kv_cache is not None else 0
        positions_T = torch.arange(start, start + T, device=idx_BT.device)
        cos_TF, sin_TF = self.rope.span(start, T)
        ctx = ForwardContext(
            cos_TF=cos_TF,
            sin_TF=sin_TF,
            positions_T=positions_T,
            kv_cache=kv_cache,
            elastic=self.elastic,
            collect_metrics=collect_metrics,
        )

        x_BTD = self.depth(self.embed(idx_BT), ctx)
        for finalize in ctx.finalizers:  # losses over statistics pooled across layers
            finalize(ctx)
        x_BTD = self.norm(x_BTD)
        if kv_cache is not None:
            kv_cache.length += T

        if last_position_only:
            if targets_BT is not None:
                raise ValueError("last_position_only=True computes no loss: pass targets_BT=None")
            return ModelOutput(logits=self.lm_head(x_BTD[:, -1:]), aux_losses=ctx.aux_losses, metrics=ctx.metrics)
        logits_BTV = self.lm_head(x_BTD)
        if targets_BT is None:
            return ModelOutput(logits=logits_BTV, aux_losses=ctx.aux_losses, metrics=ctx.metrics)
        lm_loss = F.cross_entropy(logits_BTV.flatten(0, 1).float(), targets_BT.flatten(), ignore_index=-100)
        loss = lm_loss + sum(ctx.aux_losses.values()) if ctx.aux_losses else lm_loss
        return ModelOutput(logits_BTV, loss, lm_loss, ctx.aux_losses, ctx.metrics)

    def set_elastic(self, setting: ElasticSetting = FULL_MODEL) -> None:
        """Run a sub-network (fewer layers, an expert subset, a different top-k) until reset."""
        if setting.active_layers is not None and not setting.active_layers:
            raise ValueError("an elastic setting must keep at least one layer")
        self.elastic = setting

    def after_optimizer_step(self, step: int) -> None:
        """Let blocks update non-gradient state (e.g. aux-loss-free router biases, loop schedulers)."""
        for module in self.modules():
            if module is not self and hasattr(module, "after_optimizer_step"):
                module.after_optimizer_step(step)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once by parameters()
        if exclude_embeddings:
            n -= self.embed.weight.numel()
        return n

    def generate(
        self,
        idx_BT: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
        sampler: str = "sequential",
        **sampler_options,
    ) -> torch.Tensor:
        """Sample continuations; temperature=0 is greedy. Returns (B, T + new).

        ``sampler="sequential"``: token by token with a KV cache (``arch.sampling.generate_sequential``).
        ``sampler="parallel"``: the diffusion-style sampler of recurrent-depth models
        (``arch.depth.sampler.generate_parallel``, METHODS.md §8.6), which takes ``sampler_options``.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if sampler == "parallel":
            return generate_parallel(
                self, idx_BT, max_new_tokens, temperature, top_k, eos_id, generator, **sampler_options
            )
        if sampler != "sequential" or sampler_options:
            raise ValueError(
                f"sampler={sampler!r} with options {sorted(sampler_options)}: use 'sequential' (no options) or "
                "'parallel'"
            )
        return generate_sequential(self, idx_BT, max_new_tokens, temperature, top_k, eos_id, generator)


def _options(node) -> dict:
    """A block's YAML node minus its ``name``: the keyword arguments of its constructor."""
    return {k: v for k, v in dict(node).items() if k != "name"}
