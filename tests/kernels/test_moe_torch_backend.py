"""The torch expert-MLP backend: exactness against the float64 plain-loop reference (fp32 and fp64,
output and the gradients of x, gates, w_in, w_out), both matmul strategies, determinism, the -1
slot and NaN/inf semantics, empty inputs, no host reads on the grouped (sync-free) path, and no
``torch._grouped_mm`` in fp32 (its meta function rejects fp32, which would break torch.compile).

Legend: N tokens, k slots/token, E experts, D model width, F expert hidden width, M = N·k slots.
"""

from __future__ import annotations

import pytest
import torch

import kernels.moe.torch_backend as tb
from kernels.moe import expert_mlp
from kernels.moe.reference import expert_mlp_reference
from tests.kernels.moe_helpers import assert_close, make_problem, poisoned_empty

TOL = {torch.float64: (1e-12, 1e-11), torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 8e-2)}
CASES = [  # (N, D, F, E, k, activation, pattern)
    (37, 48, 40, 5, 2, "swiglu", "drop"),
    (37, 48, 40, 5, 5, "gelu", "random"),  # k = E
    (29, 24, 16, 4, 1, "swiglu", "random"),  # k = 1
    (33, 24, 20, 4, 2, "swiglu", "empty_expert"),
    (33, 17, 9, 4, 3, "gelu", "one_expert"),  # odd sizes, every kept slot on one expert
    (20, 16, 16, 64, 4, "swiglu", "drop"),  # most experts empty
    (9, 16, 8, 3, 2, "gelu", "all_dropped"),
]


def _grads(fn, x, ids, gates, w_in, w_out, dy, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, gates, w_in, w_out)]
    y = fn(leaves[0], ids, leaves[1], leaves[2], leaves[3])
    y.backward(dy.to(dtype))
    return [y.detach()] + [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]


def _problem(case, seed=0):
    N, D, F, E, k, act, pattern = case
    x, ids, gates, w_in, w_out = make_problem(N, D, F, E, k, torch.float32, act, pattern, seed=seed)
    return (x, ids, gates, w_in, w_out), torch.randn(N, D, generator=torch.Generator().manual_seed(seed + 7)), act


def _reference(act):
    return lambda *a: expert_mlp_reference(*a, activation=act)


@pytest.mark.parametrize(
    "dtype,onednn",
    [(torch.float32, True), (torch.float32, False), (torch.float64, False)],
    ids=["fp32-onednn", "fp32-torch.mm", "fp64"],
)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_reference(case, dtype, onednn, monkeypatch):
    """fp32 matmuls go through oneDNN on CPU when it works; both ways must match the reference."""
    monkeypatch.setattr(tb, "USE_ONEDNN", onednn)
    inputs, dy, act = _problem(case)
    ref = _grads(_reference(act), *inputs, dy, torch.float64)
    poisoned_empty(monkeypatch)  # an output row the backend forgot to write becomes NaN
    out = _grads(lambda *a: expert_mlp(*a, activation=act, backend="torch"), *inputs, dy, dtype)
    for name, o, r in zip(("y", "dx", "dgates", "dw_in", "dw_out"), out, ref):
        assert o.dtype == dtype, name
        assert_close(o, r, *TOL[dtype], name=name)


@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: "-".join(map(str, c)))
def test_grouped_path_matches_loop_path(case):
    """bf16 on CPU takes torch._grouped_mm (all M rows, masked); it must agree with the loop path."""
    if not tb._grouped_mm_works(torch.device("cpu"), torch.bfloat16):
        pytest.skip("torch._grouped_mm does not work for bf16 on this CPU build")
    inputs, dy, act = _problem(case)
    ref = _grads(_reference(act), *inputs, dy, torch.float64)
    grouped = _grads(lambda *a: tb.expert_mlp_torch(*a, activation=act), *inputs, dy, torch.bfloat16)
    loop = _grads(lambda *a: tb.expert_mlp_torch(*a, activation=act, use_grouped_mm=False), *inputs, dy, torch.bfloat16)
    for name, g, lp, r in zip(("y", "dx", "dgates", "dw_in", "dw_out"), grouped, loop, ref):
        assert_close(g.double(), r, *TOL[torch.bfloat16], name=f"grouped {name}")
        assert_close(lp.double(), r, *TOL[torch.bfloat16], name=f"loop {name}")


def test_grouped_path_reads_nothing_on_the_host(monkeypatch):
    """The grouped path (what CUDA bf16 runs) never reads device values: no sync, CUDA-graph safe."""
    if not tb._grouped_mm_works(torch.device("cpu"), torch.bfloat16):
        pytest.skip("torch._grouped_mm does not work for bf16 on this CPU build")
    inputs, dy, act = _problem(CASES[0])
    leaves = [t.to(torch.bfloat16).requires_grad_() for t in (inputs[0], inputs[2], inputs[3], inputs[4])]
    calls = []
    for owner, names in (
        (torch.Tensor, ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "bincount")),
        (torch, ("nonzero", "bincount", "unique", "masked_select")),
    ):  # data-dependent sizes too
        for name in names:
            real = getattr(owner, name)
            monkeypatch.setattr(owner, name, lambda *a, _r=real, _n=name, **kw: calls.append(_n) or _r(*a, **kw))
    y = tb.expert_mlp_torch(leaves[0], inputs[1], leaves[1], leaves[2], leaves[3], act)
    y.backward(dy.to(torch.bfloat16))
    monkeypatch.undo()
    assert calls == [], f"host reads on the grouped path: {calls}"


def test_fp32_never_calls_grouped_mm(monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("torch._grouped_mm called in fp32")

    monkeypatch.setattr(torch, "_grouped_mm", refuse)
    monkeypatch.setattr(tb, "_GROUPED_MM_OK", {})
    inputs, dy, act = _problem(CASES[0])
    _grads(lambda *a: expert_mlp(*a, activation=act, backend="torch"), *inputs, dy, torch.float32)


@pytest.mark.parametrize("use_grouped_mm", [False, True])
def test_bitwise_deterministic(use_grouped_mm):
    """Same inputs → bitwise-equal output and gradients, run to run (both threads busy; fp32 takes
    the oneDNN matmuls where they work)."""
    dtype = torch.bfloat16 if use_grouped_mm else torch.float32
    x, ids, gates, w_in, w_out = make_problem(512, 64, 96, 6, 2, torch.float32, "swiglu", "drop", seed=3)
    dy = torch.randn(512, 64)
    fn = lambda *a: tb.expert_mlp_torch(*a, use_grouped_mm=use_grouped_mm)
    first = _grads(fn, x, ids, gates, w_in, w_out, dy, dtype)
    again = _grads(fn, x, ids, gates, w_in, w_out, dy, dtype)
    assert all(torch.equal(u, v) for u, v in zip(first, again))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("use_grouped_mm", [False, True])
def test_dropped_slot_gate_is_never_read(bad, use_grouped_mm):
    """A NaN/inf gate on a -1 slot changes nothing: output and every gradient stay bitwise equal."""
    dtype = torch.bfloat16 if use_grouped_mm else torch.float32
    x, ids, gates, w_in, w_out = make_problem(37, 48, 40, 5, 2, torch.float32, "swiglu", "drop")
    dy = torch.randn(37, 48)
    fn = lambda *a: tb.expert_mlp_torch(*a, use_grouped_mm=use_grouped_mm)
    clean = _grads(fn, x, ids, gates, w_in, w_out, dy, dtype)
    poisoned = gates.clone()
    poisoned[ids == -1] = bad
    dirty = _grads(fn, x, ids, poisoned, w_in, w_out, dy, dtype)
    for name, c, d in zip(("y", "dx", "dgates", "dw_in", "dw_out"), clean, dirty):
        assert torch.equal(c, d), name


def test_nan_in_a_token_reaches_only_that_token():
    x, ids, gates, w_in, w_out = make_problem(37, 48, 40, 5, 2, torch.float32, "swiglu", "random")
    ref = expert_mlp(x, ids, gates, w_in, w_out, backend="torch")
    x[4, 7] = float("nan")
    ids[9] = -1  # a token whose slots are all dropped: its output is exactly 0, NaN or not
    x[9, 0] = float("nan")
    y = expert_mlp(x, ids, gates, w_in, w_out, backend="torch")
    assert y[4].isnan().all()
    assert torch.equal(y[9], torch.zeros_like(y[9]))
    others = [n for n in range(37) if n not in (4, 9)]
    assert_close(y[others], ref[others], 1e-6, 1e-6)


def test_nan_gate_on_a_live_slot_gives_nan():
    x, ids, gates, w_in, w_out = make_problem(8, 16, 8, 3, 2, torch.float32, "swiglu", "random")
    gates[2, 1] = float("nan")
    y = expert_mlp(x, ids, gates, w_in, w_out, backend="torch")
    assert y[2].isnan().all() and not y[[0, 1, 3]].isnan().any()


def test_no_tokens_gives_empty_output_and_zero_weight_grads():
    x, ids, gates, w_in, w_out = make_problem(4, 16, 8, 3, 2, torch.float32)
    out = _grads(
        lambda *a: expert_mlp(*a, backend="torch"),
        x[:0],
        ids[:0],
        gates[:0],
        w_in,
        w_out,
        torch.zeros(0, 16),
        torch.float32,
    )
    assert out[0].shape == (0, 16) and out[1].shape == (0, 16) and out[2].shape == (0, 2)
    assert torch.equal(out[3], torch.zeros_like(out[3])) and torch.equal(out[4], torch.zeros_like(out[4]))


def test_meta_and_zero_width_are_refused():
    x, ids, gates, w_in, w_out = make_problem(4, 16, 8, 3, 2, torch.float32)
    meta = [t.to("meta") for t in (x, ids, gates, w_in, w_out)]
    with pytest.raises(ValueError, match="meta"):
        tb.expert_mlp_torch(*meta)
    with pytest.raises(ValueError, match="positive"):
        tb.expert_mlp_torch(x[:, :0], ids, gates, w_in[:, :0], w_out[..., :0])
    with pytest.raises(ValueError, match="w_in"):
        expert_mlp(
            x[:, :0].contiguous(), ids, gates, w_in[:, :0].contiguous(), w_out[..., :0].contiguous(), backend="torch"
        )


def test_saved_tensors_have_fixed_shapes():
    """fwd returns (y, h_MH, o_MD) whose shapes depend only on N, k, D, H: a fake impl can give them."""
    x, ids, gates, w_in, w_out = make_problem(37, 48, 40, 5, 2, torch.float32, "swiglu", "drop")
    y, h, o = tb.expert_mlp_torch_fwd(x, ids, gates, w_in, w_out)
    assert y.shape == (37, 48) and h.shape == (74, 80) and o.shape == (74, 48)
    dy = torch.randn(37, 48)
    grads = tb.expert_mlp_torch_bwd(dy, x, ids, gates, w_in, w_out, h, o)
    ref = _grads(lambda *a: expert_mlp_reference(*a), x, ids, gates, w_in, w_out, dy, torch.float64)[1:]
    for g, r in zip(grads, ref):
        assert_close(g, r, *TOL[torch.float32])


def test_compiles_in_fp32():
    """torch.compile of a module calling the torch backend runs forward and backward in fp32."""
    x, ids, gates, w_in, w_out = make_problem(16, 16, 8, 4, 2, torch.float32, "swiglu", "drop")
    w_i, w_o = w_in.clone().requires_grad_(), w_out.clone().requires_grad_()
    fn = torch.compile(
        lambda xx: expert_mlp(xx, ids, gates, w_i, w_o, backend="torch").pow(2).sum(), backend="aot_eager"
    )
    fn(x).backward()
    ref = _grads(lambda *a: expert_mlp_reference(*a), x, ids, gates, w_in, w_out, torch.zeros(16, 16), torch.float64)
    y = ref[0]
    assert_close(fn(x).detach(), y.pow(2).sum(), *TOL[torch.float32])
    assert w_i.grad is not None and torch.isfinite(w_i.grad).all()
