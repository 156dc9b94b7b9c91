"""Fuzz: ``group_in_matmul`` / ``group_out_matmul`` on every backend against independent loops.

Legend: N tokens, A slots per token, G groups, b block width, K input width, M output width
(in-op: K = G·b; out-op: M = G·b).

Cases are generated from their index (seeded): odd sizes, N = 0, A = 1, A = G, duplicate groups,
groups no token selects, every slot on one group, -1 slots, all dropped, out-of-range ids, and
NaN injected in live places (a selected block of x or w, a live gate) or NaN/inf in dead ones (an
unselected block of x, a -1 slot's gate, w blocks of a group nobody selects, x of a token with
no live slot for the out-op). A case passes when the backend raises a clear ValueError/TypeError
 or matches the loop in NaN positions, signed infs and finite
values, for y and the gradients of x, gates and w. The docstrings promise that unselected blocks
contribute exactly nothing (in-op) and are exactly 0 (out-op), whatever they hold.

Cases: 320 per op on torch and reference (fp32/fp64); every 10th (32 per op, fp32/fp16) on
Triton under the interpreter.
"""

from __future__ import annotations

import random

import pytest
import torch

from kernels import triton_runnable
from kernels.mohd import group_in_matmul, group_out_matmul
from tests.kernels.test_moe_fuzz import BAD, mismatch

N_CASES, TRITON_EVERY = 320, 10
OPS = {"in": group_in_matmul, "out": group_out_matmul}
needs_triton = pytest.mark.skipif(not triton_runnable("cpu"), reason="needs TRITON_INTERPRET=1 on CPU")


def loop_in(x, ids, gates, w, G):
    """y[n] += gates[n, j] · x[n, blk(e)] @ w[blk(e), :] for every live slot (n, j) on group e."""
    b = x.shape[1] // G
    y = x.new_zeros(x.shape[0], w.shape[1])
    for e in range(G):
        for j in range(ids.shape[1]):
            rows = (ids[:, j] == e).nonzero(as_tuple=True)[0]
            if rows.numel():
                y = y.index_add(0, rows, gates[rows, j, None] * (x[rows, e * b : (e + 1) * b] @ w[e * b : (e + 1) * b]))
    return y


def loop_out(x, ids, gates, w, G):
    """y[n, blk(e)] += gates[n, j] · x[n] @ w[:, blk(e)]; blocks no slot selects stay 0."""
    b = w.shape[1] // G
    blocks = []
    for e in range(G):
        blk = x.new_zeros(x.shape[0], b)
        for j in range(ids.shape[1]):
            rows = (ids[:, j] == e).nonzero(as_tuple=True)[0]
            if rows.numel():
                blk = blk.index_add(0, rows, gates[rows, j, None] * (x[rows] @ w[:, e * b : (e + 1) * b]))
        blocks.append(blk)
    return torch.cat(blocks, dim=1)


LOOPS = {"in": loop_in, "out": loop_out}


def case(i, op, triton=False):
    rng = random.Random(20_000 + i + (0 if op == "in" else 7919))
    g = torch.Generator().manual_seed(30_000 + i)
    N = rng.choice([0, 1, 2, 3, 5, 7, 9, 13] + ([] if triton else [17, 23]))
    G, b = rng.choice([1, 2, 3, 4, 5, 7, 8]), rng.choice([1, 2, 3, 5, 8])
    other = rng.choice([1, 2, 3, 5, 7, 12, 16])
    A = rng.choice([1, G, rng.randint(1, G)])
    pattern = rng.choice(
        ["topk"] * 3 + ["dup", "one_group", "drop", "drop", "all_drop", "few_groups", "bad_high", "bad_low"]
    )
    ids = (
        torch.stack([torch.randperm(G, generator=g)[:A] for _ in range(N)])
        if N
        else torch.zeros(0, A, dtype=torch.long)
    )
    if pattern == "dup":
        ids = torch.randint(0, G, (N, A), generator=g)
    elif pattern == "one_group":
        ids[:] = rng.randrange(G)
    elif pattern == "drop":
        ids[torch.rand(N, A, generator=g) < 0.35] = -1
    elif pattern == "all_drop":
        ids[:] = -1
    elif pattern == "few_groups":
        keep = torch.randperm(G, generator=g)[: max(1, G // 3)]
        ids = keep[torch.randint(0, keep.numel(), (N, A), generator=g)]
    elif pattern in ("bad_high", "bad_low") and N:
        ids[rng.randrange(N), rng.randrange(A)] = (
            G + rng.choice([0, 1, 9]) if pattern == "bad_high" else rng.choice([-2, -9])
        )
    K, M = (G * b, other) if op == "in" else (other, G * b)
    x = torch.randn(N, K, generator=g, dtype=torch.float64)
    w = torch.randn(K, M, generator=g, dtype=torch.float64) / K**0.5
    gates = torch.rand(N, A, generator=g, dtype=torch.float64) + 0.1
    inject = (
        rng.choice(["none"] * 4 + ["x_live", "x_dead", "gate_live", "gate_dead", "w_live", "w_dead"]) if N else "none"
    )
    bad = float("nan") if inject.endswith("_live") else rng.choice(BAD)  # why: see test_moe_fuzz
    live = ((ids >= 0) & (ids < G)).nonzero()
    if len(live):
        n, j = (int(v) for v in live[rng.randrange(len(live))])
        e = int(ids[n, j])
    if inject == "x_live" and len(live):
        x[n, (e * b if op == "in" else 0) + rng.randrange(b if op == "in" else K)] = bad
    elif inject == "x_dead":
        n = rng.randrange(N)
        if op == "in":  # a block of x[n] that token n does not select
            free = [e for e in range(G) if e not in ids[n].tolist()]
            if not free:
                ids[n, 0], free = -1, [int(ids[n, 0])]
                free = [e for e in range(G) if e not in ids[n].tolist()]
            x[n, free[0] * b + rng.randrange(b)] = bad
        else:  # the out-op reads all of x[n]: only a token without live slots may hold garbage
            ids[n] = -1
            x[n, rng.randrange(K)] = bad
    elif inject == "gate_live" and len(live):
        gates[n, j] = bad
    elif inject == "gate_dead":
        n, j = rng.randrange(N), rng.randrange(A)
        ids[n, j] = -1
        gates[n, j] = bad
    elif inject == "w_live" and len(live):
        if op == "in":
            w[e * b + rng.randrange(b), rng.randrange(M)] = bad
        else:
            w[rng.randrange(K), e * b + rng.randrange(b)] = bad
    elif inject == "w_dead":
        e = rng.randrange(G)
        ids[ids == e] = -1
        if op == "in":
            w[e * b + rng.randrange(b), rng.randrange(M)] = bad
        else:
            w[rng.randrange(K), e * b + rng.randrange(b)] = bad
    dtype = rng.choice([torch.float32, torch.float16]) if triton else rng.choice([torch.float32, torch.float64])
    dy = torch.randn(N, M, generator=g, dtype=torch.float64)
    return {
        "i": i,
        "op": op,
        "N": N,
        "G": G,
        "b": b,
        "K": K,
        "M": M,
        "A": A,
        "pattern": pattern,
        "inject": inject,
        "bad": bad,
        "dtype": dtype,
        "ids": ids.to(rng.choice([torch.int32, torch.int64])),
        "x": x,
        "gates": gates,
        "w": w,
        "dy": dy,
    }


def _fwd_bwd(fn, c, dtype):
    leaves = [c[n].to(dtype).requires_grad_() for n in ("x", "gates", "w")]
    y = fn(leaves[0], c["ids"], leaves[1], leaves[2], c["G"])
    grads = torch.autograd.grad(y, leaves, c["dy"].to(y.dtype), allow_unused=True) if y.requires_grad else [None] * 3
    return [y] + [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves)]


def check(c, backend) -> str | None:
    bad_ids = bool(((c["ids"] < -1) | (c["ids"] >= c["G"])).any())
    op = OPS[c["op"]]
    try:
        out = _fwd_bwd(lambda *a: op(*a, backend=backend), c, c["dtype"])
    except (ValueError, TypeError) as exc:
        return None if bad_ids else f"raised {type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - anything else is an unclear error
        return f"unclear {type(exc).__name__}: {exc}"
    # accepted out-of-range ids must act exactly like -1
    ids = c["ids"]
    ref = _fwd_bwd(LOOPS[c["op"]], dict(c, ids=torch.where((ids < -1) | (ids >= c["G"]), -1, ids)), torch.float64)
    for name, o, r in zip(("y", "dx", "dgates", "dw"), out, ref):
        if o.dtype != c["dtype"]:
            return f"{name} dtype {o.dtype}, expected {c['dtype']}"
        why = mismatch(o, r, c["dtype"])
        if why:
            return f"{name}: {why}"
    return None


def describe(c) -> str:
    head = ", ".join(
        f"{n}={c[n]}" for n in ("i", "op", "N", "G", "b", "K", "M", "A", "pattern", "inject", "bad", "dtype")
    )
    return f"[{head}] ids={c['ids'].tolist()} (inputs: case({c['i']}, {c['op']!r}) in tests/kernels/test_mohd_fuzz.py)"


def _failures(op, backend, indices, triton=False):
    out = []
    for i in indices:
        c = case(i, op, triton)
        why = check(c, backend)
        if why:
            out.append(f"{backend} {describe(c)}: {why}")
    return out


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("op", ["in", "out"])
def test_mohd_fuzz(op, backend, one_thread):
    failures = _failures(op, backend, range(N_CASES))
    assert not failures, f"{len(failures)} of {N_CASES} cases wrong:\n" + "\n".join(failures)


@needs_triton
@pytest.mark.parametrize("op", ["in", "out"])
def test_mohd_fuzz_triton(op, one_thread):
    idx = range(0, N_CASES, TRITON_EVERY)
    failures = _failures(op, "triton", idx, triton=True)
    assert not failures, f"{len(failures)} of {len(idx)} cases wrong:\n" + "\n".join(failures)


def test_generator_covers_the_edge_cases():
    for op in OPS:
        cs = [case(i, op) for i in range(N_CASES)]
        assert sum(c["N"] == 0 for c in cs) >= 10 and sum(c["A"] == c["G"] for c in cs) >= 50
        for inj in ("x_live", "x_dead", "gate_live", "gate_dead", "w_live", "w_dead"):
            assert sum(c["inject"] == inj for c in cs) >= 10, (op, inj)
        for p in ("dup", "one_group", "drop", "all_drop", "few_groups", "bad_high", "bad_low"):
            assert sum(c["pattern"] == p for c in cs) >= 10, (op, p)
