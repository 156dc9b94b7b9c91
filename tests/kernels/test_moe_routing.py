"""Routing metadata: Triton kernels (interpreter on CPU) against the torch fallback and a brute-force check.

Legend: N tokens, k slots/token, M = N·k, E experts.
"""

from __future__ import annotations

import pytest
import torch

from kernels import triton_runnable
from kernels.moe import route
from tests.kernels.moe_helpers import poisoned_empty

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_runnable(DEVICE), reason="Triton cannot run here")


def _ids(N, k, E, pattern, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids_NK = torch.randint(0, E, (N, k), generator=g)
    if pattern == "drop":
        ids_NK[torch.rand(N, k, generator=g) < 0.3] = -1
    elif pattern == "one_expert":
        ids_NK[:] = E - 1
    elif pattern == "empty_expert":
        ids_NK[ids_NK == 0] = E - 1
    elif pattern == "all_dropped":
        ids_NK[:] = -1
    return ids_NK


def _check_against_definition(r, ids_NK, E):
    """Stable sort by expert with dropped slots last; counts and offsets match a Python count."""
    ids_M = ids_NK.reshape(-1).tolist()
    expected = [m for e in range(E) for m in range(len(ids_M)) if ids_M[m] == e]
    expected += [m for m in range(len(ids_M)) if ids_M[m] < 0]
    assert r.sorted_slot_M.cpu().tolist() == expected
    counts = [sum(1 for v in ids_M if v == e) for e in range(E)]
    assert r.counts_E.cpu().tolist() == counts
    assert r.offsets_E1.cpu().tolist() == [sum(counts[:e]) for e in range(E + 1)]


CASES = [  # (N, k, E, pattern): odd sizes, k = 1 and k = E, dropped slots, degenerate routings
    (37, 2, 5, "drop"),
    (37, 5, 5, "random"),
    (300, 1, 7, "one_expert"),
    (129, 3, 6, "empty_expert"),
    (20, 2, 3, "all_dropped"),
    (50, 4, 256, "drop"),  # widest histogram the API promises
]


@pytest.mark.parametrize("N,k,E,pattern", CASES)
def test_torch_routing_matches_definition(N, k, E, pattern):
    ids_NK = _ids(N, k, E, pattern)
    _check_against_definition(route(ids_NK, E, backend="torch"), ids_NK, E)


@needs_triton
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("N,k,E,pattern", CASES)
def test_triton_routing_matches_torch(N, k, E, pattern, id_dtype, monkeypatch):
    ids_NK = _ids(N, k, E, pattern).to(id_dtype).to(DEVICE)
    poisoned_empty(monkeypatch)
    got = route(ids_NK, E, backend="triton")
    want = route(ids_NK, E, backend="torch")
    for name, a, b in zip(got._fields, got, want):
        assert a.dtype == torch.int32, name
        assert torch.equal(a, b), f"{name} differs"
    _check_against_definition(got, ids_NK.cpu(), E)


@needs_triton
def test_triton_routing_spans_several_blocks():
    from kernels.moe import routing

    N, k, E = routing.ROUTE_BLOCK + 17, 3, 9  # > 3 routing blocks, last one partial
    ids_NK = _ids(N, k, E, "drop", seed=1).to(DEVICE)
    got, want = route(ids_NK, E, backend="triton"), route(ids_NK, E, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_route_rejects_bad_inputs():
    with pytest.raises(TypeError, match="expert_ids"):
        route(torch.zeros(3, 2), 4)
    with pytest.raises(ValueError, match="num_experts"):
        route(torch.zeros(3, 2, dtype=torch.int64), 0)
