"""Fuzz kernels.attention against an independent plain loop: 0 silent wrong results.

Legend: B batch, T queries, S keys, H query heads, Hk key heads, Hv value heads, d / dv head dims.

360 generated cases (seeded): random tiny shapes with odd sizes (every tenth one longer than
one 16-row tile, so the mask-free loops run), default GQA / decoupled /
shared maps (tensors and Python lists), causal or not, default or random (unsorted)
q_positions, random scales, NaN / ±inf injected in q, k or v at random places and at causal
future (masked) keys, and about one case in seven a malformed input (non-positive or non-finite
scale, out-of-range maps or positions, a zero dimension, meta tensors). Every case runs on
"sdpa" and "reference"; Triton runs under the interpreter on the 240 cases with idx % 3 != 2
(fp32, fp16 on every fourth case; bf16 Triton only on a GPU, where the interpreter's bf16 is
not in play). Each either matches the loop's answer (out and lse; gradients too on finite
cases: all of them for sdpa / reference, idx % 6 == 0 for Triton) or raises a clear
ValueError / TypeError: anything else is a silent wrong result and fails.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from kernels.attention import attention

N_CASES = 360
TOL = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}  # max abs error / max(1, max |oracle|)


def oracle(q, k, v, k_head, v_head, pos, causal, scale):
    """fp64 softmax attention per (batch, head) over an explicitly built visibility table. A row
    whose query or any visible key / value holds a non-finite value is all NaN (the documented
    contract); other rows use only what they see. Written without any of the library's code;
    differentiable when the inputs are finite."""
    B, T, H, _ = q.shape
    S = k.shape[1]
    out = torch.zeros(B, T, H, v.shape[3], dtype=torch.float64)
    lse = torch.zeros(B, H, T, dtype=torch.float64)
    for b in range(B):
        seen = torch.zeros(T, S, dtype=torch.bool)
        for i in range(T):
            seen[i, : (min(int(pos[b][i]), S - 1) + 1 if causal else S)] = True
        for h in range(H):
            qh, kh, vh = q[b, :, h].double(), k[b, :, k_head[h]].double(), v[b, :, v_head[h]].double()
            key_ok = torch.isfinite(kh).all(-1) & torch.isfinite(vh).all(-1)
            bad = ~torch.isfinite(qh).all(-1) | (seen & ~key_ok[None, :]).any(-1)
            kh = torch.where(key_ok[:, None], kh, torch.zeros_like(kh))
            vh = torch.where(key_ok[:, None], vh, torch.zeros_like(vh))
            qh = torch.where(bad[:, None], torch.zeros_like(qh), qh)
            scores = (scale * qh @ kh.T).masked_fill(~seen, -math.inf)
            row_lse = torch.logsumexp(scores, -1)
            o = torch.exp(scores - row_lse[:, None]) @ vh
            out = out.index_put(
                (torch.tensor(b), torch.arange(T), torch.tensor(h)),
                torch.where(bad[:, None], torch.full_like(o, math.nan), o),
            )
            lse = lse.index_put(
                (torch.tensor(b), torch.tensor(h), torch.arange(T)),
                torch.where(bad, torch.full_like(row_lse, math.nan), row_lse),
            )
    return out, lse


def make_case(idx: int):
    """One case: (inputs dict for attention, expected error type or None, dtype, whether finite)."""
    rng = random.Random(1000 + idx)
    g = torch.Generator().manual_seed(idx)
    dtype = torch.float16 if idx % 4 == 3 else torch.float32
    B = rng.choice([1, 1, 2])
    H = rng.choice([1, 2, 3, 4, 6])
    map_kind = rng.choice(["gqa", "gqa", "decoupled", "shared", "list"])
    if map_kind == "gqa":
        Hk = rng.choice([x for x in range(1, H + 1) if H % x == 0])
        Hv, k_head, v_head = Hk, None, None
    else:
        Hk, Hv = rng.randint(1, 3), rng.randint(1, 3)
        k_head = [rng.randrange(Hk) for _ in range(H)]
        v_head = [rng.randrange(Hv) for _ in range(H)]
        if map_kind == "shared":
            Hv = Hk
            k_head = v_head = torch.tensor(k_head)
        elif map_kind == "decoupled":
            k_head, v_head = torch.tensor(k_head), torch.tensor(v_head)
    d, dv = rng.choice([1, 3, 8, 13, 16, 24]), rng.choice([2, 5, 8, 16, 19])
    causal = rng.random() < 0.7
    explicit_pos = rng.random() < 0.35
    # every tenth case spans several 16-row interpreter tiles, so mask-free main loops run too
    T = rng.randint(17, 30) if idx % 10 == 0 else rng.randint(1, 9)
    S = rng.randint(T if (causal and not explicit_pos) else 1, T + 12)
    q = torch.randn(B, T, H, d, generator=g).to(dtype)
    k = torch.randn(B, S, Hk, d, generator=g).to(dtype)
    v = torch.randn(B, S, Hv, dv, generator=g).to(dtype)
    pos = torch.randint(0, S, (B, T), generator=g) if explicit_pos else None
    scale = None if rng.random() < 0.5 else rng.uniform(0.05, 2.0)
    # non-finite injections: random places, and keys in the causal future of some rows
    for _ in range(rng.choice([0, 0, 1, 2])):
        value = rng.choice([math.nan, math.inf, -math.inf])
        target = rng.choice(["q", "k", "v", "future", "future"])
        if target == "q":
            q[rng.randrange(B), rng.randrange(T), rng.randrange(H), rng.randrange(d)] = value
        else:
            x = rng.choice([k, v]) if target == "future" else (k if target == "k" else v)
            j = rng.randrange(S) if target != "future" else rng.randint(max(0, S - T // 2 - 1), S - 1)
            x[rng.randrange(B), j, rng.randrange(x.shape[2]), rng.randrange(x.shape[3])] = value
    kw = dict(causal=causal, k_head=k_head, v_head=v_head, q_positions=pos, softmax_scale=scale)
    error = None
    if idx % 7 == 5:  # a malformed input
        kind = rng.choice(
            [
                "scale0",
                "scale_neg",
                "scale_nan",
                "k_head",
                "v_head",
                "pos",
                "zero_T",
                "zero_d",
                "zero_B",
                "meta",
                "scale_tensor",
            ]
        )
        error = TypeError if kind == "scale_tensor" else ValueError
        if kind == "scale0":
            kw["softmax_scale"] = 0.0
        elif kind == "scale_neg":
            kw["softmax_scale"] = -rng.uniform(0.1, 2.0)
        elif kind == "scale_nan":
            kw["softmax_scale"] = math.nan
        elif kind == "scale_tensor":
            kw["softmax_scale"] = torch.tensor(0.5)
        elif kind == "k_head":
            kw["k_head"] = [Hk] + [0] * (H - 1)
        elif kind == "v_head":
            kw["v_head"] = torch.tensor([-1] + [0] * (H - 1))
        elif kind == "pos":
            bad = torch.randint(0, S, (B, T), generator=g)
            bad[rng.randrange(B), rng.randrange(T)] = rng.choice([-1, S, S + 5])
            kw["q_positions"] = bad
        elif kind == "zero_T":
            q = q[:, :0]
            kw["q_positions"] = None
        elif kind == "zero_d":
            q, k = q[..., :0], k[..., :0]
        elif kind == "zero_B":
            q, k, v = q[:0], k[:0], v[:0]
            kw["q_positions"] = None
        elif kind == "meta":
            q, k, v = (x.to("meta") for x in (q, k, v))
    finite = all(bool(torch.isfinite(x).all()) for x in (q, k, v) if x.device.type != "meta")
    return (q, k, v), kw, error, dtype, finite


def explicit(kw, H, Hk, Hv, B, T, S):
    """Maps and positions as the oracle takes them (Python lists)."""

    def as_list(m, Hn):
        return [h // (H // Hn) for h in range(H)] if m is None else [int(x) for x in torch.as_tensor(m)]

    pos = kw["q_positions"]
    pos = [[S - T + i for i in range(T)] for _ in range(B)] if pos is None else pos.tolist()
    return as_list(kw["k_head"], Hk), as_list(kw["v_head"], Hv), pos


def check_rows(name, got, want, tol):
    """NaN rows must be all NaN; every other row finite and within tol of the oracle."""
    nan_rows = torch.isnan(want).all(-1) if want.dim() == 4 else torch.isnan(want)
    got = got.double()
    if want.dim() == 4:
        assert torch.isnan(got[nan_rows]).all(), f"{name}: a row the contract makes NaN is not all NaN"
        ok_got, ok_want = got[~nan_rows], want[~nan_rows]
    else:
        assert torch.isnan(got[nan_rows]).all(), f"{name}: a NaN-row lse is not NaN"
        ok_got, ok_want = got[~nan_rows], want[~nan_rows]
    assert torch.isfinite(ok_got).all(), f"{name}: non-finite value in a row that sees only finite inputs"
    if ok_want.numel():
        err = (ok_got - ok_want).abs().max().item()
        assert err <= tol * max(1.0, ok_want.abs().max().item()), f"{name}: max abs error {err:.3e}"


def run_case(idx: int, backend: str, grads: bool, cuda_bf16: bool = False):
    (q, k, v), kw, error, dtype, finite = make_case(idx)
    if backend != "triton" and dtype == torch.float16:
        q, k, v = (x.float() for x in (q, k, v))  # CPU SDPA / reference cases in fp32
    if cuda_bf16:  # maps / positions stay host values (checked on the host, copied by the op)
        q, k, v = (x if x.device.type == "meta" else x.to("cuda", torch.bfloat16) for x in (q, k, v))
    if error is not None:
        with pytest.raises(error, match=r"softmax_scale|k_head|v_head|q_positions|meta|>= 1|at least one"):
            attention(q, k, v, return_lse=True, backend=backend, **kw)
        return "error"
    B, T, H, _ = q.shape
    S, Hk, Hv = k.shape[1], k.shape[2], v.shape[2]
    k_head, v_head, pos = explicit(kw, H, Hk, Hv, B, T, S)
    scale = kw["softmax_scale"] or q.shape[-1] ** -0.5
    leaves = [x.detach().clone().requires_grad_(grads and finite) for x in (q, k, v)]
    out, lse = attention(*leaves, return_lse=True, backend=backend, **kw)
    assert out.dtype == q.dtype and out.shape == (B, T, H, v.shape[3]) and lse.shape == (B, H, T)
    r_leaves = [x.detach().cpu().double().requires_grad_(grads and finite) for x in (q, k, v)]
    r_out, r_lse = oracle(*r_leaves, k_head, v_head, pos, kw["causal"], scale)
    tol = TOL[q.dtype]
    check_rows(f"case {idx} {backend} out", out.detach().cpu(), r_out.detach(), tol)
    check_rows(f"case {idx} {backend} lse", lse.cpu(), r_lse.detach(), tol)
    if grads and finite:
        do = torch.randn(out.shape, generator=torch.Generator().manual_seed(idx)).to(q.dtype)
        got = torch.autograd.grad(out, leaves, do.to(q.device))
        want = torch.autograd.grad(r_out, r_leaves, do.double())
        for name, a, b in zip(("dq", "dk", "dv"), got, want):
            check_rows(f"case {idx} {backend} {name}", a.cpu(), b, tol * 4)
    return "finite" if finite else "non-finite"


@pytest.mark.parametrize("backend", ["sdpa", "reference", "triton"])
def test_fuzz_every_case_matches_or_raises(backend, one_thread):
    kinds = {"error": 0, "finite": 0, "non-finite": 0}
    failures = []
    # the interpreter costs ~0.2 s a case: Triton runs 240 of the 360 (gradients on 60)
    cases = [i for i in range(N_CASES) if backend != "triton" or i % 3 != 2]
    for idx in cases:
        try:
            kinds[run_case(idx, backend, grads=backend != "triton" or idx % 6 == 0)] += 1
        except AssertionError as exc:  # collect every silent wrong result, then fail once
            failures.append(f"case {idx}: {str(exc).splitlines()[0]}")
    assert not failures, f"{len(failures)} silent wrong results on {backend}:\n" + "\n".join(failures[:20])
    assert sum(kinds.values()) == len(cases) and min(kinds.values()) >= 30, kinds


@pytest.mark.gpu
def test_fuzz_triton_bf16_on_gpu():
    """The same cases in bf16 on CUDA (the interpreter's bf16 is not trusted on CPU)."""
    failures = []
    for idx in range(N_CASES):
        try:
            run_case(idx, "triton", grads=idx % 2 == 0, cuda_bf16=True)
        except AssertionError as exc:
            failures.append(f"case {idx}: {str(exc).splitlines()[0]}")
    assert not failures, f"{len(failures)} silent wrong results:\n" + "\n".join(failures[:20])
