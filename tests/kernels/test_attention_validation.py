"""Input validation of kernels.attention: one test per rule, each a ValueError naming the argument.

Legend: B batch, T queries, S keys, H query heads, Hk key heads, Hv value heads, d / dv head dims.
"""

from __future__ import annotations

import pytest
import torch

from kernels.attention import attention, last_row_attention_entropy

B, T, S, H, Hk, Hv, d, dv = 2, 5, 7, 4, 2, 2, 8, 8


def inputs(**shapes):
    s = dict(B=B, T=T, S=S, H=H, Hk=Hk, Hv=Hv, d=d, dv=dv) | shapes
    q = torch.randn(s["B"], s["T"], s["H"], s["d"])
    k = torch.randn(s["B"], s["S"], s["Hk"], s["d"])
    v = torch.randn(s["B"], s["S"], s["Hv"], s["dv"])
    return q, k, v


@pytest.fixture(params=["sdpa", "triton"])
def backend(request):
    """Validation runs before dispatch: every rule holds for every backend."""
    return request.param


def test_k_head_out_of_range(backend):
    q, k, v = inputs()
    with pytest.raises(ValueError, match="k_head values"):
        attention(q, k, v, k_head=torch.tensor([0, 1, 2, 0]), backend=backend)
    with pytest.raises(ValueError, match="k_head values"):
        attention(q, k, v, k_head=torch.tensor([0, -1, 1, 0]), backend=backend)


def test_v_head_out_of_range(backend):
    q, k, v = inputs()
    with pytest.raises(ValueError, match="v_head values"):
        attention(q, k, v, v_head=torch.tensor([0, 1, 1, Hv]), backend=backend)


def test_head_map_shape():
    q, k, v = inputs()
    with pytest.raises(ValueError, match=r"k_head must have shape \(H,\)"):
        attention(q, k, v, k_head=torch.tensor([0, 1]))


def test_head_map_dtype():
    q, k, v = inputs()
    with pytest.raises(ValueError, match="v_head must be an integer tensor"):
        attention(q, k, v, v_head=torch.tensor([0.0, 1.0, 1.0, 0.0]))


def test_default_map_needs_divisible_heads():
    q, k, v = inputs(Hk=3)
    with pytest.raises(ValueError, match="k_head: the default map"):
        attention(q, k, v)


def test_batch_mismatch_k():
    q, _, v = inputs()
    _, k, _ = inputs(B=3)
    with pytest.raises(ValueError, match="k batch"):
        attention(q, k, v)


def test_batch_mismatch_v():
    q, k, _ = inputs()
    _, _, v = inputs(B=1)
    with pytest.raises(ValueError, match="v batch"):
        attention(q, k, v)


def test_head_dim_mismatch():
    q, _, v = inputs()
    _, k, _ = inputs(d=16)
    with pytest.raises(ValueError, match="k head dim"):
        attention(q, k, v)


def test_key_value_length_mismatch():
    q, k, _ = inputs()
    _, _, v = inputs(S=S + 1)
    with pytest.raises(ValueError, match="v length"):
        attention(q, k, v)


def test_empty_keys():
    q, k, v = inputs(S=0)
    with pytest.raises(ValueError, match="k must hold at least one key"):
        attention(q, k, v, causal=False)


def test_rank_must_be_4():
    q, k, v = inputs()
    with pytest.raises(ValueError, match="q must be a 4-D tensor"):
        attention(q[0], k, v)


def test_dtype_mismatch():
    q, k, v = inputs()
    with pytest.raises(ValueError, match="q, k, v must share a dtype"):
        attention(q.half(), k, v)


def test_positions_out_of_range(backend):
    q, k, v = inputs()
    pos = torch.arange(T).expand(B, T).clone()
    pos[1, 3] = S
    with pytest.raises(ValueError, match="q_positions values"):
        attention(q, k, v, q_positions=pos, backend=backend)
    pos[1, 3] = -1
    with pytest.raises(ValueError, match="q_positions values"):
        attention(q, k, v, q_positions=pos, backend=backend)


def test_positions_shape():
    q, k, v = inputs()
    with pytest.raises(ValueError, match=r"q_positions must have shape \(B, T\)"):
        attention(q, k, v, q_positions=torch.arange(T))


def test_positions_dtype():
    q, k, v = inputs()
    with pytest.raises(ValueError, match="q_positions must be an integer tensor"):
        attention(q, k, v, q_positions=torch.zeros(B, T))


def test_default_positions_need_t_le_s():
    q, k, v = inputs(T=S + 2)
    with pytest.raises(ValueError, match="q_positions: the default positions"):
        attention(q, k, v)


@pytest.mark.parametrize("scale", [float("inf"), float("nan"), float("-inf")])
def test_non_finite_scale(scale, backend):
    q, k, v = inputs()
    with pytest.raises(ValueError, match="softmax_scale must be finite"):
        attention(q, k, v, softmax_scale=scale, backend=backend)


def test_unknown_backend():
    q, k, v = inputs()
    with pytest.raises(ValueError, match="backend='cudnn' is not one of"):
        attention(q, k, v, backend="cudnn")


def test_triton_rejects_fp64():
    q, k, v = inputs()
    with pytest.raises(ValueError, match="backend='triton' supports fp16, bf16 and fp32"):
        attention(q.double(), k.double(), v.double(), backend="triton")


def test_flash_attn_rejects_decoupled_maps():
    q, k, v = inputs()
    with pytest.raises(ValueError, match="backend='flash_attn' supports only the default k_head"):
        attention(q, k, v, k_head=torch.tensor([1, 0, 1, 0]), backend="flash_attn")
    with pytest.raises(ValueError, match="backend='flash_attn' supports only the default q_positions"):
        attention(q, k, v, q_positions=torch.arange(T).expand(B, T), backend="flash_attn")


def test_flash_attn_needs_package_or_cuda():
    q, k, v = inputs()
    with pytest.raises(ValueError, match="backend='flash_attn' needs"):
        attention(q, k, v, backend="flash_attn")


def test_entropy_validates_k_head():
    q, k, _ = inputs()
    with pytest.raises(ValueError, match="k_head values"):
        last_row_attention_entropy(q, k, k_head=torch.tensor([0, 1, 2, 3]))
