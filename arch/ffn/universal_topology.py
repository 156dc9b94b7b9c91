"""MoUE structure without parameters: rotational windows, exposure counts, widening schedule, balance losses.

Mixture of Universal Experts (Chen et al. 2026, arXiv 2603.04971). Only the abstract is known
(METHODS.md §2), so every formula here is a reconstruction [RECON] of the named components,
kept as plain functions so that tests and the conversion tool can use them without a model.

Expert index spaces: a layer scores X = M + n_local columns (the M pool experts, then its own
local experts). Pooled statistics live in G = M + n_layers·n_local columns: the pool, then the
local experts of layer 0, layer 1, … (``global_local_offset``).

Legend: N tokens, K experts per token, M pool (universal) experts, X columns a layer scores,
G experts of the whole model, L layers.
"""

from __future__ import annotations

import torch

from arch.ffn.router import switch_balance_loss


def window_offset(layer_idx: int, n_universal: int, stride: int, base_size: int, size: int, anchor: str) -> int:
    """First pool expert of layer ℓ's window: (ℓ·s) mod M, moved back by half the growth when
    the window has been widened around its original experts (anchor ``center``) [RECON]."""
    shift = (size - base_size) // 2 if anchor == "center" else 0
    return (layer_idx * stride - shift) % n_universal


def window_members(
    layer_idx: int,
    n_universal: int,
    size: int,
    stride: int,
    topology: str = "rotational",
    base_size: int | None = None,
    anchor: str = "center",
) -> list[int]:
    """Pool experts layer ℓ may route to: {(o_ℓ + j) mod M : j < size}, or all M for ``full``."""
    if topology == "full" or size >= n_universal:
        return list(range(n_universal))
    offset = window_offset(layer_idx, n_universal, stride, size if base_size is None else base_size, size, anchor)
    return [(offset + j) % n_universal for j in range(size)]


def exposure_counts(
    n_layers: int,
    n_universal: int,
    size: int,
    stride: int,
    topology: str = "rotational",
    base_size: int | None = None,
    anchor: str = "center",
) -> torch.Tensor:
    """c_e: how many layers' windows contain pool expert e, shape (M,)."""
    c_M = torch.zeros(n_universal)
    for layer in range(n_layers):
        c_M[window_members(layer, n_universal, size, stride, topology, base_size, anchor)] += 1
    return c_M


def widened_size(step: int, base: int, target: int | None, start: int, steps: int) -> int:
    """Window size after ``step`` optimizer steps: ``base`` until ``start``, then a linear ramp to
    ``target`` over ``steps`` steps (a jump when steps = 0) [RECON; cf. ReXMoE progressive scaling]."""
    if target is None or target <= base or step < start:
        return base
    if steps <= 0:
        return target
    return base + int((target - base) * min(1.0, (step - start) / steps))


# ---------------------------------------------------------------------------------------- losses
def per_layer_balance_loss(probs_NX: torch.Tensor, ids_NK: torch.Tensor, n_routable: int) -> torch.Tensor:
    """The plain Switch loss of one layer over its n routable experts: n · Σ_e f_e P_e (1 when balanced).

    ``probs_NX`` is zero outside the routable set, so the X-column Switch loss only needs rescaling.
    """
    X = probs_NX.shape[-1]
    return switch_balance_loss(probs_NX, ids_NK, X) * n_routable / X


def universal_balance_loss(
    f_G: torch.Tensor, P_G: torch.Tensor, c_G: torch.Tensor, n_routable: int, corrected: bool = True
) -> torch.Tensor:
    """Balance loss on statistics pooled over the layers that ran [RECON].

    f_e = Σ_ℓ f_{ℓ,e} (fraction of layer ℓ's routed slots on e), P_e = Σ_ℓ P_{ℓ,e} (mean router
    probability), c_e = number of those layers whose routable set contains e (exposure). With
    depth-aware exposure correction each expert's load is normalised by its exposure:

        L = n · Σ_e c_e · (f_e / c_e) · (P_e / c_e) = n · Σ_e f_e P_e / c_e,

    whose gradient on P_{ℓ,e} is the expert's load *per reaching layer*, uniform when every layer
    spreads its slots evenly over its n routable experts (then L = number of layers, the value of
    the summed per-layer loss). ``corrected=False`` divides by the mean exposure instead, so
    experts reachable from more layers are pushed down harder: the mismatch the correction removes.
    """
    reachable = c_G > 0
    if corrected:
        scale_G = torch.where(reachable, 1.0 / c_G.clamp(min=1), torch.zeros_like(c_G))
    else:
        scale_G = reachable.float() * reachable.sum() / c_G.sum().clamp(min=1)
    return n_routable * (f_G * P_G * scale_G).sum()


class PooledRoutingStats:
    """Per-forward accumulator (kept in ``ctx.state``) of f, P and exposure over the layers that ran."""

    def __init__(self, n_global: int, device: torch.device):
        self.f_G = torch.zeros(n_global, device=device)
        self.P_G = torch.zeros(n_global, device=device)  # carries gradient to every layer's router
        self.c_G = torch.zeros(n_global, device=device)
        self.layers = 0

    def add(
        self, columns_X: torch.Tensor, routable_X: torch.Tensor, probs_NX: torch.Tensor, ids_NK: torch.Tensor
    ) -> None:
        """One layer's statistics; ``columns_X`` maps the layer's columns to global expert indices."""
        valid_NK = ids_NK >= 0  # dropped slots (-1) count nothing; weights, not a boolean index: no device sync
        counts_X = torch.zeros(probs_NX.shape[-1], device=probs_NX.device).index_add_(
            0, ids_NK.clamp(min=0).flatten(), valid_NK.flatten().float()
        )
        self.f_G = self.f_G.index_add(0, columns_X, counts_X / valid_NK.sum().clamp(min=1))
        self.P_G = self.P_G.index_add(0, columns_X, probs_NX.float().mean(0))
        self.c_G = self.c_G.index_add(0, columns_X, routable_X.float())
        self.layers += 1
