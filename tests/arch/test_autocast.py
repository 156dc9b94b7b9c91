"""Custom kernels under autocast: the expert MLPs and MoHD's group GEMMs run in the autocast dtype.

Autocast casts only the ops on its lists; without ``arch.layers.autocast_operands`` the fp32 weights of
our kernels would keep them in fp32 under bf16 autocast. Checked with CPU autocast (same mechanism as CUDA).
"""

from __future__ import annotations

import pytest
import torch

import arch.ffn.expert_parallel as expert_parallel
import arch.ffn.mohd as mohd_module
from arch.ffn.moe import MoEFFN
from arch.ffn.mohd import MoHDFFN
from arch.layers import ForwardContext


def ctx() -> ForwardContext:
    return ForwardContext(cos_TF=torch.zeros(1), sin_TF=torch.zeros(1), positions_T=torch.zeros(1))


def _record(monkeypatch, module, name: str, seen: list) -> None:
    original = getattr(module, name)

    def recording(*args, **kwargs):
        seen.append({a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()})
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, recording)


def _fp32_and_bf16(layer, weight, x_BTD):
    """Outputs and the kernel weight's gradient of a plain fp32 forward and of one under bf16 autocast."""
    y32 = layer(x_BTD, ctx())
    (g32,) = torch.autograd.grad(y32.square().sum(), [weight])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = layer(x_BTD, ctx())
    (g16,) = torch.autograd.grad(y16.float().square().sum(), [weight])
    return y32, y16, g32, g16


LAYERS = {
    "moe": lambda: MoEFFN(32, 0, n_experts=4, top_k=2, expert_hidden=48, backend="torch"),
    "mohd_ffn": lambda: MoHDFFN(32, 0, n_groups=4, n_active=2, n_shared=1, hidden_dim=48, backend="torch"),
    "mohd_hidden": lambda: MoHDFFN(
        32, 0, n_groups=4, n_active=2, n_shared=1, hidden_dim=48, scope="hidden", backend="torch"
    ),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_kernels_run_in_the_autocast_dtype_and_grads_reach_fp32_weights(monkeypatch, name):
    torch.manual_seed(0)
    layer = LAYERS[name]()
    seen: list[set] = []
    if name == "moe":
        _record(monkeypatch, expert_parallel, "expert_mlp", seen)
    else:
        _record(monkeypatch, mohd_module, "group_in_matmul", seen)
        _record(monkeypatch, mohd_module, "group_out_matmul", seen)
    x_BTD = torch.randn(2, 8, 32)
    weight = layer.w_in_EDH if name == "moe" else layer.w_in_DH
    y32, y16, g32, g16 = _fp32_and_bf16(layer, weight, x_BTD)
    calls = len(seen) // 2
    assert calls >= 1 and all(dtypes == {torch.float32} for dtypes in seen[:calls])  # plain fp32 forward
    assert all(dtypes == {torch.bfloat16} for dtypes in seen[calls:])  # every operand cast under autocast
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32.detach(), rtol=5e-2, atol=5e-2)
    assert g16.dtype == torch.float32  # the master weights stay fp32 and get their gradient
    assert torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) > 0.99
