"""MoHD group matmuls with NaN/inf in unselected places: blocks documented as exactly 0 stay exactly 0
and unselected x blocks contribute nothing, on every backend, compared to the loop reference;
gradients over several tiles; out-of-range ids dropped (or refused under SPARSE_ARCH_DEBUG_CHECKS=1).

Legend: N tokens, A slots per token, G groups, b block width, K input width, M output width.
"""

from __future__ import annotations

import pytest
import torch

from kernels import triton_runnable
from kernels.mohd import group_in_matmul, group_out_matmul

BACKENDS = [
    "torch",
    pytest.param(
        "triton", marks=pytest.mark.skipif(not triton_runnable("cpu"), reason="CPU tensors need the interpreter")
    ),
]


def _ids(N, G):
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(G, generator=g)[:2] for _ in range(N)]).to(torch.int32)
    ids[::3, 1] = -1
    return ids, torch.rand(N, 2, generator=g) + 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_out_unselected_blocks_are_exactly_zero_with_nan_input(backend):
    N, G, b, K = 9, 4, 5, 12
    ids, gates = _ids(N, G)
    x = torch.randn(N, K)
    x[2, 3] = float("nan")  # token 2's own selected blocks become NaN; the others stay 0
    x[5, 0] = float("inf")
    gates[4, 1] = float("nan")  # a NaN gate on a selected slot poisons only that block
    w = torch.randn(K, G * b)
    y = group_out_matmul(x, ids, gates, w, G, backend=backend)
    ref = group_out_matmul(x, ids, gates, w, G, backend="reference")
    selected = torch.zeros(N, G, dtype=torch.bool)
    for n in range(N):
        for e in ids[n].tolist():
            if e >= 0:
                selected[n, e] = True
    off = ~selected.repeat_interleave(b, dim=1)
    assert torch.equal(y[off], torch.zeros_like(y[off]))
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(y[fin], ref[fin], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_in_unselected_x_blocks_contribute_nothing(backend):
    N, G, b, M = 9, 4, 5, 7
    ids, gates = _ids(N, G)
    x = torch.randn(N, G * b)
    for n in range(N):  # NaN / inf in every block a token did not select
        chosen = {e for e in ids[n].tolist() if e >= 0}
        for e in range(G):
            if e not in chosen:
                x[n, e * b] = float("nan") if n % 2 else float("inf")
    w = torch.randn(G * b, M)
    y = group_in_matmul(x, ids, gates, w, G, backend=backend)
    ref = group_in_matmul(x, ids, gates, w, G, backend="reference")
    assert torch.isfinite(ref).all() and torch.isfinite(y).all()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", [group_in_matmul, group_out_matmul])
def test_out_of_range_ids_act_like_empty_slots(op, backend, monkeypatch):
    monkeypatch.delenv("SPARSE_ARCH_DEBUG_CHECKS", raising=False)
    N, G, b = 6, 3, 4
    ids, gates = _ids(N, G)
    bad = ids.clone()
    bad[0, 0], bad[1, 1], bad[2, 0] = G, 1000, -7
    x, w = torch.randn(N, G * b), torch.randn(G * b, G * b)
    y = op(x, bad, gates, w, G, backend=backend)
    ref = op(x, torch.where((bad >= 0) & (bad < G), bad, -1), gates, w, G, backend="reference")
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("op", ["in", "out"])
def test_gradients_over_several_tiles_with_nan_in_live_and_dead_places(op, backend):
    """N = 37 spans several 16-row tiles / token chunks (the fuzz keeps N < 16 under the interpreter):
    y, dx, dgates and dw match the fuzz test's independent loop in NaN/inf positions and values."""
    from tests.kernels.test_mohd_fuzz import check

    N, G, b, other = 37, 3, 5, 7
    g = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randperm(G, generator=g)[:2] for _ in range(N)])
    ids[::4, 1] = -1
    K, M = (G * b, other) if op == "in" else (other, G * b)
    x, w = torch.randn(N, K, generator=g, dtype=torch.float64), torch.randn(K, M, generator=g, dtype=torch.float64)
    gates = torch.rand(N, 2, generator=g, dtype=torch.float64) + 0.1
    ids[30] = -1
    x[30, 1] = float("inf")  # a token with no live slot: nothing anywhere
    x[20, (int(ids[20, 0]) * b if op == "in" else 0) + 2] = float("nan")  # a selected place: token 20 only
    if op == "in":  # an unselected block of token 25
        x[25, next(e for e in range(G) if e not in ids[25].tolist()) * b] = -float("inf")
    gates[12, 1], ids[12, 1] = float("nan"), -1  # a dropped slot's NaN gate: nothing
    c = dict(
        op=op,
        ids=ids,
        G=G,
        x=x,
        gates=gates,
        w=w,
        dtype=torch.float32,
        dy=torch.randn(N, M, generator=g, dtype=torch.float64),
    )
    assert check(c, backend) is None, check(c, backend)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("op", [group_in_matmul, group_out_matmul])
def test_debug_checks_refuse_out_of_range_ids_on_every_backend(op, backend, monkeypatch):
    monkeypatch.setenv("SPARSE_ARCH_DEBUG_CHECKS", "1")
    N, G, b = 4, 3, 2
    ids, gates = _ids(N, G)
    ids[1, 0] = G
    x, w = torch.randn(N, G * b), torch.randn(G * b, G * b)
    with pytest.raises(ValueError, match=r"ids values must be in \[0, n_groups=3\) or -1, found 3"):
        op(x, ids, gates, w, G, backend=backend)


def test_meta_tensors_are_refused():
    with pytest.raises(ValueError, match="meta device"):
        group_in_matmul(
            torch.zeros(2, 4, device="meta"),
            torch.zeros(2, 1, dtype=torch.int32, device="meta"),
            torch.zeros(2, 1, device="meta"),
            torch.zeros(4, 3, device="meta"),
            2,
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", [group_in_matmul, group_out_matmul])
def test_compile_fullgraph(op, backend):
    torch._dynamo.reset()
    N, G, b = 6, 3, 4
    ids, gates = _ids(N, G)
    x = torch.randn(N, G * b, requires_grad=True)
    w = torch.randn(G * b, G * b, requires_grad=True)
    compiled = torch.compile(op, fullgraph=True, backend="aot_eager")
    y = compiled(x, ids, gates, w, G, backend=backend)
    y.sum().backward()
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    yr = op(xr, ids, gates, wr, G, backend="reference")
    yr.sum().backward()
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not triton_runnable("cpu"), reason="CPU tensors need the interpreter")
def test_opcheck_gated_ops():
    from kernels.mohd import ops

    x, gate, w = torch.randn(5, 8), torch.rand(5, 2), torch.randn(8, 6)
    torch.library.opcheck(ops._gated_in_op, (x, gate, w))
    torch.library.opcheck(ops._gated_out_op, (x, gate, w))
    torch.library.opcheck(ops._gated_wgrad_out_op, (x, gate, torch.randn(5, 6)))
