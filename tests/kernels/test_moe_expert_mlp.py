"""expert_mlp: Triton (interpreter on CPU) and torch backends against the plain-loop reference.

Legend: N tokens, k slots/token, E experts, D model width, F expert hidden width.
Forward output and the gradients of all four differentiable inputs (x, gates, w_in, w_out) are
checked with relative-RMS and max-abs bounds against a float64 reference; torch.empty is poisoned
with NaN so an unwritten output element fails the test.
"""

from __future__ import annotations

import pytest
import torch

from kernels import triton_runnable
from kernels.moe import expert_mlp
from tests.kernels.moe_helpers import assert_close, make_problem, poisoned_empty

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_runnable(DEVICE), reason="Triton cannot run here")
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (5e-3, 2e-2)}  # (relative RMS, max-abs / max|ref|)
NAMES = ("y", "dx", "dgates", "dw_in", "dw_out")

CASES = [  # (N, D, F, E, k, dtype, activation, pattern)
    (37, 48, 40, 5, 2, torch.float32, "swiglu", "drop"),
    (37, 48, 40, 5, 2, torch.float16, "swiglu", "drop"),
    (37, 48, 40, 5, 1, torch.float32, "gelu", "random"),
    (37, 48, 40, 5, 5, torch.float16, "gelu", "random"),  # k = E
    (37, 48, 40, 5, 5, torch.float32, "swiglu", "random"),  # k = E
    (33, 24, 20, 4, 2, torch.float32, "swiglu", "empty_expert"),
    (33, 24, 20, 4, 2, torch.float16, "gelu", "one_expert"),
    (23, 40, 24, 1, 1, torch.float32, "gelu", "random"),  # a single expert
    (20, 16, 16, 256, 4, torch.float32, "swiglu", "drop"),  # E = 256: most experts empty
]


def _run(backend, x, ids, gates, w_in, w_out, activation, dy, dtype=None):
    """Forward + backward; returns [y, dx, dgates, dw_in, dw_out] (inputs cast to `dtype` first)."""
    leaves = [t.detach().to(DEVICE, dtype or t.dtype).requires_grad_() for t in (x, gates, w_in, w_out)]
    xl, gl, wil, wol = leaves
    y = expert_mlp(xl, ids.to(DEVICE), gl, wil, wol, activation=activation, backend=backend)
    y.backward(dy.to(DEVICE, y.dtype))
    return [y.detach()] + [t.grad for t in leaves]


def _compare(backend, case, monkeypatch):
    N, D, F, E, k, dtype, act, pattern = case
    x, ids, gates, w_in, w_out = make_problem(N, D, F, E, k, dtype, act, pattern)
    dy = torch.randn(N, D, generator=torch.Generator().manual_seed(7))
    ref = _run("reference", x, ids, gates, w_in, w_out, act, dy, dtype=torch.float64)
    poisoned_empty(monkeypatch)
    out = _run(backend, x, ids, gates, w_in, w_out, act, dy)
    for name, o, r in zip(NAMES, out, ref):
        assert o.dtype == (gates.dtype if name == "dgates" else dtype), name
        assert_close(o.cpu(), r.cpu(), *TOL[dtype], name=f"{backend} {name}")


@needs_triton
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"N{c[0]}D{c[1]}F{c[2]}E{c[3]}k{c[4]}-{str(c[5])[6:]}-{c[6]}-{c[7]}"
)
def test_triton_matches_reference(case, monkeypatch):
    _compare("triton", case, monkeypatch)


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"N{c[0]}D{c[1]}F{c[2]}E{c[3]}k{c[4]}-{str(c[5])[6:]}-{c[6]}-{c[7]}"
)
def test_torch_backend_matches_reference(case, monkeypatch):
    _compare("torch", case, monkeypatch)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
def test_all_slots_dropped_gives_zeros(backend, monkeypatch):
    x, ids, gates, w_in, w_out = make_problem(9, 16, 8, 3, 2, torch.float32, "swiglu", "all_dropped")
    poisoned_empty(monkeypatch)
    out = _run(backend, x, ids, gates, w_in, w_out, "swiglu", torch.randn(9, 16))
    for name, o in zip(NAMES, out):
        assert torch.equal(o, torch.zeros_like(o)), name


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
def test_shared_weights_accumulate_gradients(backend):
    """Universal experts: one weight tensor used by two calls in one graph."""
    D, F, E = 24, 16, 4
    x1, ids1, g1, w_in, w_out = make_problem(13, D, F, E, 2, torch.float32, "swiglu", "drop", seed=1)
    x2, ids2, g2, _, _ = make_problem(11, D, F, E, 3, torch.float32, "swiglu", "random", seed=2)

    def grads(bk, dtype):
        w_i, w_o = (w.detach().to(DEVICE, dtype).requires_grad_() for w in (w_in, w_out))
        a = expert_mlp(x1.to(DEVICE, dtype), ids1.to(DEVICE), g1.to(DEVICE, dtype), w_i, w_o, backend=bk)
        b = expert_mlp(x2.to(DEVICE, dtype), ids2.to(DEVICE), g2.to(DEVICE, dtype), w_i, w_o, backend=bk)
        (a.pow(2).sum() + 3 * b.sum()).backward()
        return w_i.grad, w_o.grad

    for name, o, r in zip(("dw_in", "dw_out"), grads(backend, torch.float32), grads("reference", torch.float64)):
        assert_close(o.cpu(), r.cpu(), *TOL[torch.float32], name=name)


@needs_triton
def test_triton_is_deterministic():
    x, ids, gates, w_in, w_out = make_problem(37, 48, 40, 5, 2, torch.float32, "swiglu", "drop")
    dy = torch.randn(37, 48)
    a = _run("triton", x, ids, gates, w_in, w_out, "swiglu", dy)
    b = _run("triton", x, ids, gates, w_in, w_out, "swiglu", dy)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_auto_backend_and_int64_ids():
    x, ids, gates, w_in, w_out = make_problem(10, 16, 8, 3, 2, torch.float32, "gelu", "drop")
    y = expert_mlp(x, ids.long(), gates, w_in, w_out, activation="gelu")
    ref = expert_mlp(x, ids, gates, w_in, w_out, activation="gelu", backend="reference")
    assert_close(y, ref, 1e-5, 1e-4)


def test_no_tokens():
    x, ids, gates, w_in, w_out = make_problem(4, 16, 8, 3, 2, torch.float32)
    y = expert_mlp(x[:0], ids[:0], gates[:0], w_in, w_out)
    assert y.shape == (0, 16)
