"""The attention torch.library ops: opcheck on CPU, torch.compile(fullgraph=True) forward + backward,
and no host synchronisation in the forward/backward path.

Legend: B batch, T queries, S keys, H query heads, Hk key heads, Hv value heads, d / dv head dims.
Tiny fp32 shapes: the Triton kernels run under the interpreter (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

import kernels.attention.library  # noqa: F401  (registers sparse_arch::attention_fwd / _bwd)
from kernels.attention import attention, attention_reference
from kernels.attention.flash import first_nonfinite_key


def problem(B=1, T=5, S=7, H=4, Hk=2, Hv=2, d=8, dv=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, T, H, d, generator=g),
        torch.randn(B, S, Hk, d, generator=g),
        torch.randn(B, S, Hv, dv, generator=g),
    )


def op_args(q, k, v, k_head, v_head, pos, causal, shared):
    kh, vh = torch.tensor(k_head, dtype=torch.int32), torch.tensor(v_head, dtype=torch.int32)
    if shared:
        vh = kh
    first_bad = first_nonfinite_key(k, v, kh, vh).to(torch.int32)
    return (
        q.requires_grad_(),
        k.requires_grad_(),
        v.requires_grad_(),
        kh,
        vh,
        pos,
        first_bad,
        causal,
        q.shape[-1] ** -0.5,
        shared,
        True,
    )


@pytest.mark.parametrize("case", ["gqa_causal", "decoupled_positions", "full"])
def test_opcheck_forward_and_backward(case):
    q, k, v = problem()
    if case == "gqa_causal":
        args = op_args(q, k, v, [0, 0, 1, 1], [0, 0, 1, 1], None, True, True)
    elif case == "decoupled_positions":
        pos = torch.tensor([[6, 1, 3, 3, 0]], dtype=torch.int32)
        args = op_args(q, k, v, [1, 0, 1, 0], [0, 0, 1, 1], pos, True, False)
    else:
        args = op_args(q, k, v, [0, 1, 0, 1], [0, 1, 0, 1], None, False, True)
    torch.library.opcheck(torch.ops.sparse_arch.attention_fwd.default, args)
    out, lse = torch.ops.sparse_arch.attention_fwd(*args)
    do = torch.randn_like(out)
    q_, k_, v_, kh, vh, pos, first_bad, causal, scale, shared, det = args
    bwd_args = (
        do,
        q_.detach(),
        k_.detach(),
        v_.detach(),
        out.detach(),
        lse.detach(),
        kh,
        vh,
        pos,
        first_bad,
        causal,
        scale,
        shared,
        det,
    )
    torch.library.opcheck(torch.ops.sparse_arch.attention_bwd.default, bwd_args)


def test_lse_is_not_differentiable():
    q, k, v = problem()
    out, lse = attention(*(x.requires_grad_() for x in (q, k, v)), return_lse=True, backend="triton")
    assert out.requires_grad and not lse.requires_grad


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_compile_fullgraph_forward_backward(backend):
    """One graph (fullgraph=True raises on any break) whose forward and backward match eager and
    the reference; decoupled maps given as tensors and explicit positions exercise the
    device-side (compile-safe) checks."""
    q, k, v = problem(B=2, T=6, S=9, H=4, Hk=2, Hv=3)
    k_head, v_head = torch.tensor([1, 0, 1, 0]), torch.tensor([2, 0, 1, 2])
    pos = torch.tensor([[8, 2, 3, 5, 5, 0], [1, 2, 3, 4, 5, 6]])

    def f(q, k, v):
        out = attention(q, k, v, k_head=k_head, v_head=v_head, q_positions=pos, backend=backend)
        return (out.float() ** 2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = {}
    for name, fn in (("compiled", compiled), ("eager", f)):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        loss = fn(*leaves)
        results[name] = (loss.detach(), *torch.autograd.grad(loss, leaves))
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_out, _ = attention_reference(*ref_leaves, k_head, v_head, pos, True, 8**-0.5)
    ref_loss = (ref_out**2).sum()
    ref = (ref_loss.detach(), *torch.autograd.grad(ref_loss, ref_leaves))
    for name, a, b, r in zip(("loss", "dq", "dk", "dv"), results["compiled"], results["eager"], ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4, msg=name)


def test_no_host_sync_in_forward_backward(monkeypatch):
    """Tensor.item / __bool__ / __int__ / __float__ / tolist / nonzero are never called by the
    Triton path with device-resident (here: non-host-checked) maps and positions. CPU maps are
    host data, so this runs the device branch by pretending the values are not host-readable."""
    from kernels.attention import ops

    q, k, v = problem(B=2, T=6, S=9, H=4, Hk=2, Hv=3)
    k_head, v_head = torch.tensor([1, 0, 1, 0]), torch.tensor([2, 0, 1, 2])
    pos = torch.tensor([[8, 2, 3, 5, 5, 0], [1, 2, 3, 4, 5, 6]])
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    monkeypatch.setattr(ops, "_host_readable", lambda x: False)
    calls = []
    for name in ("item", "__bool__", "__int__", "__float__", "tolist", "nonzero"):
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, _name=name, **kw):
            calls.append(_name)
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, spy)
    for backend in ("triton", "sdpa"):
        out = attention(*leaves, k_head=k_head, v_head=v_head, q_positions=pos, backend=backend)
        torch.autograd.grad(out.sum(), leaves)
    monkeypatch.undo()
    assert calls == [], f"host syncs: {calls}"


def test_device_checked_maps_and_positions_give_nan_rows(monkeypatch):
    """Without host values (device tensors, no KERNELS_DEBUG) out-of-range entries are not read
    out of bounds: the rows they touch are NaN rows, every other row is unchanged."""
    from kernels.attention import ops

    q, k, v = problem(B=1, T=5, S=7, H=4, Hk=2, Hv=2)
    good = attention(q, k, v, k_head=torch.tensor([0, 1, 1, 0]), backend="triton")
    monkeypatch.setattr(ops, "_host_readable", lambda x: False)
    for backend in ("triton", "sdpa", "reference"):
        out = attention(q, k, v, k_head=torch.tensor([0, 1, 5, 0]), backend=backend)
        assert torch.isnan(out[:, :, 2]).all()
        torch.testing.assert_close(out[:, :, [0, 1, 3]], good[:, :, [0, 1, 3]], rtol=1e-5, atol=1e-5)
        pos = torch.tensor([[0, 1, 9, 3, -1]])
        out = attention(q, k, v, q_positions=pos, backend=backend)
        ref = attention(q, k, v, q_positions=pos.clamp(0, 6), backend=backend)
        assert torch.isnan(out[:, [2, 4]]).all()
        torch.testing.assert_close(out[:, [0, 1, 3]], ref[:, [0, 1, 3]], rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("KERNELS_DEBUG", "1")
    with pytest.raises(ValueError, match="k_head values must lie in"):
        attention(q, k, v, k_head=torch.tensor([0, 1, 5, 0]), backend="triton")
