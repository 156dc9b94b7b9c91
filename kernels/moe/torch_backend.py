"""Torch backend for the expert MLP: sort by expert, then grouped matmuls (plain autograd).

Legend (shape suffixes):
    N tokens   k slots/token   M = N·k slots   S kept slots (id != -1)   E experts
    D model width   F expert hidden width   H = 2F (SwiGLU) or F (GELU)

Uses ``torch._grouped_mm`` when a probe on this device and dtype shows it works forward and
backward (torch 2.13's CPU build has it; CUDA builds restrict dtype and alignment), otherwise one
matmul per expert. This is the CPU default of ``expert_mlp`` and the GPU baseline of the benchmark.
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn

from kernels.moe.routing import route

_GROUPED_MM_OK: dict[tuple[str, torch.dtype], bool] = {}


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: _grouped_mm's backward rejects the
    expanded (stride-0) gradients that e.g. ``y.sum().backward()`` produces."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def _loop_mm(a_SK, w_EKJ, counts):
    # every expert appears, even with 0 rows, so each w[e] stays in the graph (zero gradient)
    outs, start = [], 0
    for e, c in enumerate(counts):
        outs.append(a_SK[start:start + c] @ w_EKJ[e])
        start += c
    return torch.cat(outs)


def _grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Probe once per (device type, dtype): forward and backward against a per-expert loop."""
    key = (device.type, dtype)
    if key not in _GROUPED_MM_OK:
        ok = hasattr(torch, "_grouped_mm")
        if ok:
            try:
                g = torch.Generator().manual_seed(0)
                a = torch.randn(24, 16, generator=g).to(device, dtype).requires_grad_()
                w = torch.randn(3, 16, 16, generator=g).to(device, dtype).requires_grad_()
                offs = torch.tensor([8, 8, 24], dtype=torch.int32, device=device)
                out = torch._grouped_mm(a, w, offs=offs)
                ref = _loop_mm(a.detach(), w.detach(), [8, 0, 16])
                out.backward(torch.ones_like(out))
                ok = bool(torch.allclose(out.float(), ref.float(), rtol=5e-2, atol=5e-2)) and w.grad is not None
            except (RuntimeError, TypeError, NotImplementedError):
                ok = False
        _GROUPED_MM_OK[key] = ok
    return _GROUPED_MM_OK[key]


def grouped_matmul(a_SK, w_EKJ, offsets_E1, counts: list[int], use_grouped_mm: bool = True) -> torch.Tensor:
    """out[rows of expert e] = a[rows of expert e] @ w[e]; rows are grouped by expert in order."""
    K, J = w_EKJ.shape[1], w_EKJ.shape[2]
    aligned = K % 8 == 0 and J % 8 == 0  # CUDA grouped GEMMs want 16-byte aligned rows
    if use_grouped_mm and a_SK.shape[0] > 0 and aligned and _grouped_mm_works(a_SK.device, a_SK.dtype):
        try:
            out = torch._grouped_mm(a_SK, w_EKJ, offs=offsets_E1[1:].to(torch.int32))
            return _ContiguousGrad.apply(out)
        except RuntimeError:  # a shape/layout limit the small probe did not hit: loop instead
            pass
    return _loop_mm(a_SK, w_EKJ, counts)


def expert_mlp_torch(x_ND, expert_ids_NK, expert_weights_NK, w_in_EDH, w_out_EFD, activation="swiglu",
                     use_grouped_mm: bool = True):
    """Same contract as ``kernels.moe.expert_mlp`` (inputs already validated). use_grouped_mm=False
    forces the per-expert loop (the benchmark's loop baseline)."""
    N, k = expert_ids_NK.shape
    E, D = w_in_EDH.shape[0], x_ND.shape[1]
    r = route(expert_ids_NK, E, backend="torch")
    counts = r.counts_E.tolist()  # host sync: fine for the torch path (the loop needs it anyway)
    slot_S = r.sorted_slot_M[: sum(counts)].long()
    tok_S = slot_S // k
    h_SH = grouped_matmul(x_ND.index_select(0, tok_S), w_in_EDH, r.offsets_E1, counts, use_grouped_mm)
    if activation == "swiglu":
        gate_SF, up_SF = h_SH.chunk(2, dim=1)
        a_SF = Fn.silu(gate_SF) * up_SF
    else:
        a_SF = Fn.gelu(h_SH)
    o_SD = grouped_matmul(a_SF, w_out_EFD, r.offsets_E1, counts, use_grouped_mm)
    # back to slot order (dropped slots stay zero), then gate and sum over k in one batched matmul:
    # deterministic, unlike index_add on CUDA, and one pass instead of multiply + sum
    o_MD = o_SD.new_zeros((N * k, D)).index_copy(0, slot_S, o_SD)
    gates_N1K = expert_weights_NK.to(o_MD.dtype).view(N, 1, k)
    return torch.bmm(gates_N1K, o_MD.view(N, k, D)).view(N, D)
