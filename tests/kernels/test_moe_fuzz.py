"""Fuzz: ``expert_mlp`` and ``route`` on every backend against independent plain-torch loops.

Legend: N tokens, k slots/token, E experts, D model width, F expert hidden width, M = N·k slots.

Each case is generated from its index (seeded): small random shapes with odd sizes, N = 0, k = 1,
k = E, duplicate ids, experts with no tokens, every slot on one expert, -1 slots, all slots
dropped, ids out of range, and NaN/inf injected in live places (x of a routed token, a live
slot's gate, a used expert's weights) or dead ones (x of a token whose slots are all -1, the gate
of a -1 slot, the weights of an expert with no tokens). A case passes when the backend either
raises a clear ValueError/TypeError or matches the loop: same
NaN positions, same signed infs, finite values within tolerance, for the output and the gradients
of x, gates, w_in and w_out. Anything else is a silent wrong result; all of them are reported at
once with the exact input.

Cases: expert_mlp 320 per torch/reference backend (fp32/fp64), every 10th (32, fp32/fp16, tiny
shapes) on Triton under the interpreter; route 320 on torch, and on Triton every 6th case with at
most ROUTE_TRITON_MAX_M slots and valid ids, plus 8 out-of-range cases in forked children so that
a crash (an out-of-bounds store segfaulted the interpreter before the routing fix) is reported as
a failure instead of killing the test run.
"""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys

import pytest
import torch

from kernels import triton_runnable
from kernels.moe import expert_mlp, route

N_CASES = 320
TRITON_EVERY, ROUTE_TRITON_EVERY = 10, 6
needs_triton = pytest.mark.skipif(not triton_runnable("cpu"), reason="needs TRITON_INTERPRET=1 on CPU")
TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (1e-5, 1e-4), torch.float16: (5e-3, 2e-2)}
BAD = (float("nan"), float("inf"), -float("inf"))


# ----------------------------------------------------------------------------- independent loops
def loop_expert_mlp(x, ids, gates, w_in, w_out, act):
    """Per (expert, slot column): gather the tokens routed there, run the expert, add gate · out."""
    k = ids.shape[1]
    E, F = w_in.shape[0], w_out.shape[1]
    y = torch.zeros_like(x)
    for e in range(E):
        for j in range(k):
            rows = (ids[:, j] == e).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            h = x[rows] @ w_in[e]
            if act == "swiglu":
                a = h[:, :F] * torch.sigmoid(h[:, :F]) * h[:, F:]
            else:
                a = 0.5 * h * (1 + torch.erf(h / math.sqrt(2.0)))
            y = y.index_add(0, rows, gates[rows, j, None] * (a @ w_out[e]))
    return y


def loop_route(ids_flat, E):
    """Stable sort by expert, dropped (-1) slots last; counts and exclusive offsets."""
    ids = [int(v) for v in ids_flat]
    order = [m for e in range(E) for m in range(len(ids)) if ids[m] == e] + [m for m in range(len(ids)) if ids[m] == -1]
    counts = [sum(1 for v in ids if v == e) for e in range(E)]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    return order, counts, offsets


# ----------------------------------------------------------------------------- case generation
def _ids(rng, g, N, E, k):
    """(ids int64, pattern)."""
    pattern = rng.choice(
        ["topk"] * 3 + ["dup", "one_expert", "drop", "drop", "all_drop", "few_experts", "bad_high", "bad_low"]
    )
    ids = (
        torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
        if N
        else torch.zeros(0, k, dtype=torch.long)
    )
    if pattern == "dup":
        ids = torch.randint(0, E, (N, k), generator=g)
    elif pattern == "one_expert":
        ids[:] = rng.randrange(E)
    elif pattern == "drop":
        ids[torch.rand(N, k, generator=g) < 0.35] = -1
    elif pattern == "all_drop":
        ids[:] = -1
    elif pattern == "few_experts":
        keep = torch.randperm(E, generator=g)[: max(1, E // 3)]
        ids = keep[torch.randint(0, keep.numel(), (N, k), generator=g)]
    elif pattern in ("bad_high", "bad_low") and N:
        bad = E + rng.choice([0, 1, 5, 2**20]) if pattern == "bad_high" else rng.choice([-2, -5, -(2**20)])
        ids[rng.randrange(N), rng.randrange(k)] = bad
    return ids, pattern


def mlp_case(i, triton=False):
    rng = random.Random(1000 + i)
    g = torch.Generator().manual_seed(i)
    sizes = [1, 2, 3, 5, 8, 12] if triton else [1, 2, 3, 5, 7, 8, 12, 16, 17]
    N = rng.choice([0, 1, 2, 3, 5, 7, 9, 13] if triton else [0, 1, 2, 3, 5, 7, 9, 13, 17, 23])
    D, F = rng.choice(sizes), rng.choice(sizes)
    E = rng.choice([1, 2, 3, 4, 5, 7, 8])
    k = rng.choice([1, E, rng.randint(1, E)])
    act = rng.choice(["swiglu", "gelu"])
    ids, pattern = _ids(rng, g, N, E, k)
    H = 2 * F if act == "swiglu" else F
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    gates = torch.rand(N, k, generator=g, dtype=torch.float64)
    w_in = torch.randn(E, D, H, generator=g, dtype=torch.float64) / D**0.5
    w_out = torch.randn(E, F, D, generator=g, dtype=torch.float64) / F**0.5
    inject = (
        rng.choice(["none"] * 4 + ["x_live", "x_dead", "gate_live", "gate_dead", "w_live", "w_dead"]) if N else "none"
    )
    # live places get NaN, which every formula propagates; an inf in a live place has no single
    # right answer (gelu(-inf) is 0 as a limit but NaN as 0.5·x·(1 + erf(x/√2))), dead ones get any
    bad = float("nan") if inject.endswith("_live") else rng.choice(BAD)
    live = (ids >= 0).nonzero()
    if inject == "x_live" and len(live):
        x[live[0, 0], rng.randrange(D)] = bad
    elif inject == "x_dead":
        n = rng.randrange(N)
        ids[n] = -1
        x[n, rng.randrange(D)] = bad
    elif inject == "gate_live" and len(live):
        gates[tuple(live[rng.randrange(len(live))])] = bad
    elif inject == "gate_dead":
        n, j = rng.randrange(N), rng.randrange(k)
        ids[n, j] = -1
        gates[n, j] = bad
    elif inject == "w_live" and len(live):
        e = int(ids[tuple(live[0])])
        (w_in[e] if rng.random() < 0.5 else w_out[e]).view(-1)[0] = bad
    elif inject == "w_dead":
        e = rng.randrange(E)
        ids[ids == e] = -1
        (w_in[e] if rng.random() < 0.5 else w_out[e]).view(-1)[rng.randrange(D)] = bad
    dtype = rng.choice([torch.float32, torch.float16]) if triton else rng.choice([torch.float32, torch.float64])
    ids = ids.to(rng.choice([torch.int32, torch.int64]))
    dy = torch.randn(N, D, generator=g, dtype=torch.float64)
    return {
        "i": i,
        "N": N,
        "D": D,
        "F": F,
        "E": E,
        "k": k,
        "act": act,
        "pattern": pattern,
        "inject": inject,
        "bad": bad,
        "dtype": dtype,
        "ids": ids,
        "x": x,
        "gates": gates,
        "w_in": w_in,
        "w_out": w_out,
        "dy": dy,
    }


def describe(c) -> str:
    head = ", ".join(f"{n}={c[n]}" for n in ("i", "N", "D", "F", "E", "k", "act", "pattern", "inject", "bad", "dtype"))
    return f"[{head}] ids={c['ids'].tolist()} (inputs: mlp_case({c['i']}) in tests/kernels/test_moe_fuzz.py)"


# ----------------------------------------------------------------------------- comparison
def mismatch(out, ref, dtype) -> str | None:
    """None when `out` matches `ref`: NaN positions, signed infs, finite values within tolerance."""
    if out.shape != ref.shape:
        return f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.equal(out.isnan(), ref.isnan()):
        return f"NaN at {out.isnan().nonzero().tolist()[:6]}, expected at {ref.isnan().nonzero().tolist()[:6]}"
    inf = ref.isinf()
    if not torch.equal(out.isinf(), inf) or not torch.equal(out[inf], ref[inf]):
        return f"inf at {out.isinf().nonzero().tolist()[:6]}, expected at {inf.nonzero().tolist()[:6]}"
    fin = ref.isfinite()
    if fin.any():
        o, r = out[fin], ref[fin]
        rms = ((o - r).pow(2).mean().sqrt() / r.pow(2).mean().sqrt().clamp_min(1e-30)).item()
        mx = (o - r).abs().max().item() / (r.abs().max().item() or 1.0)
        rtol, atol = TOL[dtype]
        if (rms > rtol and fin.sum() >= 16) or mx > atol:  # few elements: rel-RMS is one cancellation
            return f"rel-RMS {rms:.2e} (tol {rtol:.0e}), max-abs/scale {mx:.2e} (tol {atol:.0e})"
    return None


def _fwd_bwd(fn, c, dtype):
    leaves = [c[n].to(dtype).requires_grad_() for n in ("x", "gates", "w_in", "w_out")]
    y = fn(leaves[0], c["ids"], leaves[1], leaves[2], leaves[3], c["act"])
    grads = torch.autograd.grad(y, leaves, c["dy"].to(y.dtype), allow_unused=True) if y.requires_grad else [None] * 4
    return [y] + [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves)]


def check_mlp_case(c, backend) -> str | None:
    """None when the backend is right for this case; otherwise what went wrong."""
    E = c["E"]
    bad_ids = bool(((c["ids"] < -1) | (c["ids"] >= E)).any())
    try:
        out = _fwd_bwd(lambda *a: expert_mlp(*a[:5], activation=a[5], backend=backend), c, c["dtype"])
    except (ValueError, TypeError) as exc:
        return None if bad_ids else f"raised {type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - any other exception is an unclear error
        return f"unclear {type(exc).__name__}: {exc}"
    # accepted out-of-range ids must act exactly like -1 (the op drops them without a host sync)
    ref = _fwd_bwd(
        loop_expert_mlp, dict(c, ids=torch.where((c["ids"] < -1) | (c["ids"] >= E), -1, c["ids"])), torch.float64
    )
    for name, o, r in zip(("y", "dx", "dgates", "dw_in", "dw_out"), out, ref):
        if o.dtype != (c["dtype"]):
            return f"{name} dtype {o.dtype}, expected {c['dtype']}"
        bad = mismatch(o, r, c["dtype"])
        if bad:
            return f"{name}: {bad}"
    return None


def _run_mlp(backend, indices, triton=False):
    failures = []
    for i in indices:
        c = mlp_case(i, triton)
        why = check_mlp_case(c, backend)
        if why:
            failures.append(f"{backend} {describe(c)}: {why}")
    return failures


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_expert_mlp_fuzz(backend, one_thread):
    failures = _run_mlp(backend, range(N_CASES))
    assert not failures, f"{len(failures)} of {N_CASES} cases wrong:\n" + "\n".join(failures)


@needs_triton
def test_expert_mlp_fuzz_triton(one_thread):
    idx = range(0, N_CASES, TRITON_EVERY)
    failures = _run_mlp("triton", idx, triton=True)
    assert not failures, f"{len(failures)} of {len(idx)} cases wrong:\n" + "\n".join(failures)


def test_generator_covers_the_edge_cases():
    cases = [mlp_case(i) for i in range(N_CASES)]
    assert sum(c["N"] == 0 for c in cases) >= 10 and sum(c["k"] == c["E"] for c in cases) >= 50
    assert sum(c["k"] == 1 for c in cases) >= 50 and sum(c["D"] % 2 == 1 for c in cases) >= 50
    for p in ("dup", "one_expert", "drop", "all_drop", "few_experts", "bad_high", "bad_low"):
        assert sum(c["pattern"] == p for c in cases) >= 10, p
    for inj in ("x_live", "x_dead", "gate_live", "gate_dead", "w_live", "w_dead"):
        assert sum(c["inject"] == inj for c in cases) >= 10, inj


# ----------------------------------------------------------------------------- route
ROUTE_TRITON_MAX_M = 520  # the interpreter's in-block sort costs ~0.1 s per 128 slots


def route_case(i):
    rng = random.Random(5000 + i)
    g = torch.Generator().manual_seed(10_000 + i)
    E = rng.choice([1, 2, 3, 4, 5, 7, 8, 15, 16, 31, 40])
    k = rng.choice([1, E, rng.randint(1, E)])
    N = rng.choice([0, 1, 2, 3, 7, 13, 31, 64, 65, 127, 300])
    ids, pattern = _ids(rng, g, N, E, k)
    return {"i": i, "N": N, "E": E, "k": k, "pattern": pattern, "ids": ids.to(rng.choice([torch.int32, torch.int64]))}


def check_route_case(c, backend) -> str | None:
    ids, E = c["ids"], c["E"]
    bad = (ids < -1) | (ids >= E)
    try:
        r = route(ids, E, backend=backend)
    except (ValueError, TypeError) as exc:
        return None if bad.any() else f"raised {type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001
        return f"unclear {type(exc).__name__}: {exc}"
    # an out-of-range id may only be refused or treated exactly like -1 (dropped, sorted last)
    order, counts, offsets = loop_route(torch.where(bad, -1, ids).reshape(-1), E)
    got = (r.sorted_slot_M, r.counts_E, r.offsets_E1)
    for name, t, want in zip(("sorted_slot_M", "counts_E", "offsets_E1"), got, (order, counts, offsets)):
        if t.dtype != torch.int32 or t.tolist() != want:
            return f"{name} {t.dtype} {t.tolist()[:40]} != {want[:40]}"
    return None


def _route_failures(backend, indices):
    failures = []
    for i in indices:
        c = route_case(i)
        why = check_route_case(c, backend)
        if why:
            failures.append(
                f"route {backend} [i={i}, N={c['N']}, E={c['E']}, k={c['k']}, pattern={c['pattern']}] "
                f"ids={c['ids'].tolist()}: {why}"
            )
    return failures


def _has_bad_ids(c):
    return bool(((c["ids"] < -1) | (c["ids"] >= c["E"])).any())


def _small(i):
    return route_case(i)["ids"].numel() <= ROUTE_TRITON_MAX_M


def test_route_fuzz_torch():
    failures = _route_failures("torch", range(N_CASES))
    assert not failures, f"{len(failures)} of {N_CASES} cases wrong:\n" + "\n".join(failures)


@needs_triton
def test_route_fuzz_triton():
    idx = [i for i in range(0, N_CASES, ROUTE_TRITON_EVERY) if not _has_bad_ids(route_case(i)) and _small(i)]
    failures = _route_failures("triton", idx)
    assert not failures, f"{len(failures)} of {len(idx)} cases wrong:\n" + "\n".join(failures)


_CHILD = """
import os, sys
import torch
torch.set_num_threads(1)
from tests.kernels.test_moe_fuzz import check_route_case, route_case
for i in map(int, sys.argv[1:]):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: one case, its verdict through the pipe
        os.close(r)
        why = check_route_case(route_case(i), "triton")
        os.write(w, (why or "ok").encode()[:4000])
        os._exit(0)
    os.close(w)
    msg = os.read(r, 4096).decode()
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        msg = f"crashed with signal {os.WTERMSIG(status)}"
    print(f"{i}\\t{msg}", flush=True)
"""


@needs_triton
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_route_triton_out_of_range_ids_never_crash():
    """Out-of-range ids on the Triton path: refused or dropped, never an out-of-bounds write."""
    bad = [i for i in range(N_CASES) if _has_bad_ids(route_case(i)) and _small(i)]
    # ids past the routing histogram (>= next_pow2(E + 1)) are the ones that wrote out of bounds
    huge = [i for i in bad if int(route_case(i)["ids"].max()) >= 2 * (route_case(i)["E"] + 1)]
    idx = sorted(set(huge[:4] + [i for i in bad if i not in huge][:4]))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, *map(str, idx)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    verdicts = dict(line.split("\t", 1) for line in proc.stdout.splitlines() if "\t" in line)
    failures = [
        f"route triton i={i} ids={route_case(i)['ids'].tolist()} E={route_case(i)['E']}: {verdicts.get(str(i))}"
        for i in idx
        if verdicts.get(str(i)) != "ok"
    ]
    assert not failures, f"{len(failures)} of {len(idx)} cases wrong:\n" + "\n".join(failures)
