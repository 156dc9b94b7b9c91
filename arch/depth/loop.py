"""Looped depth: weight-shared layer repetition (``depth=loop``) and the Huginn recurrent-depth
model (``depth=recurrent``, METHODS.md §8.5, §9.5).

Both spend more compute per token without more parameters. Every attention call takes the next
KV-cache slot, so generation with a fixed iteration count caches correctly (one slot per call).

Legend: B batch, T tokens, D d_model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn as nn

from arch.cost import Cost, CostSetting, block_cost, linear_flops, numel
from arch.layers import ForwardContext, ModelShared, RMSNorm
from arch.registry import ConfigError

_STREAM = 0x100B  # separates the iteration-count RNG stream from the data and elastic streams


def _check_layers(layers, n_layers: int, key: str) -> list[int]:
    layers = [int(i) for i in layers]
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ConfigError(f"{key}={layers} holds {bad}; layer indices must lie in [0, model.n_layers={n_layers})")
    return layers


class LoopDepth(nn.Module):
    """Runs the blocks in an execute order in which layers may repeat (weights shared).

    ``order`` (explicit, e.g. ``[0, 1, 1, 1, 1, 2, 3, 3, 3, 3]``) wins over the generated order;
    otherwise ``pattern=layer`` runs each of ``looped_layers`` (None = all) ``repeats`` times in
    place (ITT's "Loop×4" on every other layer, METHODS.md §5(d)), and ``pattern=stack`` runs the
    whole stack ``repeats`` times. ``set_repeats`` changes the count at evaluation time.
    """

    def __init__(
        self,
        n_layers: int,
        make_block: Callable[[int], nn.Module],
        shared: ModelShared | None = None,
        *,
        order: list | None = None,
        repeats: int = 2,
        looped_layers: list | None = None,
        pattern: Literal["layer", "stack"] = "layer",
    ):
        super().__init__()
        self.blocks = nn.ModuleList(make_block(i) for i in range(n_layers))
        self.n_layers, self.pattern = n_layers, pattern
        self.explicit = _check_layers(order, n_layers, "model.depth.order") if order is not None else None
        if self.explicit is not None and not self.explicit:
            raise ConfigError("model.depth.order=[] must name at least one layer")
        if pattern == "stack" and looped_layers is not None:
            raise ConfigError("model.depth.pattern=stack repeats the whole stack; set model.depth.looped_layers=null")
        self.looped = (
            set(_check_layers(looped_layers, n_layers, "model.depth.looped_layers"))
            if looped_layers is not None
            else None
        )
        self.set_repeats(repeats)

    def set_repeats(self, repeats: int) -> None:
        """Evaluate (or train) with another repeat count; ignored when ``order`` is explicit."""
        if repeats < 1:
            raise ConfigError(f"model.depth.repeats={repeats} must be >= 1")
        self.repeats = repeats
        self.order = self.execute_order(repeats)

    def execute_order(self, repeats: int) -> list[int]:
        """The layer indices run, in order, at ``repeats`` repeats."""
        if self.explicit is not None:
            return list(self.explicit)
        if self.pattern == "stack":
            return list(range(self.n_layers)) * repeats
        return [
            i for i in range(self.n_layers) for _ in range(repeats if self.looped is None or i in self.looped else 1)
        ]

    def forward(self, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        active = ctx.elastic.active_layers  # elastic depth skips a layer at every one of its repeats
        for i in self.order:
            if active is None or i in active:
                x_BTD = self.blocks[i](x_BTD, ctx)
        return x_BTD

    def cost(self, setting: CostSetting) -> Cost:
        """A layer appearing c times in the execute order costs c calls (and c cache slots); its
        parameters count once. ``setting.repeats`` prices another repeat count than the current one."""
        total = Cost()
        for i in self.order if setting.repeats is None else self.execute_order(setting.repeats):
            if setting.runs(i):
                total = total + block_cost(self.blocks[i], setting)
        return total


class RecurrentDepth(nn.Module):
    """Huginn (Geiping et al. 2025): prelude P → recurrent core R iterated r times → coda C.

    [CODE seal-rg/recurrent-pretraining ``raven_modeling_minimal.py``]:
      e = P(x);  s_0 = sqrt(D) · TruncNormal(0, σ²) on ±3σ with σ = sqrt(2 / (5D)) (``initialize_state``:
      the sampled state is multiplied by the embedding scale sqrt(D), so its std is ≈ sqrt(2/5) ≈ 0.63 for any D);
      s_i = R(Adapter([s_{i-1}; e])) with Adapter = Linear(2D → D, no bias);
      out = C(norm(s_r)).
    Training draws r per forward (``randomized_iteration_sampler``): τ ~ LogNormal(ln(max(r̄, k̄))
    − σ²/2, σ), p = Poisson(τ) + 1; the first max(p − k̄, 0) iterations run under ``no_grad`` and
    the last min(k̄, p) with gradients (truncated backprop, k̄ = ``mean_backprop_depth``).
    Evaluation runs ``eval_iterations`` (default r̄; change with ``set_iterations``).

    Differences from the reference, all deliberate: the blocks are the framework's pre-norm blocks
    (Huginn uses "sandwich" blocks with four norms); the draw is seeded by (seed, optimizer step,
    forward index) instead of the global RNG, so every rank and every resumed run draws the same
    r. ``injection=add`` (s + e, no adapter) and ``sampler=fixed`` are ablations, not Huginn.
    """

    def __init__(
        self,
        n_layers: int,
        make_block: Callable[[int], nn.Module],
        shared: ModelShared,
        *,
        prelude_layers: int = 1,
        core_layers: int = 2,
        coda_layers: int = 1,
        mean_recurrence: int = 4,
        mean_backprop_depth: int = 2,
        sampler: Literal["lognormal_poisson", "fixed"] = "lognormal_poisson",
        sigma: float = 0.5,
        injection: Literal["linear", "add"] = "linear",
        state_init: Literal["like-init", "normal", "embed", "zero"] = "like-init",
        state_std: float | None = None,
        state_scale: float | None = None,
        state_norm: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        if min(prelude_layers, coda_layers) < 0 or core_layers < 1:
            raise ConfigError("model.depth: prelude_layers and coda_layers must be >= 0 and core_layers >= 1")
        if prelude_layers + core_layers + coda_layers != n_layers:
            raise ConfigError(
                "model.depth: prelude_layers + core_layers + coda_layers = "
                f"{prelude_layers}+{core_layers}+{coda_layers} "
                f"must equal model.n_layers={n_layers}"
            )
        if mean_recurrence < 1 or mean_backprop_depth < 1:
            raise ConfigError(
                f"model.depth.mean_recurrence={mean_recurrence} and mean_backprop_depth={mean_backprop_depth} must "
                "be >= 1"
            )
        if sigma <= 0:
            raise ConfigError(f"model.depth.sigma={sigma} must be > 0")
        D = shared.d_model
        self.blocks = nn.ModuleList(make_block(i) for i in range(n_layers))
        self.n_prelude, self.n_core, self.n_coda = prelude_layers, core_layers, coda_layers
        self.mean_recurrence, self.mean_backprop_depth = mean_recurrence, mean_backprop_depth
        self.sampler, self.sigma, self.seed = sampler, sigma, seed
        if state_init not in ("like-init", "normal", "embed", "zero"):
            raise ConfigError(
                f"model.depth.state_init={state_init!r} is not one of ['like-init', 'normal', 'embed', 'zero']"
            )
        self.state_init = state_init
        self.state_std = state_std if state_std is not None else math.sqrt(2 / (5 * D))
        self.state_scale = state_scale if state_scale is not None else math.sqrt(D)  # Huginn's embedding scale
        if self.state_std < 0 or self.state_scale < 0:
            raise ConfigError(f"model.depth.state_std={self.state_std} and state_scale={self.state_scale} must be >= 0")
        self.adapter = nn.Linear(2 * D, D, bias=False) if injection == "linear" else None
        self.out_norm = RMSNorm(D) if state_norm else None
        # Optimizer steps taken (in checkpoints, so a resumed run draws the same iteration counts).
        self.register_buffer("optimizer_steps", torch.zeros((), dtype=torch.long))
        self._forwards_this_step = 0
        self.eval_iterations = mean_recurrence
        self.last_iterations: tuple[int, int] = (0, 0)

    # ------------------------------------------------------------------ pieces (the sampler uses them too)
    def _run(self, blocks, x_BTD: torch.Tensor, ctx: ForwardContext, first: int) -> torch.Tensor:
        active = ctx.elastic.active_layers
        for i, block in enumerate(blocks, start=first):
            if active is None or i in active:
                x_BTD = block(x_BTD, ctx)
        return x_BTD

    def prelude(self, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self._run(self.blocks[: self.n_prelude], x_BTD, ctx, 0)

    def core_step(self, s_BTD: torch.Tensor, e_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """One recurrence: inject the prelude output e, then the core blocks."""
        x_BTD = self.adapter(torch.cat([s_BTD, e_BTD], dim=-1)) if self.adapter is not None else s_BTD + e_BTD
        return self._run(self.blocks[self.n_prelude : self.n_prelude + self.n_core], x_BTD, ctx, self.n_prelude)

    def coda(self, s_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x_BTD = self.out_norm(s_BTD) if self.out_norm is not None else s_BTD
        return self._run(self.blocks[self.n_prelude + self.n_core :], x_BTD, ctx, self.n_prelude + self.n_core)

    def initial_state(self, like_BTD: torch.Tensor) -> torch.Tensor:
        """s_0 (B, T, D), the state-init choices of the official training code [CODE]:
        ``like-init``: state_scale · TruncNormal(0, state_std²) on ±3σ (defaults sqrt(D) and sqrt(2/(5D)):
        std ≈ 0.63 whatever D); ``normal``: N(0, 1); ``embed``: N(0, 1/D); ``zero``: zeros."""
        D = like_BTD.shape[-1]
        if self.state_init == "zero" or (self.state_init == "like-init" and self.state_std == 0):
            return torch.zeros_like(like_BTD)
        s_BTD = torch.randn_like(like_BTD)
        if self.state_init == "embed":
            return s_BTD / math.sqrt(D)
        if self.state_init == "like-init":
            nn.init.trunc_normal_(s_BTD, 0.0, self.state_std, -3 * self.state_std, 3 * self.state_std)
            s_BTD = s_BTD * self.state_scale
        return s_BTD

    # ------------------------------------------------------------------ iteration counts
    def sample_iterations(self) -> tuple[int, int]:
        """(iterations without gradient, iterations with gradient) for this forward."""
        if not self.training:  # the caller's grad mode decides; [CODE] runs all of them under no_grad
            return 0, self.eval_iterations
        s = self.mean_backprop_depth
        if self.sampler == "fixed":
            return max(self.mean_recurrence - s, 0), min(s, self.mean_recurrence)
        rng = np.random.default_rng([self.seed, int(self.optimizer_steps), self._forwards_this_step, _STREAM])
        self._forwards_this_step += 1  # gradient accumulation: each micro-batch draws its own r
        t = max(self.mean_recurrence - s, 0)
        mu = math.log(t + s) - self.sigma**2 / 2
        p = int(rng.poisson(rng.lognormal(mu, self.sigma))) + 1
        return max(p - s, 0), min(s, p)

    def set_iterations(self, iterations: int) -> None:
        """Evaluate at another recurrence count (any r >= 1)."""
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        self.eval_iterations = int(iterations)

    def after_optimizer_step(self, step: int) -> None:
        self.optimizer_steps.fill_(step + 1)
        self._forwards_this_step = 0

    # ------------------------------------------------------------------ forward
    def forward(self, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        e_BTD = self.prelude(x_BTD, ctx)
        n_frozen, n_grad = self.sample_iterations()
        self.last_iterations = (n_frozen, n_grad)
        s_BTD = self.initial_state(e_BTD)
        with torch.no_grad():  # truncated backprop: no graph is kept for these iterations
            for _ in range(n_frozen):
                s_BTD = self.core_step(s_BTD, e_BTD, ctx)
        for _ in range(n_grad):
            s_BTD = self.core_step(s_BTD, e_BTD, ctx)
        ctx.add_metric("recurrent/iterations", torch.tensor(float(n_frozen + n_grad)))
        return self.coda(s_BTD, ctx)

    def cost(self, setting: CostSetting) -> Cost:
        """Prelude and coda once; the core (adapter + core blocks) r times. Training: the expected
        iteration counts of the sampler (``expected_iterations``), the no-grad ones costing forward
        only. Evaluation: ``setting.iterations`` or ``eval_iterations``. The KV cache holds every core
        call at the evaluation iteration count (generation runs in eval mode)."""
        eval_iterations = setting.iterations or self.eval_iterations
        if setting.training:
            frozen, with_grad = expected_iterations(
                self.mean_recurrence, self.mean_backprop_depth, self.sigma, self.sampler
            )
        else:
            frozen, with_grad = 0.0, float(eval_iterations)
        first_core, first_coda = self.n_prelude, self.n_prelude + self.n_core
        once, core = Cost(), Cost()
        if self.adapter is not None:
            core = Cost({id(self.adapter): numel(self.adapter)}, matmul_flops=linear_flops(self.adapter))
        if self.out_norm is not None:
            once = Cost({id(self.out_norm): numel(self.out_norm)})
        for i, block in enumerate(self.blocks):
            if not setting.runs(i):
                continue
            if first_core <= i < first_coda:
                core = core + block_cost(block, setting)
            else:
                once = once + block_cost(block, setting)
        return once + core.repeated(frozen + with_grad, kv_times=eval_iterations, no_grad_times=frozen)


def expected_iterations(mean_recurrence: int, backprop_depth: int, sigma: float, sampler: str) -> tuple[float, float]:
    """(E[iterations without gradient], E[iterations with gradient]) of one training forward of
    ``RecurrentDepth`` (Huginn's sampler, METHODS.md §8.5).

    ``fixed``: r̄ iterations, the last min(k̄, r̄) with gradient. ``lognormal_poisson``:
    p = Poisson(τ) + 1 with τ ~ LogNormal(ln(t + k̄) − σ²/2, σ), t = max(r̄ − k̄, 0), so
    E[p] = t + k̄ + 1 exactly; E[min(k̄, p)] = Σ_{m<k̄} P(Poisson(τ) ≥ m) is integrated over τ by
    Gauss–Hermite quadrature (deterministic, ~1e-9 accurate).
    """
    s = backprop_depth
    if sampler == "fixed":
        return float(max(mean_recurrence - s, 0)), float(min(s, mean_recurrence))
    t = max(mean_recurrence - s, 0)
    mu = np.log(t + s) - sigma**2 / 2
    nodes, weights = np.polynomial.hermite.hermgauss(80)
    tau_Q, w_Q = np.exp(mu + np.sqrt(2) * sigma * nodes), weights / np.sqrt(np.pi)
    n_M = np.arange(s)
    log_factorial_M = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, s)))])
    pmf_QM = np.exp(-tau_Q[:, None] + n_M * np.log(tau_Q[:, None]) - log_factorial_M)  # P(N = m | τ)
    below_QM = np.cumsum(pmf_QM, axis=1) - pmf_QM  # P(N < m | τ)
    with_grad = float(w_Q @ (1 - below_QM).sum(1))
    return t + s + 1 - with_grad, with_grad
