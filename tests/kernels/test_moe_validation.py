"""expert_mlp input validation: one test per rule; each error names the argument."""
from __future__ import annotations

import pytest
import torch

from kernels.moe import expert_mlp
from tests.kernels.moe_helpers import make_problem


@pytest.fixture
def args():
    x, ids, gates, w_in, w_out = make_problem(6, 16, 8, 4, 2, torch.float32)
    return dict(x=x, expert_ids=ids, expert_weights=gates, w_in=w_in, w_out=w_out)


def _call(args, **override):
    kw = dict(args, **override)
    activation = kw.pop("activation", "swiglu")
    backend = kw.pop("backend", "torch")
    return expert_mlp(kw["x"], kw["expert_ids"], kw["expert_weights"], kw["w_in"], kw["w_out"],
                      activation=activation, backend=backend)


def test_valid_inputs_pass(args):
    assert _call(args).shape == (6, 16)


@pytest.mark.parametrize("override,exc,match", [
    (dict(activation="relu"), ValueError, "activation.*relu"),
    (dict(backend="cuda_magic"), ValueError, "backend.*cuda_magic"),
    (dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.zeros(6, 16, dtype=torch.int64)), TypeError, "x dtype"),
    (dict(x=torch.zeros(6, 16, dtype=torch.float64), w_in=torch.zeros(4, 16, 16, dtype=torch.float64),
          w_out=torch.zeros(4, 8, 16, dtype=torch.float64), backend="triton"), TypeError, "x dtype float64"),
    (dict(expert_ids=torch.zeros(6, 2)), TypeError, "expert_ids dtype"),
    (dict(expert_weights=torch.zeros(6, 2, dtype=torch.int32)), TypeError, "expert_weights dtype"),
    (dict(w_in=torch.zeros(4, 16, 16, dtype=torch.float16)), TypeError, "w_in dtype"),
    (dict(w_out=torch.zeros(4, 8, 16, dtype=torch.float16)), TypeError, "w_out dtype"),
    (dict(w_out=torch.zeros(4, 8, 16, device="meta")), ValueError, "w_out is on meta"),
    (dict(x=torch.zeros(2, 3, 16)), ValueError, "x must be 2-D"),
    (dict(expert_ids=torch.zeros(5, 2, dtype=torch.int32)), ValueError, "expert_ids must have shape"),
    (dict(expert_ids=torch.zeros(6, 0, dtype=torch.int32), expert_weights=torch.zeros(6, 0)), ValueError, "k>=1"),
    (dict(expert_weights=torch.zeros(6, 3)), ValueError, "expert_weights shape"),
    (dict(w_in=torch.zeros(4, 12, 16)), ValueError, "w_in must have shape.*D=16"),
    (dict(w_in=torch.zeros(4, 16, 15), w_out=torch.zeros(4, 7, 16)), ValueError, "w_in last dim must be 2F"),
    (dict(w_out=torch.zeros(4, 9, 16)), ValueError, r"w_out must have shape \(E=4, F=8, D=16\)"),
    (dict(w_out=torch.zeros(3, 8, 16)), ValueError, "w_out must have shape"),
    (dict(x=torch.zeros(16, 6).t()), ValueError, "x must be contiguous"),
    (dict(w_in=torch.zeros(4, 16, 16).transpose(1, 2).contiguous().transpose(1, 2)), ValueError, "w_in must be contiguous"),
    (dict(expert_ids=torch.full((6, 2), 4, dtype=torch.int32)), ValueError, r"expert_ids values.*found 4"),
    (dict(expert_ids=torch.full((6, 2), -2, dtype=torch.int32)), ValueError, r"expert_ids values.*found -2"),
])
def test_bad_input_raises(args, override, exc, match):
    with pytest.raises(exc, match=match):
        _call(args, **override)


def test_gelu_shape_rule(args):
    # for GELU w_in is (E, D, F): the (E, D, 2F) SwiGLU weight no longer matches w_out's F
    with pytest.raises(ValueError, match="w_out must have shape.*for gelu"):
        _call(args, activation="gelu")


def test_triton_backend_needs_cuda_or_interpreter(args, monkeypatch):
    import kernels

    monkeypatch.setattr(kernels, "INTERPRET", False)
    with pytest.raises(ValueError, match="backend='triton' needs a CUDA tensor"):
        _call(args, backend="triton")
