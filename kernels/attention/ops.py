"""Attention op: input validation, the Triton autograd.Function, and the public functional API.

Legend (shape suffixes):
    B batch   T queries   S keys   H query heads   Hk key heads   Hv value heads
    d query/key head dim   dv value head dim

Validation reads the head maps and positions (a host sync) so that a bad index becomes a
``ValueError`` naming the argument instead of an out-of-bounds read inside a kernel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kernels import resolve_backend
from kernels.attention.backends import attention_flash_attn, attention_sdpa
from kernels.attention.reference import attention_reference

BACKENDS = ("triton", "sdpa", "flash_attn", "reference")
ENTROPY_BACKENDS = ("triton", "torch")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


@dataclass
class _Args:
    """Normalised inputs: explicit int64 maps on q's device; pos_BT None means S - T + i."""

    k_head_H: torch.Tensor
    v_head_H: torch.Tensor
    pos_BT: torch.Tensor | None
    scale: float
    default_k: bool  # k_head is the GQA map h // (H // Hk)
    default_v: bool

    def positions(self, B: int, T: int, S: int, device) -> torch.Tensor:
        """pos_BT, materialised for the torch backends."""
        if self.pos_BT is not None:
            return self.pos_BT
        return (S - T + torch.arange(T, device=device)).expand(B, T)


def _gqa_map(H: int, Hn: int, device) -> torch.Tensor:
    return torch.arange(H, device=device) // (H // Hn)


def _head_map(name: str, map_H, H: int, Hn: int, device) -> tuple[torch.Tensor, bool]:
    if map_H is None:
        if Hn == 0 or H % Hn:
            raise ValueError(f"{name}: the default map h // (H // {Hn}) needs H={H} divisible by {Hn}; "
                             f"pass {name} explicitly")
        return _gqa_map(H, Hn, device), True
    map_H = torch.as_tensor(map_H, device=device)
    if map_H.dtype not in INT_DTYPES:
        raise ValueError(f"{name} must be an integer tensor, got {map_H.dtype}")
    if map_H.shape != (H,):
        raise ValueError(f"{name} must have shape (H,) = ({H},), got {tuple(map_H.shape)}")
    if H and (int(map_H.min()) < 0 or int(map_H.max()) >= Hn):
        raise ValueError(f"{name} values must lie in [0, {Hn}), got range [{int(map_H.min())}, {int(map_H.max())}]")
    return map_H.long(), False


def _validate(q, k, v, k_head, v_head, q_positions, causal, softmax_scale) -> _Args:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (batch, length, heads, head_dim), "
                             f"got {getattr(x, 'shape', type(x))}")
        if x.dtype not in FLOAT_DTYPES + (torch.float64,):
            raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, T, H, d = q.shape
    if k.shape[0] != B:
        raise ValueError(f"k batch {k.shape[0]} != q batch {B}")
    if v.shape[0] != B:
        raise ValueError(f"v batch {v.shape[0]} != q batch {B}")
    if k.shape[3] != d:
        raise ValueError(f"k head dim {k.shape[3]} != q head dim {d}")
    S = k.shape[1]
    if v.shape[1] != S:
        raise ValueError(f"v length {v.shape[1]} != k length {S}")
    if S == 0:
        raise ValueError("k must hold at least one key (S >= 1)")
    k_head_H, default_k = _head_map("k_head", k_head, H, k.shape[2], q.device)
    v_head_H, default_v = _head_map("v_head", v_head, H, v.shape[2], q.device)
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
    if not math.isfinite(scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    pos_BT = None
    if q_positions is None:
        if causal and T > S:
            raise ValueError(f"q_positions: the default positions S - T + i need T <= S (T={T}, S={S}); "
                             "pass q_positions explicitly")
    else:
        pos_BT = torch.as_tensor(q_positions, device=q.device)
        if pos_BT.dtype not in INT_DTYPES:
            raise ValueError(f"q_positions must be an integer tensor, got {pos_BT.dtype}")
        if pos_BT.shape != (B, T):
            raise ValueError(f"q_positions must have shape (B, T) = ({B}, {T}), got {tuple(pos_BT.shape)}")
        if pos_BT.numel() and (int(pos_BT.min()) < 0 or int(pos_BT.max()) >= S):
            raise ValueError(f"q_positions values must lie in [0, S={S}), got range "
                             f"[{int(pos_BT.min())}, {int(pos_BT.max())}]")
        pos_BT = pos_BT.long()
    return _Args(k_head_H, v_head_H, pos_BT, scale, default_k, default_v)


class FlashAttentionFunction(torch.autograd.Function):
    """Triton forward (out, lse) and backward (dq, dk, dv); lse is not differentiable."""

    @staticmethod
    def forward(ctx, q_BTHd, k_BSHkd, v_BSHvdv, k_head_H, v_head_H, pos_BT, causal: bool, scale: float,
                shared_map: bool):
        from kernels.attention.flash import flash_fwd

        out_BTHdv, lse_BHT = flash_fwd(q_BTHd, k_BSHkd, v_BSHvdv, k_head_H, v_head_H, pos_BT, causal, scale)
        ctx.save_for_backward(q_BTHd, k_BSHkd, v_BSHvdv, out_BTHdv, lse_BHT, k_head_H, v_head_H, pos_BT)
        ctx.causal, ctx.scale, ctx.shared_map = causal, scale, shared_map
        ctx.mark_non_differentiable(lse_BHT)
        return out_BTHdv, lse_BHT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout_BTHdv, _dlse):
        from kernels.attention.flash_bwd import flash_bwd

        q, k, v, out, lse, k_head_H, v_head_H, pos_BT = ctx.saved_tensors
        dq, dk, dv = flash_bwd(dout_BTHdv.to(q.dtype), q, k, v, out, lse, k_head_H, v_head_H, pos_BT,
                               ctx.causal, ctx.scale, ctx.shared_map)
        return dq, dk, dv, None, None, None, None, None, None


def _attention_triton(q, k, v, a: _Args, causal: bool):
    if q.dtype == torch.float64:
        raise ValueError("backend='triton' supports fp16, bf16 and fp32; use backend='reference' for fp64")
    # one dK/dV launch when every query head reads K and V from the same head index
    shared_map = k.shape[2] == v.shape[2] and (
        (a.default_k and a.default_v) or bool(torch.equal(a.k_head_H, a.v_head_H)))
    pos = None if a.pos_BT is None else a.pos_BT.to(torch.int32).contiguous()
    return FlashAttentionFunction.apply(q, k, v, a.k_head_H.to(torch.int32), a.v_head_H.to(torch.int32), pos,
                                        causal, a.scale, shared_map)


def attention(q, k, v, *, causal=True, k_head=None, v_head=None, q_positions=None, softmax_scale=None,
              return_lse=False, backend="auto"):
    """Scaled dot-product attention with decoupled key/value head maps and sparse query positions.

    Args:
        q: (B, T, H, d) queries.   k: (B, S, Hk, d) keys.   v: (B, S, Hv, dv) values.
        causal: query i sees key j iff j <= q_positions[b, i].
        k_head, v_head: int (H,) maps from query head to key head in [0, Hk) / value head in
            [0, Hv). Default: the GQA map h // (H // Hk) (resp. Hv). They may differ and need
            not be contiguous groups (DHA, METHODS.md §4 / §9.4).
        q_positions: int (B, T) key position of each query (token-sparse loops, §9.3).
            Default S - T + i: T == S is ordinary causal attention, T < S decoding with a cache.
        softmax_scale: default d ** -0.5.
        return_lse: also return the log-sum-exp (B, H, T) in fp32 (not differentiable).
        backend: "triton" | "sdpa" (index_select-expanded K/V + SDPA) | "flash_attn" (plain GQA
            maps and default positions only) | "reference" (fp32 softmax(QKᵀ)V) | "auto"
            (Triton on CUDA, SDPA on CPU).

    Returns:
        out (B, T, H, dv) in q's dtype, or (out, lse) when ``return_lse``.
    """
    a = _validate(q, k, v, k_head, v_head, q_positions, causal, softmax_scale)
    backend = resolve_backend(backend, q.device, BACKENDS, cpu_default="sdpa")
    B, T, _, _ = q.shape
    S = k.shape[1]
    if backend == "triton":
        out, lse = _attention_triton(q, k, v, a, causal)
    elif backend == "sdpa":
        out, lse = attention_sdpa(q, k, v, a.k_head_H, a.v_head_H, a.positions(B, T, S, q.device), causal, a.scale,
                                  a.pos_BT is None, return_lse, plain_gqa=a.default_k and a.default_v and k.shape[2] == v.shape[2])
    elif backend == "flash_attn":
        for name, is_default in (("k_head", a.default_k), ("v_head", a.default_v), ("q_positions", a.pos_BT is None)):
            if not is_default:
                raise ValueError(f"backend='flash_attn' supports only the default {name}; use backend='triton'")
        out, lse = attention_flash_attn(q, k, v, causal, a.scale, return_lse)
    else:
        out, lse = attention_reference(q, k, v, a.k_head_H, a.v_head_H, a.positions(B, T, S, q.device), causal,
                                       a.scale)
        out, lse = out.to(q.dtype), lse.float()
    return (out, lse) if return_lse else out


@torch.no_grad()
def last_row_attention_entropy(q, k, *, k_head=None, softmax_scale=None, backend="auto"):
    """Normalised softmax entropy of the last query row, per head (SGT, METHODS.md §6(a), §9.2).

    Ent[b, h] = −Σ_j p_j log p_j / log S with p = softmax(scale · q[b, T-1, h] · k[b, :, k_head[h]]ᵀ)
    over all S keys (the last query sees every key). Averaging over the batch is the caller's.
    0 when S == 1. Never differentiable (the statistic is taken under no_grad).

    Args:
        q: (B, T, H, d), only row T-1 is read.  k: (B, S, Hk, d).  k_head: int (H,), default GQA map.
        backend: "triton" (CUDA, or CPU under the interpreter) | "torch" | "auto".

    Returns:
        ent (B, H) fp32 in [0, 1].

    The Triton path never forms the 1×S probabilities either: with v = k, one flash pass gives
    lse and o = Σ p_j k_j, and H = lse − Σ p_j s_j = lse − scale · q·o.
    """
    a = _validate(q, k, k, k_head, k_head, None, False, softmax_scale)
    backend = resolve_backend(backend, q.device, ENTROPY_BACKENDS, cpu_default="torch")
    B, T, H, d = q.shape
    S = k.shape[1]
    if T == 0:
        raise ValueError("q must hold at least one query row (T >= 1)")
    q_B1Hd, k_BSHkd = q[:, -1:].float(), k.float()  # fp32: the entropy is a difference of O(10) terms
    if backend == "triton":
        from kernels.attention.flash import flash_fwd

        kh = a.k_head_H.to(torch.int32)
        o_B1Hd, lse_BH1 = flash_fwd(q_B1Hd, k_BSHkd, k_BSHkd, kh, kh, None, False, a.scale)
        ent_BH = lse_BH1[:, :, 0] - a.scale * (q_B1Hd[:, 0] * o_B1Hd[:, 0]).sum(-1)
    else:
        scores_BHS = a.scale * torch.einsum("bhd,bshd->bhs", q_B1Hd[:, 0], k_BSHkd.index_select(2, a.k_head_H))
        logp_BHS = torch.log_softmax(scores_BHS, dim=-1)
        ent_BH = -(logp_BHS.exp() * logp_BHS).sum(-1)
    if S == 1:
        return torch.zeros(B, H, device=q.device)
    return (ent_BH / math.log(S)).clamp_(0.0, 1.0)
