"""Attention op: input validation, the non-finite contract, and the public functional API.

Legend (shape suffixes):
    B batch   T queries   S keys   H query heads   Hk key heads   Hv value heads
    d query/key head dim   dv value head dim

No host synchronisation on the hot path: shapes are checked with Python ints; head maps and
positions are range-checked on the host only when their values are already there (Python
lists, CPU tensors); device-resident maps / positions are checked on the device instead (an
out-of-range entry turns the rows it touches into NaN rows, and the index is clamped so no
kernel reads out of bounds). ``KERNELS_DEBUG=1`` adds the host checks for device tensors too
(one sync each) and raises ``ValueError`` like the CPU path.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from kernels import resolve_backend
from kernels.attention.backends import attention_flash_attn, attention_sdpa
from kernels.attention.flash import first_nonfinite_key
from kernels.attention.reference import attention_reference

BACKENDS = ("triton", "sdpa", "flash_attn", "reference")
ENTROPY_BACKENDS = ("triton", "torch")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
DEBUG_ENV = "KERNELS_DEBUG"


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "0") == "1"


def _compiling() -> bool:
    return torch.compiler.is_compiling()


@dataclass
class _Args:
    """Normalised inputs: int64 maps on q's device (clamped to range); pos_BT None means S - T + i."""

    k_head_H: torch.Tensor
    v_head_H: torch.Tensor
    pos_BT: torch.Tensor | None
    scale: float
    default_k: bool  # k_head is the GQA map h // (H // Hk)
    default_v: bool
    shared_map: bool  # k_head == v_head and Hk == Hv, known on the host
    bad_head_H: torch.Tensor | None  # heads whose device map entry was out of range (not host-checked)

    def positions(self, B: int, T: int, S: int, device) -> torch.Tensor:
        """pos_BT, materialised for the torch backends (explicit ones clamped to [0, S))."""
        if self.pos_BT is not None:
            return self.pos_BT.clamp(0, S - 1)
        return (S - T + torch.arange(T, device=device)).expand(B, T)


def _gqa_map(H: int, Hn: int, device) -> torch.Tensor:
    return torch.arange(H, device=device) // (H // Hn)


def _host_readable(x: torch.Tensor) -> bool:
    """Values can be read without a device sync (and without breaking a torch.compile graph)."""
    return x.device.type == "cpu" and not _compiling()


def _check_range(name: str, x: torch.Tensor, hi: int, what: str) -> None:
    lo_v, hi_v = int(x.min()), int(x.max())
    if lo_v < 0 or hi_v >= hi:
        raise ValueError(f"{name} values must lie in [0, {what}), got range [{lo_v}, {hi_v}]")


def _head_map(name: str, map_H, H: int, Hn: int, device):
    """(map_H int64 on `device`, is_default, host copy or None, out-of-range mask or None)."""
    if map_H is None:
        if Hn == 0 or H % Hn:
            raise ValueError(
                f"{name}: the default map h // (H // {Hn}) needs H={H} divisible by {Hn}; pass {name} explicitly"
            )
        return _gqa_map(H, Hn, device), True, None, None
    if not isinstance(map_H, torch.Tensor):
        map_H = torch.as_tensor(map_H)  # a Python sequence: its values are on the host
    if map_H.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor (no values); pass a cpu or cuda integer tensor")
    if map_H.dtype not in INT_DTYPES:
        raise ValueError(f"{name} must be an integer tensor, got {map_H.dtype}")
    if map_H.shape != (H,):
        raise ValueError(f"{name} must have shape (H,) = ({H},), got {tuple(map_H.shape)}")
    host = map_H if _host_readable(map_H) else None
    if host is not None or _debug():
        _check_range(name, map_H, Hn, str(Hn))
        return map_H.to(device).long(), False, host, None
    map_H = map_H.to(device).long()
    bad_H = (map_H < 0) | (map_H >= Hn)
    return map_H.clamp(0, Hn - 1), False, None, bad_H


def _check_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(
            f"{name} must be a 4-D tensor (batch, length, heads, head_dim), got {getattr(x, 'shape', type(x))}"
        )
    if x.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if x.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor (shape only, no values); attention needs cpu or cuda tensors")
    for dim, size in zip(("batch", "length", "heads", "head_dim"), x.shape):
        if size == 0 and name == "k" and dim == "length":
            raise ValueError(f"k must hold at least one key (S >= 1), got shape {tuple(x.shape)}")
        if size == 0:
            raise ValueError(f"{name} has {dim} 0 (shape {tuple(x.shape)}); every dimension must be >= 1")


def _scale(softmax_scale, d: int) -> float:
    if softmax_scale is None:
        return d**-0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a Python float (or None for d ** -0.5), got {type(softmax_scale)}")
    scale = float(softmax_scale)
    if not math.isfinite(scale) or scale <= 0:
        # a zero / negative scale flattens or inverts the softmax (CPU SDPA then returns NaN)
        raise ValueError(f"softmax_scale must be finite and > 0, got {softmax_scale}")
    return scale


def _validate(q, k, v, k_head, v_head, q_positions, causal, softmax_scale) -> _Args:
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x)
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
    S, Hk, Hv = k.shape[1], k.shape[2], v.shape[2]
    if v.shape[1] != S:
        raise ValueError(f"v length {v.shape[1]} != k length {S}")
    k_head_H, default_k, host_k, bad_k = _head_map("k_head", k_head, H, Hk, q.device)
    v_head_H, default_v, host_v, bad_v = _head_map("v_head", v_head, H, Hv, q.device)
    scale = _scale(softmax_scale, d)
    # one fused dK/dV launch needs k_head == v_head, decided from host values only (no sync)
    same = (
        (default_k and default_v)
        or (k_head is v_head and k_head is not None)
        or (host_k is not None and host_v is not None and torch.equal(host_k.long(), host_v.long()))
    )
    shared_map = Hk == Hv and same
    if shared_map:
        v_head_H = k_head_H
    bad_head_H = bad_k if bad_v is None else (bad_v if bad_k is None else bad_k | bad_v)
    pos_BT = None
    if q_positions is None:
        if causal and T > S:
            raise ValueError(
                f"q_positions: the default positions S - T + i need T <= S (T={T}, S={S}); pass q_positions explicitly"
            )
    else:
        pos_BT = q_positions if isinstance(q_positions, torch.Tensor) else torch.as_tensor(q_positions)
        if pos_BT.device.type == "meta":
            raise ValueError("q_positions is a meta tensor (no values); pass a cpu or cuda integer tensor")
        if pos_BT.dtype not in INT_DTYPES:
            raise ValueError(f"q_positions must be an integer tensor, got {pos_BT.dtype}")
        if pos_BT.shape != (B, T):
            raise ValueError(f"q_positions must have shape (B, T) = ({B}, {T}), got {tuple(pos_BT.shape)}")
        if _host_readable(pos_BT) or _debug():
            _check_range("q_positions", pos_BT, S, f"S={S}")
        pos_BT = pos_BT.to(q.device).long()  # unchecked device values: out-of-range rows become NaN rows
    return _Args(k_head_H, v_head_H, pos_BT, scale, default_k, default_v, shared_map, bad_head_H)


def _first_bad(k, v, a: _Args) -> torch.Tensor:
    """first_bad_BH int32: first non-finite key position seen through each head's maps (S if none);
    -1 for heads whose map entry was out of range (every row of those heads is a NaN row)."""
    first_BH = first_nonfinite_key(k, v, a.k_head_H, a.v_head_H)
    if a.bad_head_H is not None:
        first_BH = torch.where(a.bad_head_H[None, :], torch.full_like(first_BH, -1), first_BH)
    return first_BH


def _nan_rows(q, a: _Args, first_bad_BH, causal: bool, S: int) -> torch.Tensor:
    """bad_BTH: rows the contract makes all-NaN (a non-finite query, a non-finite key/value at a
    visible position, an out-of-range position or head map entry)."""
    B, T, H, _ = q.shape
    if causal:
        bad_BTH = first_bad_BH[:, None, :] <= a.positions(B, T, S, q.device)[:, :, None]
    else:
        bad_BTH = (first_bad_BH < S)[:, None, :].expand(B, T, H)
    bad_BTH = bad_BTH | ~torch.isfinite(q).all(-1)
    if a.pos_BT is not None:
        bad_BTH = bad_BTH | ((a.pos_BT < 0) | (a.pos_BT >= S))[:, :, None]
    return bad_BTH


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def _attention_triton(q, k, v, a: _Args, causal: bool, deterministic: bool):
    from kernels.attention.library import attention_fwd

    if q.dtype == torch.float64:
        raise ValueError("backend='triton' supports fp16, bf16 and fp32; use backend='reference' for fp64")
    k_head_H = a.k_head_H.to(torch.int32)
    v_head_H = k_head_H if a.shared_map else a.v_head_H.to(torch.int32)
    pos = None if a.pos_BT is None else a.pos_BT.to(torch.int32).contiguous()
    return attention_fwd(
        q,
        k,
        v,
        k_head_H,
        v_head_H,
        pos,
        _first_bad(k, v, a).to(torch.int32),
        causal,
        a.scale,
        a.shared_map,
        deterministic,
    )


def attention(
    q,
    k,
    v,
    *,
    causal=True,
    k_head=None,
    v_head=None,
    q_positions=None,
    softmax_scale=None,
    return_lse=False,
    backend="auto",
    deterministic=True,
):
    """Scaled dot-product attention with decoupled key/value head maps and sparse query positions.

    Args:
        q: (B, T, H, d) queries.   k: (B, S, Hk, d) keys.   v: (B, S, Hv, dv) values. Every
            dimension >= 1; real (not meta) tensors on one device, one float dtype.
        causal: query i sees key j iff j <= q_positions[b, i]; otherwise it sees every key.
        k_head, v_head: int (H,) maps from query head to key head in [0, Hk) / value head in
            [0, Hv). Default: the GQA map h // (H // Hk) (resp. Hv). They may differ and need
            not be contiguous groups (DHA, METHODS.md §4 / §9.4).
        q_positions: int (B, T) key position of each query in [0, S) (token-sparse loops, §9.3).
            Default S - T + i: T == S is ordinary causal attention, T < S decoding with a cache.
        softmax_scale: a Python float > 0; default d ** -0.5.
        return_lse: also return the log-sum-exp (B, H, T) in fp32 (not differentiable).
        backend: "triton" (the ``sparse_arch::attention_fwd`` torch.library op: one graph node
            under torch.compile) | "sdpa" (index_select-expanded K/V + SDPA) | "flash_attn"
            (plain GQA maps and default positions only) | "reference" (fp32 softmax(QKᵀ)V) |
            "auto" (Triton on CUDA, SDPA on CPU).
        deterministic: Triton backward only. True (default): bit-identical gradients run to run
            (a separate dQ pass, no atomics). False: FlashAttention-2's single pass, dQ added
            with fp32 atomics (5 instead of 7 matmuls per block pair; dQ's rounding varies).

    Non-finite inputs (the same on every backend): output row (b, i, h) (and its lse) is all NaN
    exactly when q[b, i, h] holds a NaN or ±inf, or a key k[b, j, k_head[h]] or value
    v[b, j, v_head[h]] at a position j the row sees holds one. Every other row is computed as if
    the positions it does not see (causal future keys) did not exist, whatever they hold: they
    contribute exactly nothing. Gradients are defined for finite inputs; NaN rows give NaN
    gradients wherever they reach. Head-map or position entries out of range raise ValueError
    when their values are on the host (lists, CPU tensors, or any tensor with KERNELS_DEBUG=1);
    device-resident ones are checked on the device without a sync and give NaN rows instead.

    Returns:
        out (B, T, H, dv) in q's dtype, or (out, lse) when ``return_lse``.
    """
    a = _validate(q, k, v, k_head, v_head, q_positions, causal, softmax_scale)
    backend = resolve_backend(backend, q.device, BACKENDS, cpu_default="sdpa")
    if backend == "triton":
        out, lse = _attention_triton(q, k, v, a, causal, bool(deterministic))
        return (out, lse) if return_lse else out
    if backend == "flash_attn":
        for name, is_default in (("k_head", a.default_k), ("v_head", a.default_v), ("q_positions", a.pos_BT is None)):
            if not is_default:
                raise ValueError(f"backend='flash_attn' supports only the default {name}; use backend='triton'")
    # torch backends: the contract above by construction. Non-finite K/V are zeroed (a masked
    # 0·inf would otherwise poison rows that never see them) and the NaN rows are set afterwards.
    B, T, _, _ = q.shape
    S = k.shape[1]
    bad_BTH = _nan_rows(q, a, _first_bad(k, v, a), causal, S)
    k_ok, v_ok = _finite(k), _finite(v)
    if backend == "sdpa":
        out, lse = attention_sdpa(
            q,
            k_ok,
            v_ok,
            a.k_head_H,
            a.v_head_H,
            a.positions(B, T, S, q.device),
            causal,
            a.scale,
            a.pos_BT is None,
            return_lse,
            plain_gqa=a.default_k and a.default_v and k.shape[2] == v.shape[2],
        )
    elif backend == "flash_attn":
        out, lse = attention_flash_attn(q, k_ok, v_ok, causal, a.scale, return_lse)
    else:
        out, lse = attention_reference(
            q, k_ok, v_ok, a.k_head_H, a.v_head_H, a.positions(B, T, S, q.device), causal, a.scale
        )
        out, lse = out.to(q.dtype), lse.float()
    out = torch.where(bad_BTH[..., None], torch.full_like(out, float("nan")), out)
    if not return_lse:
        return out
    return out, torch.where(bad_BTH.transpose(1, 2), torch.full_like(lse, float("nan")), lse)


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
        ent_BH = torch.zeros(B, H, device=q.device)
    else:
        ent_BH = (ent_BH / math.log(S)).clamp_(0.0, 1.0)
    if a.bad_head_H is not None:  # a device map entry out of range (not host-checked): NaN, not a clamped head
        ent_BH = torch.where(a.bad_head_H[None, :], torch.full_like(ent_BH, float("nan")), ent_BH)
    return ent_BH
