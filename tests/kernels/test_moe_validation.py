"""expert_mlp input validation: one test per rule; each error names the argument."""

from __future__ import annotations

import pytest
import torch

from kernels import triton_runnable
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
    return expert_mlp(
        kw["x"],
        kw["expert_ids"],
        kw["expert_weights"],
        kw["w_in"],
        kw["w_out"],
        activation=activation,
        backend=backend,
        check_ids=kw.pop("check_ids", True),
    )


def test_valid_inputs_pass(args):
    assert _call(args).shape == (6, 16)


@pytest.mark.parametrize(
    "override,exc,match",
    [
        (dict(activation="relu"), ValueError, "activation.*relu"),
        (dict(backend="cuda_magic"), ValueError, "backend.*cuda_magic"),
        (dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
        (dict(x=torch.zeros(6, 16, dtype=torch.int64)), TypeError, "x dtype"),
        (
            dict(
                x=torch.zeros(6, 16, dtype=torch.float64),
                w_in=torch.zeros(4, 16, 16, dtype=torch.float64),
                w_out=torch.zeros(4, 8, 16, dtype=torch.float64),
                backend="triton",
            ),
            TypeError,
            "x dtype float64",
        ),
        (dict(expert_ids=torch.zeros(6, 2)), TypeError, "expert_ids dtype"),
        (dict(expert_weights=torch.zeros(6, 2, dtype=torch.int32)), TypeError, "expert_weights dtype"),
        (dict(w_in=torch.zeros(4, 16, 16, dtype=torch.float16)), TypeError, "w_in dtype"),
        (dict(w_out=torch.zeros(4, 8, 16, dtype=torch.float16)), TypeError, "w_out dtype"),
        (dict(w_out=torch.zeros(4, 8, 16, device="meta")), ValueError, "w_out is on the meta device"),
        (dict(x=torch.zeros(6, 16, device="meta")), ValueError, "x is on the meta device"),
        (
            dict(x=torch.zeros(6, 0), w_in=torch.zeros(4, 0, 16), w_out=torch.zeros(4, 8, 0)),
            ValueError,
            "w_in must have shape",
        ),
        (dict(x=torch.zeros(2, 3, 16)), ValueError, "x must be 2-D"),
        (dict(expert_ids=torch.zeros(5, 2, dtype=torch.int32)), ValueError, "expert_ids must have shape"),
        (dict(expert_ids=torch.zeros(6, 0, dtype=torch.int32), expert_weights=torch.zeros(6, 0)), ValueError, "k>=1"),
        (dict(expert_weights=torch.zeros(6, 3)), ValueError, "expert_weights shape"),
        (dict(w_in=torch.zeros(4, 12, 16)), ValueError, "w_in must have shape.*D=16"),
        (dict(w_in=torch.zeros(4, 16, 15), w_out=torch.zeros(4, 7, 16)), ValueError, "w_in last dim must be 2F"),
        (dict(w_out=torch.zeros(4, 9, 16)), ValueError, r"w_out must have shape \(E=4, F=8, D=16\)"),
        (dict(w_out=torch.zeros(3, 8, 16)), ValueError, "w_out must have shape"),
        (dict(x=torch.zeros(16, 6).t()), ValueError, "x must be contiguous"),
        (
            dict(w_in=torch.zeros(4, 16, 16).transpose(1, 2).contiguous().transpose(1, 2)),
            ValueError,
            "w_in must be contiguous",
        ),
        (dict(expert_ids=torch.full((6, 2), 4, dtype=torch.int32)), ValueError, r"expert_ids values.*found 4"),
        (dict(expert_ids=torch.full((6, 2), -2, dtype=torch.int32)), ValueError, r"expert_ids values.*found -2"),
    ],
)
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


@pytest.mark.parametrize(
    "backend",
    [
        "torch",
        pytest.param(
            "triton",
            marks=pytest.mark.skipif(not triton_runnable("cpu"), reason="CPU tensors need the Triton interpreter"),
        ),
    ],
)
def test_out_of_range_ids_are_dropped_without_a_sync(args, backend):
    """Without check_ids an id outside [-1, E) acts like -1 (no error, no bad address, no NaN)."""
    from kernels.moe import route

    ids = args["expert_ids"].clone()
    ids[0, 0], ids[1, 1], ids[2, 0] = 4, 977, -5  # >= E, >= next_pow2(E + 2), < -1
    dropped = torch.where((ids >= 0) & (ids < 4), ids, -1)
    x = args["x"].requires_grad_()
    y = expert_mlp(x, ids, args["expert_weights"], args["w_in"], args["w_out"], backend=backend, check_ids=False)
    ref = expert_mlp(x, dropped, args["expert_weights"], args["w_in"], args["w_out"], backend="reference")
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    r = route(ids, 4, backend=backend)
    assert r.invalid_1.tolist() == [3] and r.counts_E.sum().item() == int(((ids >= 0) & (ids < 4)).sum())


def test_debug_env_turns_on_the_id_check(args, monkeypatch):
    monkeypatch.setenv("SPARSE_ARCH_DEBUG_CHECKS", "1")
    bad = torch.full((6, 2), 9, dtype=torch.int32)
    with pytest.raises(ValueError, match="expert_ids values.*found 9"):
        expert_mlp(args["x"], bad, args["expert_weights"], args["w_in"], args["w_out"], backend="torch")


def test_nan_gate_on_empty_slot_contributes_nothing_triton(args):
    """Documented semantics: an empty (-1) slot adds exactly nothing even with a NaN/inf gate."""
    if not triton_runnable("cpu"):
        pytest.skip("Triton cannot run here")
    ids, gates = args["expert_ids"].clone(), args["expert_weights"].clone()
    ids[:, 1] = -1
    gates[:, 1] = float("nan")
    gates[0, 1] = float("inf")
    y = expert_mlp(args["x"], ids, gates, args["w_in"], args["w_out"], backend="triton")
    ref = expert_mlp(args["x"], ids, gates, args["w_in"], args["w_out"], backend="reference")
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not triton_runnable("cpu"), reason="CPU tensors need the Triton interpreter")
def test_nan_input_poisons_only_its_token_triton(args):
    """Documented semantics: a NaN in x[n] gives NaN in y[n] only; every other token is unaffected."""
    x = args["x"].clone()
    x[3, 5] = float("nan")
    y = expert_mlp(x, args["expert_ids"], args["expert_weights"], args["w_in"], args["w_out"], backend="triton")
    ref = expert_mlp(x, args["expert_ids"], args["expert_weights"], args["w_in"], args["w_out"], backend="reference")
    assert torch.isnan(y[3]).all() and torch.isnan(ref[3]).all()
    others = torch.arange(6) != 3
    torch.testing.assert_close(y[others], ref[others], rtol=1e-5, atol=1e-5)
