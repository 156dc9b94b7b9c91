"""Mixture-of-experts kernels: routing metadata and the grouped expert MLP.

Public API (other blocks and tests call exactly this):
    expert_mlp(x, expert_ids, expert_weights, w_in, w_out, activation="swiglu", backend="auto") -> y
    route(expert_ids, num_experts, backend="auto") -> Routing(sorted_slot_M, counts_E, offsets_E1)
"""

from kernels.moe.ops import ACTIVATIONS, BACKENDS, expert_mlp
from kernels.moe.reference import expert_mlp_reference
from kernels.moe.routing import Routing, route

__all__ = ["ACTIVATIONS", "BACKENDS", "Routing", "expert_mlp", "expert_mlp_reference", "route"]
