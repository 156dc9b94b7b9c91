"""expert_mlp's torch.library ops: opcheck (schema, fake tensors, autograd registration, AOT dispatch)
and torch.compile(fullgraph=True) tracing forward + backward on CPU without a graph break.

Legend: N tokens, k slots/token, E experts, D model width, F expert hidden width.
"""

from __future__ import annotations

import pytest
import torch

from kernels import triton_runnable
from kernels.moe import expert_mlp, ops
from tests.kernels.moe_helpers import assert_close, make_problem

needs_triton = pytest.mark.skipif(not triton_runnable("cpu"), reason="CPU tensors need the Triton interpreter")


def _problem(activation="swiglu", pattern="drop"):
    x, ids, gates, w_in, w_out = make_problem(7, 16, 8, 3, 2, torch.float32, activation, pattern, seed=3)
    return [x.requires_grad_(), ids, gates.requires_grad_(), w_in.requires_grad_(), w_out.requires_grad_()]


@needs_triton
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_opcheck_triton_op(activation):
    args = _problem(activation)
    torch.library.opcheck(ops._triton_fwd, (*args, activation == "swiglu", True))


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_opcheck_torch_op(activation):
    args = _problem(activation)
    torch.library.opcheck(ops._torch_op, (*args, activation))


def _fwd_bwd(fn, backend, args, activation):
    leaves = [a.detach().clone().requires_grad_() if a.is_floating_point() else a for a in args]
    y = fn(*leaves, activation=activation, backend=backend)
    (y * torch.linspace(-1, 1, y.shape[1])).sum().backward()
    return [y.detach()] + [leaves[i].grad for i in (0, 2, 3, 4)]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_compile_fullgraph_forward_backward(backend):
    torch._dynamo.reset()
    args = _problem()
    compiled = torch.compile(expert_mlp, fullgraph=True, backend="aot_eager")
    got = _fwd_bwd(compiled, backend, args, "swiglu")
    want = _fwd_bwd(expert_mlp, "reference", [a.double() if a.is_floating_point() else a for a in args], "swiglu")
    for name, g, w in zip(("y", "dx", "dgates", "dw_in", "dw_out"), got, want):
        assert_close(g, w.float(), 1e-5, 1e-4, name=f"compiled {backend} {name}")
