"""Sparse Growing Transformer (SGT, arXiv 2603.23998): entropy-guided, deep-to-shallow head looping.

Matches the official code (YaoChen0203/Sparse-Growing-Transformer, ``olmo/loop_attention.py`` and
``olmo/dynamic_layer_scheduler.py``; METHODS.md §6): a selected layer runs an extra attention pass
between its attention residual and its FFN, reusing the layer's own norm, projections and RoPE
(no new parameters); non-kept heads fade out over a decay window; layers are added deep → shallow
by their EMA head entropy until ``max_selected_layers``, then the structure is frozen.

Baselines as options: ``head_selection=low_entropy`` keeps the lowest-entropy heads;
``loop_mode=block`` re-runs whole blocks (attention + FFN) of the selected layers [RECON: the
paper's "Block Loop" code is not released].

Legend: B batch, T tokens, D d_model, H query heads, Hk kv heads, d head dim, L layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from arch.cost import Cost, CostSetting, block_cost, causal_attention_flops
from arch.layers import ForwardContext, ModelShared, apply_rope
from arch.registry import Capabilities
from kernels.attention import attention, last_row_attention_entropy

STASH_KEY = "sgt_stash_qk"  # tells MultiHeadAttention to leave its last-row q and its k in ctx.state


class SGTDepth(nn.Module):
    """A plain stack of blocks plus SGT's scheduled attention loops (see module docstring)."""

    capabilities = Capabilities(needs_attention=("mha",))  # loops the layer's own MHA projections

    def __init__(
        self,
        n_layers: int,
        make_block: Callable[[int], nn.Module],
        shared: ModelShared | None = None,
        *,
        first_selection_step: int = 250,
        window_size: int = 250,
        top_k_layers: int = 3,
        max_selected_layers: int = 3,
        max_loop_depth: int = 1,
        num_keep_heads: int = 2,
        decay_type: Literal["linear", "cosine", "exponential"] = "linear",
        ema_decay: float = 0.5,
        exclude_layers: list = (0,),
        head_selection: Literal["high_entropy", "low_entropy"] = "high_entropy",
        loop_mode: Literal["heads", "block"] = "heads",
        loop_qk_norm: bool = False,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(make_block(i) for i in range(n_layers))
        from arch.attention.mha import MultiHeadAttention

        if not all(isinstance(b.attn, MultiHeadAttention) for b in self.blocks):
            name = getattr(type(self.blocks[0].attn), "registry_name", type(self.blocks[0].attn).__name__)
            raise ValueError(
                f"depth=sgt loops the layer's own MHA projections; it cannot be combined with attention={name!r} "
                "(use attention=mha)"
            )
        n_heads = self.blocks[0].attn.n_heads
        candidates = [i for i in range(n_layers) if i not in set(exclude_layers)]
        if not 1 <= num_keep_heads <= n_heads:
            raise ValueError(f"depth.num_keep_heads={num_keep_heads} must be in [1, n_heads={n_heads}]")
        if not 1 <= top_k_layers <= len(candidates):
            raise ValueError(
                f"depth.top_k_layers={top_k_layers} must be in [1, {len(candidates)}] (layers minus exclude_layers)"
            )
        if window_size < 1 or first_selection_step < 1:
            raise ValueError("depth.window_size and depth.first_selection_step must be >= 1")
        self.n_layers, self.n_heads = n_layers, n_heads
        self.first_selection_step, self.window_size = first_selection_step, window_size
        self.top_k_layers, self.max_selected_layers, self.max_loop_depth = (
            top_k_layers,
            max_selected_layers,
            max_loop_depth,
        )
        self.num_keep_heads, self.decay_type, self.ema_decay = num_keep_heads, decay_type, ema_decay
        self.candidates, self.head_selection, self.loop_mode, self.loop_qk_norm = (
            candidates,
            head_selection,
            loop_mode,
            loop_qk_norm,
        )
        # Schedule state: tensors are buffers, the rest goes through get/set_extra_state (checkpointed).
        self.register_buffer("head_decay_LH", torch.ones(n_layers, n_heads))
        self.register_buffer("kept_LH", torch.zeros(n_layers, n_heads, dtype=torch.bool))
        self.register_buffer("ema_LH", torch.zeros(n_layers, n_heads))
        self.register_buffer("entropy_sum_LH", torch.zeros(n_layers, n_heads), persistent=False)
        self.register_buffer("entropy_count_L", torch.zeros(n_layers), persistent=False)
        self.loop_depth = [0] * n_layers
        self.selected: list[int] = []
        # layer → (start, end) of its head-decay window, opened when the layer is selected and kept: a
        # deeper loop never reopens it (decayed heads stay at 0). One scheduler window (window_end) times
        # every decision, as in the official DynamicLayerScheduler.
        self.decay_windows: dict[int, tuple[int, int]] = {}
        self.window_end: int | None = None
        self.depth_threshold = n_layers
        self.frozen, self.ema_ready = False, False

    # ------------------------------------------------------------------ checkpointed state
    def get_extra_state(self) -> dict:
        return {
            "loop_depth": list(self.loop_depth),
            "selected": list(self.selected),
            "decay_windows": [[layer, s, e] for layer, (s, e) in self.decay_windows.items()],
            "window_end": self.window_end,
            "depth_threshold": self.depth_threshold,
            "frozen": self.frozen,
            "ema_ready": self.ema_ready,
        }

    def set_extra_state(self, state: dict) -> None:
        self.loop_depth, self.selected = list(state["loop_depth"]), list(state["selected"])
        self.decay_windows = {int(layer): (int(s), int(e)) for layer, s, e in state["decay_windows"]}
        self.window_end = state["window_end"]
        self.depth_threshold, self.frozen, self.ema_ready = (
            state["depth_threshold"],
            state["frozen"],
            state["ema_ready"],
        )

    # ------------------------------------------------------------------ forward
    def forward(self, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        collect = self.training and not self.frozen
        active = ctx.elastic.active_layers
        for i, block in enumerate(self.blocks):
            if active is not None and i not in active:
                continue
            h_BTD = block.attn_norm(x_BTD)
            record = collect and i in self.candidates
            if self.loop_mode == "block":
                first_entropy = self._first_pass_entropy(block, h_BTD, ctx) if record else None
                x_BTD = block(x_BTD, ctx)
                for _ in range(self.loop_depth[i]):
                    x_BTD = block(x_BTD, ctx)
                if record:
                    self._record(i, first_entropy, None)
                continue
            ctx.state[STASH_KEY] = record
            x_BTD = x_BTD + block.attn(h_BTD, ctx)
            ctx.state[STASH_KEY] = False
            first_entropy = self._first_pass_entropy(block, h_BTD, ctx) if record else None
            loop_entropy = None
            for _ in range(self.loop_depth[i]):
                update_BTD, loop_entropy = self._loop_attention(block, i, x_BTD, ctx, record)
                x_BTD = x_BTD + update_BTD
            if record:
                self._record(i, first_entropy, loop_entropy)
            x_BTD = x_BTD + block.ffn(block.ffn_norm(x_BTD), ctx)
        ctx.add_metric("sgt/looped_layers", torch.tensor(float(sum(d > 0 for d in self.loop_depth))))
        return x_BTD

    def _first_pass_entropy(self, block, h_BTD, ctx) -> torch.Tensor:
        """Per-head entropy (B, H) of the last query row of this layer's normal attention pass."""
        stashed = ctx.state.pop(("sgt_qk", block.attn.layer_idx), None)
        if stashed is None:  # attention that does not stash (or block mode): recompute q_last and k
            with torch.no_grad():
                q_B1Hd, k_BTHd, _ = self._qkv(block.attn, h_BTD, ctx, None, last_q_only=True)
        else:
            q_B1Hd, k_BTHd = stashed
        return last_row_attention_entropy(q_B1Hd, k_BTHd, k_head=_gqa_map(block.attn))

    def _qkv(self, attn, h_BTD, ctx, heads, last_q_only=False):
        """q, k, v of ``attn`` for query heads ``heads`` (None = all), from its own weights and RoPE."""
        B, T, _ = h_BTD.shape
        H, Hk, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
        heads = list(range(H)) if heads is None else heads
        kv_heads = sorted({h // (H // Hk) for h in heads})
        q_rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads]).to(h_BTD.device)
        kv_rows = torch.cat([torch.arange(g * d, (g + 1) * d) for g in kv_heads]).to(h_BTD.device)
        kv_rows = torch.cat([kv_rows, kv_rows + Hk * d])  # wkv stacks [k heads; v heads]
        h_q = h_BTD[:, -1:] if last_q_only else h_BTD
        q_BTHd = F.linear(h_q, attn.wq.weight[q_rows], None if attn.wq.bias is None else attn.wq.bias[q_rows])
        kv = F.linear(h_BTD, attn.wkv.weight[kv_rows], None if attn.wkv.bias is None else attn.wkv.bias[kv_rows])
        q_BTHd = q_BTHd.view(B, h_q.shape[1], len(heads), d)
        k_BTHd, v_BTHd = kv.view(B, T, 2, len(kv_heads), d).unbind(2)
        if self.loop_qk_norm and attn.q_norm is not None:  # the official loop skips q/k norms
            q_BTHd, k_BTHd = attn.q_norm(q_BTHd), attn.k_norm(k_BTHd)
        cos, sin = ctx.cos_TF, ctx.sin_TF
        q_BTHd = apply_rope(q_BTHd, cos[-h_q.shape[1] :], sin[-h_q.shape[1] :])
        k_BTHd = apply_rope(k_BTHd, cos, sin)
        k_head = torch.tensor([kv_heads.index(h // (H // Hk)) for h in heads], device=h_BTD.device)
        return q_BTHd, k_BTHd, (v_BTHd, k_head, heads)

    def _loop_attention(self, block, i, x_BTD, ctx, collect):
        """One loop pass: attention of the (kept) heads on the updated state, scaled by head decay."""
        attn = block.attn
        h_BTD = block.attn_norm(x_BTD)
        decay_H = self.head_decay_LH[i] if self.training else self.kept_LH[i].float()
        kept_only = not bool((decay_H * ~self.kept_LH[i]).any())  # window over: only kept heads matter
        heads = self.kept_LH[i].nonzero().flatten().tolist() if kept_only else None
        q_BTHd, k_BTHd, (v_BTHd, k_head, heads) = self._qkv(attn, h_BTD, ctx, heads)
        if ctx.kv_cache is not None:
            k_BTHd, v_BTHd = ctx.kv_cache.update(ctx.next_cache_slot(), k_BTHd, v_BTHd)
        out_BTHd = attention(q_BTHd, k_BTHd, v_BTHd, causal=True, k_head=k_head, v_head=k_head, backend=attn.backend)
        out_BTHd = out_BTHd * decay_H[heads].to(out_BTHd.dtype)[None, None, :, None]
        d = attn.head_dim
        cols = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads]).to(x_BTD.device)
        update_BTD = F.linear(out_BTHd.flatten(2), attn.wo.weight[:, cols], attn.wo.bias)
        entropy_BH = None
        if collect:
            entropy_sub = last_row_attention_entropy(q_BTHd[:, -1:].detach(), k_BTHd.detach(), k_head=k_head)
            entropy_BH = torch.zeros(x_BTD.shape[0], self.n_heads, device=x_BTD.device)
            entropy_BH[:, heads] = entropy_sub
        return update_BTD, entropy_BH

    @torch.no_grad()
    def _record(self, i: int, first_BH: torch.Tensor, loop_BH: torch.Tensor | None) -> None:
        """Accumulate this micro-batch's per-head entropy; kept heads of a looped layer use the loop pass."""
        entropy_H = first_BH.mean(0)
        if loop_BH is not None:
            entropy_H = torch.where(self.kept_LH[i], loop_BH.mean(0), entropy_H)
        self.entropy_sum_LH[i] += entropy_H
        self.entropy_count_L[i] += 1

    # ------------------------------------------------------------------ scheduler
    def after_optimizer_step(self, step: int) -> None:
        """DynamicLayerScheduler.step: finalize entropy statistics, move decay windows, grow loops."""
        completed = step + 1
        self._finalize_entropy()
        self._update_decays(completed)
        if self.frozen or completed < self.first_selection_step:
            return
        if not self.selected:
            self._select(self._top_layers(), completed)
            return
        if self.window_end is not None and completed >= self.window_end:
            self.window_end = None
            self._window_ended(completed)

    def _finalize_entropy(self) -> None:
        counted = self.entropy_count_L > 0
        if not counted.any():
            return
        inst_LH = self.entropy_sum_LH / self.entropy_count_L.clamp(min=1)[:, None]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(inst_LH, op=dist.ReduceOp.AVG)
        if self.ema_ready:
            self.ema_LH[counted] = self.ema_decay * self.ema_LH[counted] + (1 - self.ema_decay) * inst_LH[counted]
        else:
            self.ema_LH[counted] = inst_LH[counted]
            self.ema_ready = True
        self.entropy_sum_LH.zero_()
        self.entropy_count_L.zero_()

    def _update_decays(self, completed: int) -> None:
        for layer, (start, end) in self.decay_windows.items():
            frac = min(1.0, max(0.0, (completed - start) / (end - start)))
            if frac >= 1:
                value = 0.0  # non-kept heads are 0 after the window, whatever the decay's shape
            elif self.decay_type == "linear":
                value = 1.0 - frac
            elif self.decay_type == "cosine":
                value = 0.5 * (1 + math.cos(math.pi * frac))
            else:  # [CODE] exponential: exp(−ln(1e8)·progress), 1 → 1e-8 over the window
                value = math.exp(math.log(1e-8) * frac)
            self.head_decay_LH[layer] = torch.where(self.kept_LH[layer], 1.0, value)

    def _top_layers(self) -> list[int]:
        score = {i: self.ema_LH[i].mean().item() for i in self.candidates}
        return sorted(score, key=lambda i: (-score[i], i))[: self.top_k_layers]

    def _select(self, top: list[int], completed: int) -> None:
        layer = max(top)  # the deepest of the top-entropy layers
        order = self.ema_LH[layer].argsort(descending=self.head_selection == "high_entropy")
        self.kept_LH[layer] = False
        self.kept_LH[layer, order[: self.num_keep_heads]] = True
        self.loop_depth[layer] = 1
        self.selected.append(layer)
        self.decay_windows[layer] = (completed, completed + self.window_size)
        self.window_end = completed + self.window_size
        self.depth_threshold = min(self.selected)
        self._update_decays(completed)

    def is_decaying(self, layer: int) -> bool:
        """Whether the layer's non-kept heads still contribute to its loop (its decay has not reached 0)."""
        return layer in self.decay_windows and bool((self.head_decay_LH[layer][~self.kept_LH[layer]] > 0).any())

    def _window_ended(self, completed: int) -> None:
        """The official ``_evaluate_and_act``: deepen the first selected layer (in selection order) that is
        still among the top-entropy layers and below max_loop_depth; else stop at max_selected_layers; else
        select the deepest top layer no deeper than every selected one; else freeze the structure."""
        top = self._top_layers()
        deeper = [i for i in self.selected if i in top and self.loop_depth[i] < self.max_loop_depth]
        if deeper:
            self.loop_depth[deeper[0]] += 1  # its decay window is left alone: decayed heads stay at 0
            self.window_end = completed + self.window_size
        elif len(self.selected) >= self.max_selected_layers:
            self.frozen = True
        else:
            shallower = [i for i in top if i not in self.selected and i <= self.depth_threshold]
            if shallower:
                self._select(shallower, completed)
            else:
                self.frozen = True

    # ------------------------------------------------------------------ cost
    def cost(self, setting: CostSetting) -> Cost:
        """Plain blocks plus each looped layer's extra passes: attention of the kept heads (all heads
        while, in training, the other heads' decay has not reached 0) with their own cache slot, or whole blocks in
        ``loop_mode=block``. The entropy statistics of training are not counted."""
        total = Cost()
        for i, block in enumerate(self.blocks):
            if not setting.runs(i):
                continue
            loops = self.loop_depth[i]
            if loops and self.loop_mode == "block":
                total = total + block_cost(block, setting).repeated(1 + loops)
            elif loops:
                total = (
                    total + block_cost(block, setting) + self._head_pass_cost(i, block.attn, setting).repeated(loops)
                )
            else:
                total = total + block_cost(block, setting)
        return total

    def _head_pass_cost(self, layer: int, attn: nn.Module, setting: CostSetting) -> Cost:
        """One ``_loop_attention`` pass: the heads' rows of wq and columns of wo, and the rows of wkv
        of the key/value heads those query heads read (under GQA, the distinct groups h // (H/Hk))."""
        H, d, D = attn.n_heads, attn.head_dim, attn.wq.in_features
        if setting.training and self.is_decaying(layer):  # decaying heads still run (in training)
            heads = list(range(H))
        else:
            heads = self.kept_LH[layer].nonzero().flatten().tolist()
        kv_heads = len({h // (H // attn.n_kv_heads) for h in heads})
        return Cost(
            matmul_flops=2 * D * len(heads) * d + 2 * D * 2 * kv_heads * d + 2 * len(heads) * d * D,
            attention_flops=causal_attention_flops(len(heads), d, setting.seq_len),
            kv_bytes=2 * kv_heads * d * setting.dtype_bytes,
        )


def _gqa_map(attn) -> torch.Tensor:
    return torch.arange(attn.n_heads, device=attn.wq.weight.device) // (attn.n_heads // attn.n_kv_heads)
