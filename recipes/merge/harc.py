"""HARC: training-free router calibration for merged MoE checkpoints (Huang et al., ICML 2026, arXiv 2606.03391).

After the non-router weights of fine-tuned MoEs are merged (``recipes.merge.merge``), each router
W ∈ R^{E×D} is re-solved in closed form, layer by layer in order: the merged model runs on
calibration batches from every source domain d (earlier layers already use their calibrated
routers), the router inputs X_d are collected, and W solves the second-order logit match

    Σ_d (1/N_d) Σ_{x∈X_d} H_d(x) (W − W_d) x xᵀ = 0,   H_d(x) = diag(r) − r rᵀ,  r = softmax(W_d x),

with W_d the source model's router (METHODS.md §8.4). Solver details follow the official
``huangcb01/HARC`` ``router_calibration_cg.py`` [CODE]: matrix-free conjugate gradient (≤100
iterations, relative-residual tolerance 1e-6) on vec(W); per-domain averages 1/N_d; damping γ
(γ>1: Σ + (γ−1)·diag Σ, γ<1: γ·Σ + (1−γ)·diag Σ) applied per domain to both sides; initialisation
from the router being replaced ("origin"), the average of the source routers, or zero; optional
diagonal (diag Σ, clamped at 1e-10 and divided by its median) or Kronecker (H̄ ⊗ C̄, each + max(γ,
1e-8)·I, applied through Cholesky factors) preconditioners. Two deviations, both in the Kronecker
preconditioner, where the official code cannot run as written: it accumulates H̄ = mean(r rᵀ −
diag r), the negated (negative semi-definite) Hessian, and its second triangular solve only
type-checks when E = D. We use the positive semi-definite H̄ = mean(diag r − r rᵀ) and apply
M⁻¹ V = H̄⁻¹ V C̄⁻¹, which is what its docstring states.

Legend: N tokens of one domain, D router input width, E experts, W_ED a router weight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch

from arch.ffn.moe import MoEFFN
from arch.ffn.router import LinearRouter


@dataclass
class HARCOptions:
    """The calibration options of METHODS.md §8.4 (defaults: the official code's)."""

    damping: float = 1.0  # γ
    init: Literal["origin", "average", "zero"] = "origin"
    preconditioner: Literal["none", "diagonal", "kronecker"] = "none"
    max_iter: int = 100
    tol: float = 1e-6

    def __post_init__(self):
        if self.init not in ("origin", "average", "zero"):
            raise ValueError(f"harc.init={self.init!r} must be one of ['origin', 'average', 'zero']")
        if self.preconditioner not in ("none", "diagonal", "kronecker"):
            raise ValueError(
                f"harc.preconditioner={self.preconditioner!r} must be one of ['none', 'diagonal', 'kronecker']"
            )
        if self.damping <= 0:
            raise ValueError(f"harc.damping={self.damping} must be positive")


class RouterCalibration:
    """The calibration system of one router: A·vec(W) = Σ_d Σ_d^reg W and b = Σ_d Σ_d^reg W_d.

    ``inputs``: per domain, the router inputs X_d (N_d, D); ``source_weights``: per domain, W_d (E, D).
    Σ_d W = (1/N_d) Σ_x (H_d(x) W x) xᵀ, applied without forming the (E·D)² matrix.
    """

    def __init__(self, inputs: list[torch.Tensor], source_weights: list[torch.Tensor], damping: float = 1.0):
        if len(inputs) != len(source_weights) or not inputs:
            raise ValueError(f"need one input batch per source router, got {len(inputs)} and {len(source_weights)}")
        self.X = [x.double() for x in inputs]
        self.W_src = [w.double() for w in source_weights]
        self.E, self.D = self.W_src[0].shape
        self.damping = damping
        self.R = [(x @ w.T).softmax(-1) for x, w in zip(self.X, self.W_src)]  # r = softmax(W_d x), (N, E)
        # diag Σ_d: entry (e, i) = mean_x r_e (1 − r_e) x_i²
        self.diag = [(r * (1 - r)).T @ (x * x) / len(x) for x, r in zip(self.X, self.R)]

    def _sigma(self, d: int, W_ED: torch.Tensor) -> torch.Tensor:
        X, R = self.X[d], self.R[d]
        Z_NE = X @ W_ED.T
        HZ_NE = R * Z_NE - R * (R * Z_NE).sum(-1, keepdim=True)  # H_d(x) W x for every token
        return HZ_NE.T @ X / len(X)

    def _regularized(self, d: int, W_ED: torch.Tensor) -> torch.Tensor:
        g = self.damping
        if g > 1:
            return self._sigma(d, W_ED) + (g - 1) * self.diag[d] * W_ED
        if g < 1:
            return g * self._sigma(d, W_ED) + (1 - g) * self.diag[d] * W_ED
        return self._sigma(d, W_ED)

    def matvec(self, w: torch.Tensor) -> torch.Tensor:
        W_ED = w.view(self.E, self.D)
        return sum(self._regularized(d, W_ED) for d in range(len(self.X))).reshape(-1)

    def rhs(self) -> torch.Tensor:
        return sum(self._regularized(d, W) for d, W in enumerate(self.W_src)).reshape(-1)

    def diagonal(self) -> torch.Tensor:
        scale = self.damping if self.damping > 1 else 1.0  # the official code scales diag Σ by γ only when γ > 1
        return (scale * sum(self.diag)).reshape(-1)

    def kronecker_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """H̄ = Σ_d mean_x(diag r − r rᵀ) (E, E) and C̄ = Σ_d mean_x x xᵀ (D, D)."""
        H_EE = sum(torch.diag(r.sum(0)) / len(r) - r.T @ r / len(r) for r in self.R)
        C_DD = sum(x.T @ x / len(x) for x in self.X)
        return H_EE, C_DD

    def preconditioner(self, kind: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if kind == "none":
            return None
        if kind == "diagonal":
            diag = self.diagonal().clamp(min=1e-10)
            diag = diag / diag.median()
            return lambda r: r / diag
        H_EE, C_DD = self.kronecker_factors()
        eps = max(self.damping, 1e-8)
        L_H = torch.linalg.cholesky(H_EE + eps * torch.eye(self.E, dtype=H_EE.dtype))
        L_C = torch.linalg.cholesky(C_DD + eps * torch.eye(self.D, dtype=C_DD.dtype))

        def apply(r: torch.Tensor) -> torch.Tensor:  # vec(H̄⁻¹ V C̄⁻¹)
            V_ED = r.view(self.E, self.D)
            VCinv_ED = torch.cholesky_solve(V_ED.T, L_C).T
            return torch.cholesky_solve(VCinv_ED, L_H).reshape(-1)

        return apply


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    x0: torch.Tensor,
    preconditioner: Callable[[torch.Tensor], torch.Tensor] | None = None,
    max_iter: int = 100,
    tol: float = 1e-6,
) -> tuple[torch.Tensor, dict]:
    """(Preconditioned) CG for A x = b, as in the official code: stop when ‖r‖/‖b‖ < tol (recursive
    residual) or when pᵀAp vanishes. Returns x and {"iterations", "relative_residual"} (true residual)."""
    x = x0.clone()
    b_norm = b.norm()
    if b_norm == 0:
        return x, {"iterations": 0, "relative_residual": 0.0}
    r = b - matvec(x)
    z = preconditioner(r) if preconditioner is not None else r.clone()
    p, rz = z.clone(), torch.dot(r, z)
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007  (the count is reported after the loop)
        Ap = matvec(p)
        pAp = torch.dot(p, Ap)
        if abs(pAp) < 1e-14:  # converged to round-off (or a null direction)
            break
        alpha = rz / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        if r.norm() / b_norm < tol:
            break
        z = preconditioner(r) if preconditioner is not None else r
        rz_new = torch.dot(r, z)
        p, rz = z + (rz_new / rz) * p, rz_new
    residual = float((b - matvec(x)).norm() / b_norm)
    return x, {"iterations": iterations, "relative_residual": residual}


def solve_router(problem: RouterCalibration, init_ED: torch.Tensor, options: HARCOptions) -> tuple[torch.Tensor, dict]:
    """The calibrated router W (E, D) from the initial guess ``init_ED``."""
    x, info = conjugate_gradient(
        problem.matvec,
        problem.rhs(),
        init_ED.double().reshape(-1),
        problem.preconditioner(options.preconditioner),
        options.max_iter,
        options.tol,
    )
    return x.view(problem.E, problem.D), info


# ---------------------------------------------------------------------------------- whole models


def moe_layers(model: torch.nn.Module, calibratable: bool = True) -> list[MoEFFN]:
    """The model's MoE layers in execution order; calibration needs softmax scoring over a linear router."""
    layers = [m for m in model.modules() if isinstance(m, MoEFFN)]
    if not layers:
        raise ValueError("HARC needs an MoE model (model.ffn in moe / emoe / mhmoe); this model has no MoE layer")
    for layer in layers if calibratable else ():
        if not isinstance(layer.router, LinearRouter) or layer.scoring != "softmax":
            raise ValueError(
                f"HARC calibrates linear softmax routers; layer {layer.layer_idx} has "
                f"router={type(layer.router).__name__} "
                f"scoring={layer.scoring} (use model.ffn.router=linear, model.ffn.scoring=softmax)"
            )
    return layers


@torch.no_grad()
def router_inputs(model: torch.nn.Module, layer: MoEFFN, batches: Iterable[torch.Tensor], device) -> torch.Tensor:
    """Every input row (N, D) the layer's router sees while the model runs on ``batches`` (eval mode)."""
    rows: list[torch.Tensor] = []
    handle = layer.router.register_forward_pre_hook(lambda module, args: rows.append(args[0].detach().double().cpu()))
    try:
        model.eval()
        for x_BT in batches:
            model(x_BT.to(device))
    finally:
        handle.remove()
    return torch.cat(rows)


@torch.no_grad()
def routing_ids(model: torch.nn.Module, batches: Iterable[torch.Tensor], device) -> list[torch.Tensor]:
    """Per MoE layer, the expert ids (N, K) the model chooses on ``batches`` (eval mode)."""
    layers = moe_layers(model, calibratable=False)
    ids: list[list[torch.Tensor]] = [[] for _ in layers]
    model.eval()
    for x_BT in batches:
        model(x_BT.to(device))
        for i, layer in enumerate(layers):
            ids[i].append(layer.last_ids_NK.cpu())
    return [torch.cat(per_layer) for per_layer in ids]


def routing_agreement(ids_a: list[torch.Tensor], ids_b: list[torch.Tensor]) -> list[float]:
    """Per layer, the mean fraction of a token's top-k experts that both models choose (1 = same sets)."""
    out = []
    for a_NK, b_NK in zip(ids_a, ids_b):
        shared_N = (a_NK.unsqueeze(-1) == b_NK.unsqueeze(-2)).any(-1).sum(-1).float()
        out.append(float((shared_N / a_NK.shape[1]).mean()))
    return out


@torch.no_grad()
def calibrate_routers(
    merged: torch.nn.Module,
    sources: list[torch.nn.Module],
    calibration: list[list[torch.Tensor]],
    options: HARCOptions,
    device="cpu",
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Replace every router of ``merged`` by its HARC solution, layer by layer in order (in place).

    ``calibration[d]``: token batches (B, T) of source domain d, whose model is ``sources[d]``.
    Returns per-layer solver statistics.
    """
    if len(sources) != len(calibration):
        raise ValueError(
            f"need calibration batches for each of the {len(sources)} source models, got {len(calibration)}"
        )
    layers = moe_layers(merged)
    source_layers = [moe_layers(s) for s in sources]
    stats = []
    for i, layer in enumerate(layers):  # in order: layer i's inputs come from calibrated layers < i
        weight = layer.router.proj.weight
        inputs = [router_inputs(merged, layer, batches, device) for batches in calibration]
        source_weights = [s[i].router.proj.weight.detach().cpu() for s in source_layers]
        if options.init == "origin":
            init_ED = weight.detach().cpu()
        elif options.init == "average":
            init_ED = sum(source_weights) / len(source_weights)
        else:
            init_ED = torch.zeros_like(weight, device="cpu")
        W_ED, info = solve_router(RouterCalibration(inputs, source_weights, options.damping), init_ED, options)
        weight.copy_(W_ED.to(weight.dtype))
        stats.append({"layer": i, **info, "tokens": [len(x) for x in inputs]})
        log(f"HARC layer {i}: CG {info['iterations']} iterations, relative residual {info['relative_residual']:.2e}")
    return stats
