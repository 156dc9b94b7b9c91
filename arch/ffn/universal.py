"""Mixture of Universal Experts (MoUE): one expert pool reused by every layer, through rotating windows.

Chen et al. 2026, "Mixture of Universal Experts" (arXiv 2603.04971). Only the abstract is known
(METHODS.md §2), so this block is a design exploration of its three named components [RECON],
each an option of ``conf/model/ffn/moue.yaml``:

- **Pool** (``n_universal`` = M): one SwiGLU weight tensor shared by every MoUE layer through
  ``ModelShared.get_or_create`` (stored and counted once), plus ``n_local`` private experts per layer.
  Every layer calls ``kernels.moe.expert_mlp`` with the same pool tensor, so its gradient is the
  sum of the layers' gradients.
- **Staggered rotational topology**: layer ℓ routes only to the window of ``window_size`` pool
  experts starting at (ℓ·s) mod M, wrapping (s = ``window_stride``, null → M // n_layers);
  ``topology: full`` makes the whole pool reachable. ``widen_to`` / ``widen_start`` /
  ``widen_steps`` grow the windows during training (after MoE → MoUE conversion), around the
  original experts (``widen_anchor: center``) or forward from the offset (``start``).
- **Universal load balance**: the Switch loss on statistics pooled over layers, each expert's load
  normalised by its exposure (the number of layers that can reach it); ``per_layer`` is the plain
  loss of every layer on its own, ``uncorrected`` the pooled loss without exposure correction.
- **Universal router with trajectory state**: each token carries z ∈ R^{d_z} across layers,
  z ← λ·z + (1−λ)·Σ_{e chosen} g_e u_e (u_e a learned embedding per expert), and the router scores
  [x ; z]. ``router_sharing: shared`` uses one pool router for every layer.

Compute matching: ``top_k`` experts of width ``expert_hidden`` (null → (8/3·D)/top_k, MoEFFN's
rule) per token, so activated expert FLOPs equal those of a MoE with the same k and width.

Legend: B batch, T tokens per sequence, N = B·T, D d_model, M pool experts, Lc local experts of
this layer, X = M + Lc columns this layer scores, K experts per token, F expert width,
H = 2F (SwiGLU gate|up), Z trajectory dim, I router input dim (D or D + Z).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from arch.cost import Cost, CostSetting, ExpertUse, linear_flops, numel
from arch.ffn.expert_parallel import expert_compute
from arch.ffn.router import routing_metrics, z_loss
from arch.ffn.universal_topology import (
    PooledRoutingStats,
    per_layer_balance_loss,
    universal_balance_loss,
    widened_size,
    window_members,
)
from arch.layers import ForwardContext, ModelShared
from arch.registry import Capabilities

POOL_NAME = "moue_pool"
_STATS, _TRAJECTORY = "moue/stats", "moue/trajectory_NZ"


class UniversalPool(nn.Module):
    """The M universal experts (and their trajectory embeddings / shared router), plus the window
    schedule. Held once in ``ModelShared``; its window size is saved in checkpoints (extra state)."""

    def __init__(
        self,
        n_universal: int,
        d_model: int,
        hidden: int,
        trajectory_dim: int,
        router_dim: int | None,
        window_size: int,
        widen_to: int | None,
        widen_start: int,
        widen_steps: int,
    ):
        super().__init__()
        self.signature = (
            n_universal,
            d_model,
            hidden,
            trajectory_dim,
            router_dim,
            window_size,
            widen_to,
            widen_start,
            widen_steps,
        )
        self.M, self.base_window = n_universal, window_size
        self.widen_to, self.widen_start, self.widen_steps = widen_to, widen_start, widen_steps
        self.window_size = window_size  # current size; moves with after_optimizer_step
        self.w_in_MDH = nn.Parameter(torch.empty(n_universal, d_model, 2 * hidden))  # [:F] gate, [F:] up
        self.w_out_MFD = nn.Parameter(torch.empty(n_universal, hidden, d_model))
        self.embed_MZ = nn.Parameter(torch.empty(n_universal, trajectory_dim)) if trajectory_dim else None
        self.router_MI = nn.Parameter(torch.empty(n_universal, router_dim)) if router_dim else None
        self.init_parameters(0.02, 0.02)

    def init_parameters(self, std: float, residual_std: float) -> None:
        nn.init.normal_(self.w_in_MDH, 0.0, std)
        nn.init.normal_(self.w_out_MFD, 0.0, residual_std)
        if self.embed_MZ is not None:  # unit scale, like the normalised x beside it in the router input
            nn.init.normal_(self.embed_MZ, 0.0, 1.0)
        if self.router_MI is not None:
            nn.init.normal_(self.router_MI, 0.0, std)

    def expert_parallel_params(self) -> tuple[str, ...]:
        """The shared expert banks (dim 0 = expert), split over ranks by ``trainer.expert_parallel``."""
        return ("w_in_MDH", "w_out_MFD")

    def after_optimizer_step(self, step: int) -> None:
        self.window_size = widened_size(step + 1, self.base_window, self.widen_to, self.widen_start, self.widen_steps)

    def get_extra_state(self) -> torch.Tensor:  # a tensor, so safetensors export keeps working
        return torch.tensor([self.window_size], dtype=torch.long)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.window_size = int(state[0])


class UniversalMoEFFN(nn.Module):
    """A MoUE layer: routes each token to ``top_k`` of (its pool window ∪ its local experts)."""

    # Elastic expert subsets are refused (route() raises); elastic top-k is honoured.
    capabilities = Capabilities(expert_banks=True, expert_parallel=True)

    def __init__(
        self,
        d_model: int,
        layer_idx: int,
        shared: ModelShared,
        *,
        n_universal: int = 32,
        n_local: int = 0,
        top_k: int = 2,
        expert_hidden: int | None = None,
        topology: Literal["rotational", "full"] = "rotational",
        window_size: int = 16,
        window_stride: int | None = None,
        widen_to: int | None = None,
        widen_start: int = 0,
        widen_steps: int = 0,
        widen_anchor: Literal["center", "start"] = "center",
        router_sharing: Literal["per_layer", "shared"] = "per_layer",
        scoring: Literal["softmax", "sigmoid"] = "softmax",
        renormalize: bool = True,
        trajectory: bool = True,
        trajectory_dim: int = 16,
        trajectory_decay: float = 0.5,
        trajectory_detach: bool = False,
        balance_loss: Literal["universal", "per_layer", "uncorrected"] = "universal",
        balance_loss_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        backend: Literal["auto", "triton", "torch", "reference"] = "auto",
    ):
        super().__init__()
        if shared is None:
            raise ValueError("ffn=moue needs the model's ModelShared (it holds the universal expert pool)")
        n_layers = shared.n_layers
        window_size = n_universal if topology == "full" else window_size
        stride = window_stride if window_stride is not None else max(1, n_universal // n_layers)
        _check_options(
            n_universal,
            n_local,
            top_k,
            window_size,
            stride,
            widen_to,
            widen_start,
            widen_steps,
            trajectory_dim,
            trajectory_decay,
        )
        self.F = expert_hidden or max(8, round(32 * math.ceil(int(8 * d_model / 3) / 32) / top_k))  # MoEFFN's rule
        self.d_model, self.layer_idx, self.n_layers, self.top_k = d_model, layer_idx, n_layers, top_k
        self.M, self.n_local, self.E = n_universal, n_local, n_universal + n_local  # E: columns (routing analysis)
        self.topology, self.stride, self.anchor = topology, stride, widen_anchor
        self.scoring, self.renormalize, self.backend = scoring, renormalize, backend
        self.trajectory_dim = trajectory_dim if trajectory else 0
        self.trajectory_decay, self.trajectory_detach = trajectory_decay, trajectory_detach
        self.balance_loss, self.balance_loss_coef, self.z_loss_coef = balance_loss, balance_loss_coef, z_loss_coef
        router_dim = d_model + self.trajectory_dim
        if topology == "rotational":
            uncovered = sorted(
                set(range(n_universal))
                - {e for l in range(n_layers) for e in window_members(l, n_universal, window_size, stride)}
            )
            if uncovered:
                raise ValueError(
                    f"ffn.window_size={window_size}, window_stride={stride} leave pool experts {uncovered} "
                    "unreachable from "
                    f"all {n_layers} layers; need n_layers·stride + window_size - stride >= n_universal={n_universal}"
                )

        signature = (
            n_universal,
            d_model,
            self.F,
            self.trajectory_dim,
            router_dim if router_sharing == "shared" else None,
            window_size,
            widen_to,
            widen_start,
            widen_steps,
        )
        pool = shared.get_or_create(POOL_NAME, lambda: UniversalPool(*signature))
        if pool.signature != signature:  # e.g. a depth scheme building layers with different options
            raise ValueError(
                f"layer {layer_idx}: every MoUE layer must share the pool options {pool.signature}, got {signature}"
            )
        self._pool = [pool]  # a list, so the pool is not registered (and counted) again under this layer
        self.router = nn.Linear(router_dim, n_universal, bias=False) if router_sharing == "per_layer" else None
        self.local_router = nn.Linear(router_dim, n_local, bias=False) if n_local else None
        self.w_in_LDH = nn.Parameter(torch.empty(n_local, d_model, 2 * self.F)) if n_local else None
        self.w_out_LFD = nn.Parameter(torch.empty(n_local, self.F, d_model)) if n_local else None
        self.embed_LZ = (
            nn.Parameter(torch.empty(n_local, self.trajectory_dim)) if n_local and self.trajectory_dim else None
        )
        self._layouts: dict[tuple[int, str], _Layout] = {}
        self.init_parameters(0.02, 0.02)

    def expert_parallel_params(self) -> tuple[str, ...]:
        """This layer's own experts (if any), split over ranks by ``trainer.expert_parallel``."""
        return ("w_in_LDH", "w_out_LFD") if self.n_local else ()

    @property
    def pool(self) -> UniversalPool:
        return self._pool[0]

    def init_parameters(self, std: float, residual_std: float) -> None:
        if self.w_in_LDH is not None:
            nn.init.normal_(self.w_in_LDH, 0.0, std)
            nn.init.normal_(self.w_out_LFD, 0.0, residual_std)
        if self.embed_LZ is not None:
            nn.init.normal_(self.embed_LZ, 0.0, 1.0)

    # ------------------------------------------------------------------ topology
    def window(self) -> list[int]:
        """Pool experts this layer can reach now (the window widens with the schedule)."""
        return window_members(
            self.layer_idx,
            self.M,
            self.pool.window_size,
            self.stride,
            self.topology,
            self.pool.base_window,
            self.anchor,
        )

    def layout(self, device) -> _Layout:
        """Index tensors for the current window, built once per window size (no device syncs per step)."""
        key = (self.pool.window_size, str(device))
        if key not in self._layouts:
            mask_X = torch.zeros(self.E, dtype=torch.bool)
            mask_X[self.window()] = True
            mask_X[self.M :] = True  # local experts
            routable_R = mask_X.nonzero().squeeze(1)
            position_X = torch.full((self.E,), -1, dtype=torch.long).index_copy(
                0, routable_R, torch.arange(len(routable_R))
            )
            # this layer's columns in the model-wide expert index (pool, then locals layer by layer)
            columns_X = torch.cat(
                [torch.arange(self.M), torch.arange(self.n_local) + self.M + self.layer_idx * self.n_local]
            )
            self._layouts[key] = _Layout(
                mask_X.to(device), routable_R.to(device), position_X.to(device), columns_X.to(device), len(routable_R)
            )
        return self._layouts[key]

    # ------------------------------------------------------------------ routing
    def logits(self, h_NI: torch.Tensor) -> torch.Tensor:
        pool_NM = self.router(h_NI) if self.router is not None else F.linear(h_NI, self.pool.router_MI)
        if self.local_router is None:
            return pool_NM.float()
        return torch.cat([pool_NM, self.local_router(h_NI)], dim=-1).float()

    def route(self, x_ND: torch.Tensor, ctx: ForwardContext, z_NZ: torch.Tensor | None = None):
        """→ (ids (N, K) in this layer's X columns, gates (N, K), probs (N, X) zero off-window, logits (N, X))."""
        if ctx.elastic.expert_mask_E is not None:
            raise ValueError("ffn=moue does not support elastic expert subsets (elastic.width_full_prob must be 1)")
        if self.trajectory_dim and z_NZ is None:  # no earlier MoUE layer: an empty trajectory
            z_NZ = x_ND.new_zeros(x_ND.shape[0], self.trajectory_dim)
        h_NI = x_ND if z_NZ is None else torch.cat([x_ND, z_NZ.to(x_ND.dtype)], dim=-1)
        logits_NX = self.logits(h_NI)
        mask_X = self.layout(x_ND.device).mask_X
        if self.scoring == "softmax":
            probs_NX = logits_NX.masked_fill(~mask_X, float("-inf")).softmax(-1)
        else:
            probs_NX = logits_NX.sigmoid() * mask_X
        k = min(ctx.elastic.top_k or self.top_k, self.layout(x_ND.device).n)
        ids_NK = probs_NX.detach().masked_fill(~mask_X, float("-inf")).topk(k, dim=-1).indices
        gates_NK = probs_NX.gather(1, ids_NK)
        if self.renormalize:
            gates_NK = gates_NK / gates_NK.sum(-1, keepdim=True).clamp(min=1e-9)
        return ids_NK, gates_NK, probs_NX, logits_NX

    # ------------------------------------------------------------------ forward
    def forward(self, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        z_NZ = ctx.state.get(_TRAJECTORY)  # None in the first MoUE layer of the forward
        if self.trajectory_dim and z_NZ is None:
            z_NZ = x_ND.new_zeros(x_ND.shape[0], self.trajectory_dim)
        ids_NK, gates_NK, probs_NX, logits_NX = self.route(x_ND, ctx, z_NZ if self.trajectory_dim else None)
        gates_NK = gates_NK.to(x_ND.dtype)
        pool_ids_NK = torch.where(ids_NK < self.M, ids_NK, -1)  # -1: slot handled by the local experts
        y_ND = expert_compute(
            x_ND,
            pool_ids_NK,
            gates_NK,
            self.pool.w_in_MDH,
            self.pool.w_out_MFD,
            "swiglu",
            self.backend,
            getattr(self.pool, "expert_shard", None),
        )
        if self.n_local:
            local_ids_NK = torch.where(ids_NK >= self.M, ids_NK - self.M, -1)
            y_ND = y_ND + expert_compute(
                x_ND,
                local_ids_NK,
                gates_NK,
                self.w_in_LDH,
                self.w_out_LFD,
                "swiglu",
                self.backend,
                getattr(self, "expert_shard", None),
            )
        if self.trajectory_dim:
            ctx.state[_TRAJECTORY] = self._next_trajectory(z_NZ, ids_NK, gates_NK)
        self._record(ctx, probs_NX, logits_NX, ids_NK)
        return y_ND.view(B, T, D)

    def _next_trajectory(self, z_NZ, ids_NK, gates_NK) -> torch.Tensor:
        """z ← λ z + (1−λ) Σ_k g_k u_{id_k}: an EMA of the chosen experts' embeddings [RECON]."""
        u_XZ = self.pool.embed_MZ if self.embed_LZ is None else torch.cat([self.pool.embed_MZ, self.embed_LZ])
        chosen_NZ = (gates_NK.unsqueeze(-1).to(u_XZ.dtype) * u_XZ[ids_NK]).sum(1)
        z_NZ = self.trajectory_decay * z_NZ + (1 - self.trajectory_decay) * chosen_NZ.to(z_NZ.dtype)
        return z_NZ.detach() if self.trajectory_detach else z_NZ

    def _record(self, ctx: ForwardContext, probs_NX, logits_NX, ids_NK) -> None:
        """Per-layer losses and metrics; pooled statistics for the finalizer's universal loss."""
        layout = self.layout(probs_NX.device)
        mask_X, n = layout.mask_X, layout.n
        p_NX = probs_NX if self.scoring == "softmax" else probs_NX / probs_NX.sum(-1, keepdim=True).clamp(min=1e-9)
        if _STATS not in ctx.state:  # first MoUE layer of this forward
            ctx.state[_STATS] = PooledRoutingStats(self.M + self.n_layers * self.n_local, probs_NX.device)
            ctx.finalizers.append(self._finalize)
        ctx.state[_STATS].add(layout.columns_X, mask_X, p_NX, ids_NK)
        if self.training:
            if self.balance_loss == "per_layer" and self.balance_loss_coef > 0:
                ctx.add_aux_loss("balance_loss", self.balance_loss_coef * per_layer_balance_loss(p_NX, ids_NK, n))
            if self.z_loss_coef > 0:
                ctx.add_aux_loss("z_loss", self.z_loss_coef * z_loss(logits_NX.masked_fill(~mask_X, float("-inf"))))
        if ctx.kv_cache is None and not self.training:
            self.last_ids_NK = ids_NK.detach()  # for routing analysis (evaluate.py analysis=routing)
        if not ctx.collect_metrics:
            return
        metrics = routing_metrics(p_NX[:, layout.routable_R], layout.position_X[ids_NK], n)
        prefix = f"moe/layer{self.layer_idx}"
        ctx.add_metric(
            f"{prefix}/load",
            torch.zeros(self.E, device=mask_X.device).index_copy(0, layout.routable_R, metrics["load"]),
        )
        for key in ("load_entropy", "max_load_ratio", "min_load_ratio", "dead_experts", "router_entropy"):
            ctx.add_metric(f"{prefix}/{key}", metrics[key])  # over the experts this layer can reach

    def _finalize(self, ctx: ForwardContext) -> None:
        """After the last layer: the pooled balance loss and the pool-wide load metrics."""
        stats: PooledRoutingStats = ctx.state.pop(_STATS)
        if self.training and self.balance_loss != "per_layer" and self.balance_loss_coef > 0:
            n = self.layout(stats.f_G.device).n  # the same in every layer (shared window size, same n_local)
            loss = universal_balance_loss(stats.f_G, stats.P_G, stats.c_G, n, self.balance_loss == "universal")
            ctx.add_aux_loss("balance_loss", self.balance_loss_coef * loss)
        if not ctx.collect_metrics:
            return
        with torch.no_grad():
            reachable = stats.c_G > 0
            per_exposure = stats.f_G[reachable] / stats.c_G[reachable]
            ctx.add_metric("moue/pool_load", stats.f_G[: self.M] / max(stats.layers, 1))
            # spread of the exposure-corrected load (0 = what the universal loss aims for)
            ctx.add_metric(
                "moue/load_per_exposure_cv", per_exposure.std(unbiased=False) / per_exposure.mean().clamp(min=1e-9)
            )
            ctx.add_metric("moue/window_size", torch.tensor(float(self.pool.window_size)))

    def cost(self, setting: CostSetting) -> Cost:
        """Per-layer routers in full; k experts from the shared pool (+ this layer's locals), each 3·D·F
        weights and its trajectory embedding; the pool, shared by all layers, counts once. FLOPs: the
        routers (a shared pool router is a Parameter, not an nn.Linear), k experts, and the trajectory
        EMA Σ_k g_k u_k (2·k·Z)."""
        if setting.routable_experts is not None:
            raise ValueError("ffn=moue does not support elastic expert subsets (elastic.width_full_prob must be 1)")
        pool = self.pool
        reachable = min(pool.window_size, self.M) + self.n_local
        k = min(setting.top_k or self.top_k, reachable)
        per_expert = 3 * self.d_model * self.F + self.trajectory_dim
        params = {id(self): numel(self.router) + numel(self.local_router)}
        shared_router_flops = 0.0
        if pool.router_MI is not None:  # one router for every layer: its parameters count once
            params[id(pool.router_MI)] = pool.router_MI.numel()
            shared_router_flops = 2 * pool.router_MI.numel()
        return Cost(
            params,
            experts={id(pool): ExpertUse(k, per_expert, self.M + self.n_layers * self.n_local)},
            matmul_flops=linear_flops(self.router)
            + linear_flops(self.local_router)
            + shared_router_flops
            + k * 2 * 3 * self.d_model * self.F
            + 2 * k * self.trajectory_dim,
        )


class _Layout(NamedTuple):
    mask_X: torch.Tensor  # bool, routable columns
    routable_R: torch.Tensor  # their indices
    position_X: torch.Tensor  # column → position among the routable ones (-1 if not routable)
    columns_X: torch.Tensor  # column → model-wide expert index
    n: int  # number of routable experts


def _check_options(
    M, n_local, top_k, window, stride, widen_to, widen_start, widen_steps, trajectory_dim, decay
) -> None:
    if M < 1 or n_local < 0:
        raise ValueError(f"ffn.n_universal={M} must be >= 1 and ffn.n_local={n_local} >= 0")
    if not 1 <= window <= M:
        raise ValueError(f"ffn.window_size={window} must be in [1, n_universal={M}]")
    if not 1 <= top_k <= window + n_local:
        raise ValueError(f"ffn.top_k={top_k} must be in [1, window_size + n_local = {window + n_local}]")
    if stride < 1:
        raise ValueError(f"ffn.window_stride={stride} must be >= 1 (or null: n_universal // n_layers)")
    if widen_to is not None and not window <= widen_to <= M:
        raise ValueError(f"ffn.widen_to={widen_to} must be in [window_size={window}, n_universal={M}] or null")
    if widen_start < 0 or widen_steps < 0:
        raise ValueError(f"ffn.widen_start={widen_start} and ffn.widen_steps={widen_steps} must be >= 0")
    if trajectory_dim < 1:
        raise ValueError(
            f"ffn.trajectory_dim={trajectory_dim} must be >= 1 (turn the state off with ffn.trajectory=false)"
        )
    if not 0 <= decay < 1:
        raise ValueError(f"ffn.trajectory_decay={decay} must be in [0, 1)")
