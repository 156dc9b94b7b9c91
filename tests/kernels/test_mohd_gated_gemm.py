"""group_in_matmul / group_out_matmul: Triton (interpreter on CPU) and torch against the loop reference.

Legend: N tokens, A slots per token, G groups, K input width, M output width.
Forward output and the gradients of x, gates and w are checked with relative-RMS and max-abs
bounds against a float64 reference; torch.empty is poisoned with NaN so an unwritten output
element fails the test.
"""

from __future__ import annotations

import pytest
import torch

from kernels import triton_runnable
from kernels.mohd import group_in_matmul, group_out_matmul
from tests.kernels.moe_helpers import assert_close, poisoned_empty

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_runnable(DEVICE), reason="Triton cannot run here")
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (5e-3, 2e-2)}
OPS = {"in": group_in_matmul, "out": group_out_matmul}

CASES = [  # (N, G, b, other width, A, dtype, pattern)
    (37, 5, 7, 19, 2, torch.float32, "drop"),
    (37, 5, 7, 19, 2, torch.float16, "random"),
    (21, 4, 12, 24, 4, torch.float32, "random"),  # A = G: dense
    (21, 4, 12, 24, 1, torch.float16, "drop"),  # A = 1
    (33, 6, 5, 9, 2, torch.float32, "one_group"),  # every token on the last group: others never run
    (18, 3, 20, 17, 3, torch.float32, "runs"),  # consecutive tokens share groups: tile skipping
    (12, 1, 9, 11, 1, torch.float32, "random"),  # a single group
]


def make(N, G, b, other, A, dtype, pattern, op, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(G, generator=g)[:A] for _ in range(N)])
    if pattern == "drop":
        ids[torch.rand(N, A, generator=g) < 0.3] = -1
    elif pattern == "one_group":
        ids[:, 0], ids[:, 1:] = G - 1, -1
    elif pattern == "runs":  # blocks of 8 tokens with the same active groups
        ids = ids[torch.arange(N) // 8 * 8]
    elif pattern == "all_dropped":
        ids[:] = -1
    K, M = (G * b, other) if op == "in" else (other, G * b)
    x = torch.randn(N, K, generator=g)
    w = torch.randn(K, M, generator=g) / K**0.5
    gates = torch.rand(N, A, generator=g) + 0.1
    return x.to(dtype), ids.to(torch.int32), gates, w.to(dtype)


def run(op, backend, x, ids, gates, w, G, dy, dtype=None, transpose_w=False):
    leaves = [t.detach().to(DEVICE, dtype or t.dtype).requires_grad_() for t in (x, gates, w)]
    xl, gl, wl = leaves
    w_use = wl.T.contiguous().T if transpose_w else wl  # same values, column-major strides
    y = OPS[op](xl, ids.to(DEVICE), gl, w_use, G, backend=backend)
    y.backward(dy.to(DEVICE, y.dtype))
    return [y.detach()] + [t.grad for t in leaves]


def compare(op, backend, case, monkeypatch, transpose_w=False):
    N, G, b, other, A, dtype, pattern = case
    x, ids, gates, w = make(*case, op)
    M = w.shape[1]
    dy = torch.randn(N, M, generator=torch.Generator().manual_seed(7))
    ref = run(op, "reference", x, ids, gates, w, G, dy, dtype=torch.float64)
    poisoned_empty(monkeypatch)
    out = run(op, backend, x, ids, gates, w, G, dy, transpose_w=transpose_w)
    for name, o, r in zip(("y", "dx", "dgates", "dw"), out, ref):
        assert o.dtype == (gates.dtype if name == "dgates" else dtype), name
        assert_close(o.cpu(), r.cpu(), *TOL[dtype], name=f"{op} {backend} {name}")


def case_id(c):
    return f"N{c[0]}G{c[1]}b{c[2]}o{c[3]}A{c[4]}-{str(c[5])[6:]}-{c[6]}"


@needs_triton
@pytest.mark.parametrize("op", ["in", "out"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_matches_reference_with_gradients(op, case, monkeypatch):
    compare(op, "triton", case, monkeypatch)


@pytest.mark.parametrize("op", ["in", "out"])
@pytest.mark.parametrize("case", CASES[:3], ids=case_id)
def test_torch_backend_matches_reference(op, case, monkeypatch):
    compare(op, "torch", case, monkeypatch)


@needs_triton
@pytest.mark.parametrize("op", ["in", "out"])
def test_triton_accepts_strided_weights(op, monkeypatch):
    compare(op, "triton", CASES[0], monkeypatch, transpose_w=True)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
@pytest.mark.parametrize("op", ["in", "out"])
def test_all_slots_dropped_gives_zeros(op, backend, monkeypatch):
    x, ids, gates, w = make(9, 3, 4, 5, 2, torch.float32, "all_dropped", op)
    poisoned_empty(monkeypatch)
    out = run(op, backend, x, ids, gates, w, 3, torch.randn(9, w.shape[1]))
    for name, o in zip(("y", "dx", "dgates", "dw"), out):
        assert torch.equal(o, torch.zeros_like(o)), name


def test_out_op_leaves_unselected_blocks_exactly_zero():
    x, ids, gates, w = make(10, 4, 3, 8, 2, torch.float32, "random", "out")
    y = group_out_matmul(x, ids, gates, w, 4, backend="torch").view(10, 4, 3)
    selected = torch.zeros(10, 4, dtype=torch.bool).scatter_(1, ids.long(), True)
    assert (y[~selected] == 0).all() and (y[selected] != 0).all()


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(n_groups=3), ValueError, "K=35 must be divisible by n_groups=3"),
        (
            dict(ids=torch.full((37, 2), 5, dtype=torch.int32)),
            ValueError,
            r"values must be in \[0, n_groups=5\) or -1, found 5",
        ),
        (dict(ids=torch.zeros(37, 2)), TypeError, "ids dtype must be int32 or int64"),
        (dict(w=torch.randn(35, 19, dtype=torch.float64)), TypeError, "must match x.dtype"),
        (dict(w=torch.randn(34, 19)), ValueError, "must be 2-D"),
        (dict(gates=torch.rand(37, 3)), ValueError, "must equal ids shape"),
        (dict(backend="cuda"), ValueError, "backend='cuda' is not one of"),
    ],
)
def test_invalid_inputs_raise_clear_errors(change, exc, match, monkeypatch):
    monkeypatch.setenv("SPARSE_ARCH_DEBUG_CHECKS", "1")  # the id range check is a debug check (host sync)
    x, ids, gates, w = make(*CASES[0], "in")
    args = {**dict(x=x, ids=ids, gates=gates, w=w, n_groups=5, backend="torch"), **change}
    with pytest.raises(exc, match=match):
        group_in_matmul(**args)
    with pytest.raises(ValueError, match="must be contiguous"):
        group_in_matmul(x.T.contiguous().T, ids, gates, w, 5)
