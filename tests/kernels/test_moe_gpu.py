"""GPU lane for the MoE kernels (skipped without CUDA): bf16 accuracy against an fp32 reference.

Legend: N tokens, k slots/token, E experts, D model width, F expert hidden width.
The rule (DESIGN.md): the Triton kernel's bf16 error against an fp32 reference must be at most 2×
the error of the torch backend run in bf16 on the same inputs, for the output and every gradient.
The fp32 reference is the torch backend in fp32 (itself checked against the loop reference by the
CPU tests; the loop is too slow at these sizes). The CPU-lane tests also run on CUDA unchanged.
"""

from __future__ import annotations

import pytest
import torch

from kernels.moe import expert_mlp
from tests.kernels.moe_helpers import make_problem, poisoned_empty, rel_rms

pytestmark = pytest.mark.gpu

NAMES = ("y", "dx", "dgates", "dw_in", "dw_out")
SHAPES = [  # (N, D, F, E, k, activation, pattern): autotuned tiles, many experts, odd sizes, drops
    (2048, 256, 512, 8, 2, "swiglu", "random"),
    (1000, 200, 136, 64, 8, "swiglu", "drop"),
    (1536, 512, 384, 16, 4, "gelu", "empty_expert"),
    (777, 128, 96, 5, 5, "swiglu", "random"),
    (4096, 256, 128, 128, 1, "gelu", "one_expert"),
]


def _grads(backend, x, ids, gates, w_in, w_out, act, dy, dtype):
    leaves = [t.detach().cuda().to(dtype).requires_grad_() for t in (x, gates, w_in, w_out)]
    y = expert_mlp(leaves[0], ids.cuda(), leaves[1], leaves[2], leaves[3], activation=act, backend=backend)
    y.backward(dy.cuda().to(y.dtype))
    return [y.detach().float()] + [t.grad.float() for t in leaves]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_bf16_error_within_2x_torch_backend(shape, monkeypatch):
    N, D, F, E, k, act, pattern = shape
    x, ids, gates, w_in, w_out = make_problem(N, D, F, E, k, torch.float32, act, pattern)
    dy = torch.randn(N, D, generator=torch.Generator().manual_seed(3))
    ref = _grads("torch", x, ids, gates, w_in, w_out, act, dy, torch.float32)
    base = _grads("torch", x, ids, gates, w_in, w_out, act, dy, torch.bfloat16)
    poisoned_empty(monkeypatch)
    got = _grads("triton", x, ids, gates, w_in, w_out, act, dy, torch.bfloat16)
    for name, g, b, r in zip(NAMES, got, base, ref):
        assert torch.isfinite(g).all(), name
        err, err_torch = rel_rms(g, r), rel_rms(b, r)
        assert err <= 2 * err_torch + 1e-6, f"{name}: triton bf16 rel-RMS {err:.2e} > 2 x torch bf16 {err_torch:.2e}"


def test_fp32_matches_torch_on_gpu():
    """fp32 on GPU multiplies in ieee fp32 (no TF32), so it matches the torch backend tightly."""
    x, ids, gates, w_in, w_out = make_problem(1000, 200, 136, 16, 4, torch.float32, "swiglu", "drop")
    dy = torch.randn(1000, 200)
    torch.backends.cuda.matmul.allow_tf32 = False
    for name, g, r in zip(
        NAMES,
        _grads("triton", x, ids, gates, w_in, w_out, "swiglu", dy, torch.float32),
        _grads("torch", x, ids, gates, w_in, w_out, "swiglu", dy, torch.float32),
    ):
        assert rel_rms(g, r) < 1e-5, name


def test_auto_backend_is_triton_on_cuda():
    x, ids, gates, w_in, w_out = (t.cuda() for t in make_problem(64, 64, 32, 4, 2, torch.bfloat16))
    y = expert_mlp(x.requires_grad_(), ids, gates, w_in, w_out)
    assert y.grad_fn is not None and "moe_triton_fwd" in type(y.grad_fn).__name__
