"""Inner Thinking Transformer (Chen et al., ACL 2025; METHODS.md §5, §9.3): ``depth=itt``.

An ITT layer runs its block once on all tokens, then ``steps - 1`` extra "thinking" steps with
the same parameters on router-selected tokens only. Per step t (h_0 = x, the layer input):

    f(h)  = a + m,  a = Attn(n1(h)),  m = FFN(n2(h + a))     the block's residual branch
    w_t   = φ_t ⊙ r_t                                         step vector × router weight (t ≥ 2)
    h_t   = h_{t-1} + w_t ⊙ f(h_{t-1})    for selected tokens (RTC: Σ_i w_i f(h_{i-1}) accumulates)

Selected tokens are gathered, attend over the keys of *all* tokens through ``q_positions``, and
are scattered back, so compute scales with the selection ratio. Parts, each switchable:
``routing`` (ATR: per-step linear router, top-ρ per sequence or a causal threshold), ``rtc``
(accumulate step outputs; off = each step restarts from x: h_t = x + w_t ⊙ f(h_{t-1})) and
``tse`` (thinking-step encoding: ``scale`` = learnable φ_t, METHODS §5(a); ``add`` = a learnable
vector added to the step's input; ``none``).

[RECON] (no official code): the router nonlinearity (``router_activation``) and whether its
weight scales the update (``scale_by_router``); which K/V unselected tokens contribute at extra
steps (``kv``: ``stale`` = their K/V from the last step that computed them, ``recompute`` = from
their current state, at full K/V cost); causal selection (``selection=threshold``, thresholds
calibrated as a running quantile during top-ρ training unless given); the ``rtc=false`` and
``tse=add`` readings; placement (``layers``, default every other layer 1, 3, 5, …).
Under a KV cache (generation) selection is always by threshold: top-ρ over a sequence is not causal.

Legend: B batch, T tokens, K gathered tokens per sequence, S keys, D d_model, H heads,
Hk key/value heads, d head dim, F rotary frequencies (d/2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn as nn

from arch.cost import Cost, CostSetting, block_cost, linear_flops, numel
from arch.layers import ForwardContext, ModelShared, apply_rope
from arch.registry import Capabilities, ConfigError
from kernels.attention import attention

_MHA_PARTS = ("wq", "wkv", "wo", "n_heads", "n_kv_heads", "head_dim", "q_norm", "k_norm", "backend")


def _rope_rows(x_BKHd: torch.Tensor, cos_BKF: torch.Tensor, sin_BKF: torch.Tensor) -> torch.Tensor:
    """``apply_rope`` with a position per (batch, row): the gathered tokens' own angles."""
    x1, x2 = x_BKHd.float().chunk(2, dim=-1)
    cos, sin = cos_BKF[:, :, None, :], sin_BKF[:, :, None, :]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x_BKHd)


def _qkv(attn: nn.Module, n_BTD: torch.Tensor, rope: Callable) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v exactly as ``MultiHeadAttention.forward`` computes them (same ops, same order)."""
    B, T, _ = n_BTD.shape
    q_BTHd = attn.wq(n_BTD).view(B, T, attn.n_heads, attn.head_dim)
    k_BTHd, v_BTHd = attn.wkv(n_BTD).view(B, T, 2, attn.n_kv_heads, attn.head_dim).unbind(2)
    if attn.q_norm is not None:
        q_BTHd, k_BTHd = attn.q_norm(q_BTHd), attn.k_norm(k_BTHd)
    return rope(q_BTHd), rope(k_BTHd), v_BTHd


class ThinkingSteps(nn.Module):
    """One ITT layer's extra parameters: step vectors / encodings, routers, calibrated thresholds."""

    def __init__(self, d_model: int, steps: int, tse: str, step_init: float, routing: bool):
        super().__init__()
        self.phi_SD = nn.Parameter(torch.full((steps, d_model), float(step_init))) if tse == "scale" else None
        self.enc_SD = nn.Parameter(torch.zeros(steps, d_model)) if tse == "add" else None
        self.routers = nn.ModuleList(nn.Linear(d_model, 1) for _ in range(steps - 1)) if routing else None
        self.register_buffer("threshold_S", torch.full((steps - 1,), 0.5))  # router-score quantiles (causal selection)
        self.last_fraction_S = [None] * (steps - 1)  # measured selection fractions (FLOPs under thresholds)


class ITTDepth(nn.Module):
    """Plain blocks, with ITT layers (``steps`` thinking steps each) at ``layers``."""

    capabilities = Capabilities(needs_attention=("mha",))  # runs MHA's projections itself for gathered tokens

    def __init__(
        self,
        n_layers: int,
        make_block: Callable[[int], nn.Module],
        shared: ModelShared,
        *,
        layers: list | None = None,
        steps: int = 4,
        ratios: list | None = None,
        routing: bool = True,
        selection: Literal["top_ratio", "threshold"] = "top_ratio",
        thresholds: list | None = None,
        router_activation: Literal["sigmoid", "none"] = "sigmoid",
        scale_by_router: bool = True,
        rtc: bool = True,
        tse: Literal["scale", "add", "none"] = "scale",
        step_init: float = 1.0,
        kv: Literal["stale", "recompute"] = "stale",
        threshold_momentum: float = 0.99,
    ):
        super().__init__()
        if steps < 1:
            raise ConfigError(f"model.depth.steps={steps} must be >= 1 (1 = vanilla, 4 = ITT×4)")
        self.blocks = nn.ModuleList(make_block(i) for i in range(n_layers))
        layers = list(range(1, n_layers, 2)) if layers is None else [int(i) for i in layers]
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad:
            raise ConfigError(f"model.depth.layers={layers} holds {bad}; layer indices must lie in [0, {n_layers})")
        for i in layers:
            missing = [p for p in _MHA_PARTS if not hasattr(self.blocks[i].attn, p)]
            if missing:
                raise ConfigError(
                    f"model.depth=itt runs attention for gathered tokens itself and needs MHA-style attention "
                    f"(model.attention.name=mha); {type(self.blocks[i].attn).__name__} lacks {missing}"
                )
        if thresholds is not None and len(thresholds) != steps - 1:
            raise ConfigError(f"model.depth.thresholds={list(thresholds)} needs one value per extra step ({steps - 1})")
        if not 0 <= threshold_momentum < 1:
            raise ConfigError(f"model.depth.threshold_momentum={threshold_momentum} must be in [0, 1)")
        self.steps, self.routing, self.selection = steps, routing, selection
        self.router_activation, self.scale_by_router = router_activation, scale_by_router
        self.rtc, self.tse, self.kv, self.momentum = rtc, tse, kv, threshold_momentum
        self.fixed_thresholds = [float(t) for t in thresholds] if thresholds is not None else None
        self.thinking = nn.ModuleDict(
            {str(i): ThinkingSteps(shared.d_model, steps, tse, step_init, routing) for i in layers}
        )
        self.set_ratios(ratios if ratios is not None else [0.7] * (steps - 1))

    def set_ratios(self, ratios) -> None:
        """Selection ratio per extra step (training: 0.7 each); may differ from training at inference."""
        ratios = [float(r) for r in ratios]
        if len(ratios) != self.steps - 1 or not all(0 <= r <= 1 for r in ratios):
            raise ConfigError(
                f"model.depth.ratios={ratios} needs {self.steps - 1} values in [0, 1] (one per extra step)"
            )
        self.ratios = ratios

    def forward(self, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        active = ctx.elastic.active_layers
        for i, block in enumerate(self.blocks):
            if active is not None and i not in active:
                continue
            x_BTD = (
                self._think(block, self.thinking[str(i)], x_BTD, ctx, i)
                if str(i) in self.thinking
                else block(x_BTD, ctx)
            )
        return x_BTD

    # ------------------------------------------------------------------ one ITT layer
    def _think(
        self, block: nn.Module, th: ThinkingSteps, x_BTD: torch.Tensor, ctx: ForwardContext, layer: int
    ) -> torch.Tensor:
        cache = ctx.kv_cache
        offset = cache.length if cache is not None else 0
        rope_all = lambda t: apply_rope(t, ctx.cos_TF, ctx.sin_TF)  # noqa: E731
        h_BTD, kv_prev = x_BTD, None
        for t in range(self.steps):
            slot = ctx.next_cache_slot() if cache is not None else None
            if t == 0:
                mask_BT, w_BT1 = None, None
            else:
                mask_BT, w_BT1 = self._route(th, t - 1, h_BTD, cache is not None, ctx, layer)
            phi_D = th.phi_SD[t] if th.phi_SD is not None else None
            w = phi_D if w_BT1 is None else (w_BT1 if phi_D is None else w_BT1 * phi_D)
            base_BTD = h_BTD if self.rtc else x_BTD
            hin_BTD = h_BTD + th.enc_SD[t] if th.enc_SD is not None else h_BTD
            if mask_BT is None or bool(mask_BT.all()):  # every token: the block's own computation
                q, k, v = _qkv(block.attn, block.attn_norm(hin_BTD), rope_all)
                kv_prev = (k, v)
                h_BTD = self._update(block, base_BTD, hin_BTD, q, k, v, None, w, cache, slot, ctx)
            elif not bool(mask_BT.any()):  # nobody thinks: keys still advance (stale) for the cache slot
                if cache is not None:
                    k, v = kv_prev if self.kv == "stale" else _qkv(block.attn, block.attn_norm(hin_BTD), rope_all)[1:]
                    cache.update(slot, k, v)
                    kv_prev = (k, v)
            else:
                h_BTD, kv_prev = self._sparse_step(
                    block, h_BTD, base_BTD, hin_BTD, mask_BT, w, kv_prev, cache, slot, ctx, offset
                )
        return h_BTD

    def _update(self, block, base_BTD, hin_BTD, q, k, v, q_pos, w, cache, slot, ctx) -> torch.Tensor:
        """base + w⊙a + w⊙m; with w = 1 this is exactly ``Block.forward`` (same ops in the same order)."""
        attn = block.attn
        if cache is not None:
            k, v = cache.update(slot, k, v)
        out = attention(q, k, v, causal=True, q_positions=q_pos, backend=attn.backend)
        a_BTD = attn.wo(out.reshape(*q.shape[:2], -1))
        m_BTD = block.ffn(block.ffn_norm(hin_BTD + a_BTD), ctx)
        if w is None:
            return base_BTD + a_BTD + m_BTD
        return base_BTD + w * a_BTD + w * m_BTD

    def _sparse_step(self, block, h_BTD, base_BTD, hin_BTD, mask_BT, w, kv_prev, cache, slot, ctx, offset):
        """Gather the selected tokens, run f on them against all keys, scatter the results back."""
        D = h_BTD.shape[-1]
        count_B = mask_BT.sum(1)
        K = int(count_B.max())
        # Selected tokens first (ascending positions), padded with unselected ones: no duplicate indices.
        idx_BK = torch.sort((~mask_BT).to(torch.int8), dim=1, stable=True).indices[:, :K]
        valid_BK1 = mask_BT.gather(1, idx_BK)[..., None]
        take = lambda x: x.gather(1, idx_BK[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
        hin_BKD = take(hin_BTD)
        cos_BKF, sin_BKF = ctx.cos_TF[idx_BK], ctx.sin_TF[idx_BK]
        q, k_sel, v_sel = _qkv(block.attn, block.attn_norm(hin_BKD), lambda x: _rope_rows(x, cos_BKF, sin_BKF))
        if self.kv == "recompute":
            _, k, v = _qkv(block.attn, block.attn_norm(hin_BTD), lambda x: apply_rope(x, ctx.cos_TF, ctx.sin_TF))
        else:  # stale: only the selected tokens' keys/values move on
            k, v = kv_prev
            index_BKHd = idx_BK[..., None, None].expand(-1, -1, *k.shape[2:])
            k = k.scatter(1, index_BKHd, torch.where(valid_BK1[..., None], k_sel, k.gather(1, index_BKHd)))
            v = v.scatter(1, index_BKHd, torch.where(valid_BK1[..., None], v_sel, v.gather(1, index_BKHd)))
        w_BK = w if w is None or w.dim() == 1 else take(w)
        new_BKD = self._update(block, take(base_BTD), hin_BKD, q, k, v, idx_BK + offset, w_BK, cache, slot, ctx)
        new_BKD = torch.where(valid_BK1, new_BKD, take(h_BTD))
        h_BTD = h_BTD.scatter(1, idx_BK[..., None].expand(-1, -1, D), new_BKD)
        return h_BTD, (k, v)

    def _route(self, th: ThinkingSteps, j: int, h_BTD: torch.Tensor, causal: bool, ctx: ForwardContext, layer: int):
        """(selection mask (B, T) or None for all tokens, router weight (B, T, 1) or None) for extra step j."""
        rho = self.ratios[j]
        if not self.routing:
            return (None if rho > 0 else torch.zeros(h_BTD.shape[:2], dtype=torch.bool, device=h_BTD.device)), None
        score_BT = th.routers[j](h_BTD).squeeze(-1)
        r_BT = torch.sigmoid(score_BT) if self.router_activation == "sigmoid" else score_BT
        T = h_BTD.shape[1]
        if rho == 0 or rho == 1:
            mask_BT = torch.full_like(r_BT, rho == 1, dtype=torch.bool)
        elif self.selection == "threshold" or causal:
            tau = self.fixed_thresholds[j] if self.fixed_thresholds is not None else th.threshold_S[j]
            mask_BT = r_BT.detach() > tau
        else:
            k = max(0, min(T, round(rho * T)))
            top_BK = r_BT.detach().topk(k, dim=1)
            mask_BT = torch.zeros_like(r_BT, dtype=torch.bool).scatter(1, top_BK.indices, True)
            if self.training and self.fixed_thresholds is None and k > 0:  # calibrate the causal threshold
                with torch.no_grad():
                    th.threshold_S[j].lerp_(top_BK.values[:, -1].mean(), 1 - self.momentum)
        fraction = mask_BT.float().mean()
        th.last_fraction_S[j] = float(fraction)
        ctx.add_metric(f"itt/layer{layer}/step{j + 2}_selected", fraction)
        return mask_BT, (r_BT[..., None] if self.scale_by_router else None)

    # ------------------------------------------------------------------ cost
    def step_fraction(self, thinking: ThinkingSteps, step: int, ratio: float, seq_len: int) -> float:
        """Share of the tokens that extra step ``step`` (0-based) processes, as ``_route`` selects them:
        all or none without routing; round(ρ·T) tokens per sequence for top-ρ; for threshold
        selection the last measured share (ρ before any forward)."""
        if not self.routing:
            return 1.0 if ratio > 0 else 0.0
        if ratio in (0.0, 1.0):
            return ratio
        if self.selection == "threshold":
            measured = thinking.last_fraction_S[step]
            return ratio if measured is None else measured
        return max(0, min(seq_len, round(ratio * seq_len))) / seq_len

    def cost(self, setting: CostSetting) -> Cost:
        """An ITT layer: the block on every token, then each extra step on its selected share of the
        tokens (queries of the selected tokens against all keys), the step routers on every token;
        under ``kv=recompute`` each partial step also runs ``_qkv`` (wq and wkv) on every token, as the
        forward does; every step keeps a cache slot.
        ``setting.ratios`` prices other selection ratios than the current ones."""
        ratios = self.ratios if setting.ratios is None else [float(r) for r in setting.ratios]
        if len(ratios) != self.steps - 1:
            raise ValueError(f"setting.ratios={list(ratios)} needs {self.steps - 1} values (one per extra step)")
        total = Cost()
        for i, block in enumerate(self.blocks):
            if not setting.runs(i):
                continue
            if str(i) not in self.thinking:
                total = total + block_cost(block, setting)
                continue
            thinking = self.thinking[str(i)]
            shares = [self.step_fraction(thinking, j, rho, setting.seq_len) for j, rho in enumerate(ratios)]
            extra = linear_flops(thinking.routers) if self.routing else 0.0
            if self.kv == "recompute":
                extra += sum(0 < f < 1 for f in shares) * (linear_flops(block.attn.wq) + linear_flops(block.attn.wkv))
            steps = block_cost(block, setting).repeated(1 + sum(shares), kv_times=self.steps)
            total = total + steps + Cost({id(thinking): numel(thinking)}, matmul_flops=extra)
        return total
