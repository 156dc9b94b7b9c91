"""Expert MLP op: input validation, the torch.library ops, and the public ``expert_mlp``.

Legend (shape suffixes):
    N tokens   k slots/token (runtime)   M = N·k slots   E experts   D model width
    F expert hidden width   H = 2F (SwiGLU: [gate | up]) or F (GELU)

The Triton path is the custom op ``sparse_arch::moe_triton_fwd`` (route → gather GEMM + act →
scatter GEMM + gate → combine) with registered autograd (``sparse_arch::moe_triton_bwd``). The
forward saves only the pre-activation h; the backward recomputes the activation from it. Under
torch.compile the torch path runs as ``sparse_arch::moe_torch`` so neither breaks the graph.
"""

from __future__ import annotations

import os

import torch

from kernels import resolve_backend
from kernels.moe.reference import expert_mlp_reference
from kernels.moe.routing import Routing, route
from kernels.moe.torch_backend import expert_mlp_torch

BACKENDS = ("triton", "torch", "reference")
ACTIVATIONS = ("swiglu", "gelu")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # float64: torch/reference only
ID_DTYPES = (torch.int32, torch.int64)


_Tensors4 = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # the ops' schemas need exact arity
_Tensors6 = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


# ---- torch.library ops: torch.compile(fullgraph=True) traces through them (fake impls give shapes) ----
# Triton path: the forward op also returns what the backward needs (h and the routing), so the
# registered autograd can save them; unneeded gradients come back as (0,)-shaped tensors.


@torch.library.custom_op("sparse_arch::moe_triton_fwd", mutates_args=())
def _triton_fwd(
    x_ND: torch.Tensor,
    ids_NK: torch.Tensor,
    gates_NK: torch.Tensor,
    w_in_EDH: torch.Tensor,
    w_out_EFD: torch.Tensor,
    swiglu: bool,
    need_h: bool,
) -> _Tensors6:
    """→ (y_ND, h_MH or (0, H), sorted_slot_M, counts_E, offsets_E1, invalid_1)."""
    from kernels.moe.grouped_gemm import combine, gather_act_fwd, scatter_gemm

    N, k = ids_NK.shape
    E = w_in_EDH.shape[0]
    ids_M, gates_M = ids_NK.reshape(-1), gates_NK.reshape(-1)
    r = route(ids_NK, E, backend="triton")
    h_MH, a_MF = gather_act_fwd(x_ND, w_in_EDH, r, k, swiglu, store_h=need_h)
    y_ND = combine(scatter_gemm(a_MF, w_out_EFD, r, gates_M), ids_M, N, k, E)
    if h_MH is None:
        h_MH = x_ND.new_empty((0, w_in_EDH.shape[2]))
    return (y_ND, h_MH, *r)


@_triton_fwd.register_fake
def _(x_ND, ids_NK, gates_NK, w_in_EDH, w_out_EFD, swiglu, need_h):
    M, E = ids_NK.numel(), w_in_EDH.shape[0]
    i32 = dict(dtype=torch.int32, device=x_ND.device)
    return (
        x_ND.new_empty(x_ND.shape),
        x_ND.new_empty((M if need_h else 0, w_in_EDH.shape[2])),
        torch.empty(M, **i32),
        torch.empty(E, **i32),
        torch.empty(E + 1, **i32),
        torch.empty(1, **i32),
    )


@torch.library.custom_op("sparse_arch::moe_triton_bwd", mutates_args=())
def _triton_bwd(
    dy_ND: torch.Tensor,
    x_ND: torch.Tensor,
    ids_NK: torch.Tensor,
    gates_NK: torch.Tensor,
    w_in_EDH: torch.Tensor,
    w_out_EFD: torch.Tensor,
    h_MH: torch.Tensor,
    sorted_slot_M: torch.Tensor,
    counts_E: torch.Tensor,
    offsets_E1: torch.Tensor,
    invalid_1: torch.Tensor,
    swiglu: bool,
    need_x: bool,
    need_g: bool,
    need_win: bool,
    need_wout: bool,
) -> _Tensors4:
    """→ (dx, dgates, dw_in, dw_out); an unneeded one is a (0,) tensor."""
    from kernels.moe.grouped_gemm import combine, scatter_gemm
    from kernels.moe.grouped_gemm_bwd import gather_act_bwd, grouped_dw

    r = Routing(sorted_slot_M, counts_E, offsets_E1, invalid_1)
    N, k = ids_NK.shape
    E = w_in_EDH.shape[0]
    ids_M, gates_M = ids_NK.reshape(-1), gates_NK.reshape(-1)
    dy_ND = dy_ND.contiguous().to(x_ND.dtype)
    empty = x_ND.new_empty(0)
    dx, dg, dw_in, dw_out = empty, gates_NK.new_empty(0), empty.clone(), empty.clone()
    a_MF = None
    if need_x or need_g or need_win or (need_wout and not swiglu):  # GELU: a_MF comes from here
        dh_MH, dgates_M, a_MF = gather_act_bwd(dy_ND, w_out_EFD, h_MH, gates_M, ids_M, r, k, swiglu)
        if need_x:  # dx[n] = Σ_j dh[p(n,j)] @ w_in[e]ᵀ: the forward scatter GEMM on transposed weights
            dx = combine(scatter_gemm(dh_MH, w_in_EDH.transpose(1, 2), r, None), ids_M, N, k, E)
        if need_g:
            dg = dgates_M.view(N, k).to(gates_NK.dtype)
        if need_win:
            dw_in = grouped_dw(x_ND, dh_MH, r, k, E, a_gather=True, b_gather=False)
    if need_wout:
        # SwiGLU: A = silu(g)·u recomputed from h inside the GEMM; GELU: a recomputed above
        dw_out = grouped_dw(
            h_MH if swiglu else a_MF,
            dy_ND,
            r,
            k,
            E,
            a_gather=False,
            b_gather=True,
            gates_M=gates_M,
            a_act="swiglu" if swiglu else None,
        )
    return dx, dg, dw_in, dw_out


@_triton_bwd.register_fake
def _(
    dy_ND,
    x_ND,
    ids_NK,
    gates_NK,
    w_in_EDH,
    w_out_EFD,
    h_MH,
    sorted_slot_M,
    counts_E,
    offsets_E1,
    invalid_1,
    swiglu,
    need_x,
    need_g,
    need_win,
    need_wout,
):
    def like(t, need):
        return t.new_empty(t.shape if need else (0,))

    return like(x_ND, need_x), like(gates_NK, need_g), like(w_in_EDH, need_win), like(w_out_EFD, need_wout)


def _triton_setup(ctx, inputs, output):
    x_ND, ids_NK, gates_NK, w_in_EDH, w_out_EFD, swiglu, _ = inputs
    ctx.save_for_backward(x_ND, ids_NK, gates_NK, w_in_EDH, w_out_EFD, *output[1:])
    ctx.swiglu = swiglu
    ctx.mark_non_differentiable(*output[1:])


def _triton_backward(ctx, dy_ND, *_):
    x_ND, ids_NK, gates_NK, w_in_EDH, w_out_EFD, h_MH, *routing = ctx.saved_tensors
    need_x, _, need_g, need_win, need_wout = ctx.needs_input_grad[:5]
    grads = _triton_bwd(
        dy_ND,
        x_ND,
        ids_NK,
        gates_NK,
        w_in_EDH,
        w_out_EFD,
        h_MH,
        *routing,
        ctx.swiglu,
        need_x,
        need_g,
        need_win,
        need_wout,
    )
    dx, dg, dw_in, dw_out = (g if need else None for g, need in zip(grads, (need_x, need_g, need_win, need_wout)))
    return dx, None, dg, dw_in, dw_out, None, None


_triton_fwd.register_autograd(_triton_backward, setup_context=_triton_setup)


# Torch path under torch.compile: the op's impl is expert_mlp_torch (opaque to the tracer, so its
# host-side bookkeeping does not break the graph); the backward recomputes it under torch.func.vjp.


@torch.library.custom_op("sparse_arch::moe_torch", mutates_args=())
def _torch_op(
    x_ND: torch.Tensor,
    ids_NK: torch.Tensor,
    gates_NK: torch.Tensor,
    w_in_EDH: torch.Tensor,
    w_out_EFD: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    return expert_mlp_torch(x_ND, ids_NK, gates_NK, w_in_EDH, w_out_EFD, activation)


@_torch_op.register_fake
def _(x_ND, ids_NK, gates_NK, w_in_EDH, w_out_EFD, activation):
    return x_ND.new_empty(x_ND.shape)


@torch.library.custom_op("sparse_arch::moe_torch_bwd", mutates_args=())
def _torch_bwd(
    dy_ND: torch.Tensor,
    x_ND: torch.Tensor,
    ids_NK: torch.Tensor,
    gates_NK: torch.Tensor,
    w_in_EDH: torch.Tensor,
    w_out_EFD: torch.Tensor,
    activation: str,
) -> _Tensors4:
    # the per-expert loop (use_grouped_mm=False): its autograd works under torch.func transforms
    def f(x, g, wi, wo):
        return expert_mlp_torch(x, ids_NK, g, wi, wo, activation, use_grouped_mm=False)

    _, vjp = torch.func.vjp(f, x_ND, gates_NK, w_in_EDH, w_out_EFD)
    return tuple(g.clone() for g in vjp(dy_ND.to(x_ND.dtype)))


@_torch_bwd.register_fake
def _(dy_ND, x_ND, ids_NK, gates_NK, w_in_EDH, w_out_EFD, activation):
    return tuple(t.new_empty(t.shape) for t in (x_ND, gates_NK, w_in_EDH, w_out_EFD))


def _torch_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])
    ctx.activation = inputs[5]


def _torch_backward(ctx, dy_ND):
    x_ND, ids_NK, gates_NK, w_in_EDH, w_out_EFD = ctx.saved_tensors
    dx, dg, dw_in, dw_out = _torch_bwd(dy_ND, x_ND, ids_NK, gates_NK, w_in_EDH, w_out_EFD, ctx.activation)
    return dx, None, dg, dw_in, dw_out, None


_torch_op.register_autograd(_torch_backward, setup_context=_torch_setup)


def expert_mlp_triton(x_ND, ids_NK, gates_NK, w_in_EDH, w_out_EFD, swiglu: bool) -> torch.Tensor:
    """The Triton path through its torch.library op (inputs already validated)."""
    need_h = torch.is_grad_enabled() and any(t.requires_grad for t in (x_ND, gates_NK, w_in_EDH, w_out_EFD))
    return _triton_fwd(x_ND, ids_NK, gates_NK, w_in_EDH, w_out_EFD, swiglu, need_h)[0]


def _fail(exc, name, msg):
    raise exc(f"expert_mlp: {name} {msg}")


def debug_checks_enabled() -> bool:
    """SPARSE_ARCH_DEBUG_CHECKS=1 turns on the checks that need device values (one host sync each)."""
    return os.environ.get("SPARSE_ARCH_DEBUG_CHECKS", "0") == "1"


def _check_inputs(x, expert_ids, expert_weights, w_in, w_out, activation, check_ids=False):
    """Validate everything before any kernel runs; every message names the argument and value.
    Only Python ints and metadata are read, except the id range check (check_ids: one host sync)."""
    if activation not in ACTIVATIONS:
        _fail(ValueError, "activation", f"must be one of {ACTIVATIONS}, got {activation!r}")
    named = dict(x=x, expert_ids=expert_ids, expert_weights=expert_weights, w_in=w_in, w_out=w_out)
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            _fail(TypeError, name, f"must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        _fail(TypeError, "x", f"dtype must be one of {FLOAT_DTYPES}, got {x.dtype}")
    if expert_ids.dtype not in ID_DTYPES:
        _fail(TypeError, "expert_ids", f"dtype must be int32 or int64, got {expert_ids.dtype}")
    if not expert_weights.is_floating_point():
        _fail(TypeError, "expert_weights", f"dtype must be floating point, got {expert_weights.dtype}")
    for name in ("w_in", "w_out"):
        if named[name].dtype != x.dtype:
            _fail(TypeError, name, f"dtype {named[name].dtype} must match x.dtype {x.dtype}")
    for name, t in named.items():
        if t.device.type == "meta":
            _fail(ValueError, name, "is on the meta device: expert_mlp needs real data (use a cpu or cuda tensor)")
        if t.device != x.device:
            _fail(ValueError, name, f"is on {t.device} but x is on {x.device}")
    if x.ndim != 2:
        _fail(ValueError, "x", f"must be 2-D (N, D), got shape {tuple(x.shape)}")
    if expert_ids.ndim != 2 or expert_ids.shape[0] != x.shape[0] or expert_ids.shape[1] < 1:
        _fail(ValueError, "expert_ids", f"must have shape (N={x.shape[0]}, k>=1), got {tuple(expert_ids.shape)}")
    if expert_weights.shape != expert_ids.shape:
        _fail(
            ValueError,
            "expert_weights",
            f"shape {tuple(expert_weights.shape)} must equal expert_ids shape {tuple(expert_ids.shape)}",
        )
    if w_in.ndim != 3 or w_in.shape[1] != x.shape[1] or min(w_in.shape) < 1:
        _fail(
            ValueError, "w_in", f"must have shape (E, D={x.shape[1]}, H) with positive sizes, got {tuple(w_in.shape)}"
        )
    E, H = w_in.shape[0], w_in.shape[2]
    F = H // 2 if activation == "swiglu" else H
    if activation == "swiglu" and H % 2:
        _fail(ValueError, "w_in", f"last dim must be 2F for swiglu (gate | up), got odd {H}")
    if w_out.ndim != 3 or tuple(w_out.shape) != (E, F, x.shape[1]):
        _fail(
            ValueError,
            "w_out",
            f"must have shape (E={E}, F={F}, D={x.shape[1]}) for {activation}, got {tuple(w_out.shape)}",
        )
    for name, t in named.items():
        if not t.is_contiguous():
            _fail(ValueError, name, f"must be contiguous (call .contiguous()); got strides {t.stride()}")
    if check_ids and expert_ids.numel():
        lo, hi = (int(v) for v in torch.aminmax(expert_ids))  # debug only: one host sync
        if lo < -1 or hi >= E:
            bad = lo if lo < -1 else hi
            _fail(ValueError, "expert_ids", f"values must be in [0, E={E}) or -1, found {bad}")


def expert_mlp(
    x,
    expert_ids,
    expert_weights,
    w_in,
    w_out,
    activation: str = "swiglu",
    backend: str = "auto",
    check_ids: bool | None = None,
):
    """Top-k mixture of expert MLPs: ``y[n] = Σ_j expert_weights[n, j] · expert_{expert_ids[n, j]}(x[n])``.

    Args:
        x:              (N, D) float16 / bfloat16 / float32 (float64: torch and reference only), contiguous.
        expert_ids:     (N, k) int32/int64, values in [0, E) or -1 (empty slot: adds nothing).
                        k is a runtime value (elastic top-k needs no recompilation).
        expert_weights: (N, k) floating gates; gradients flow into them.
        w_in:           SwiGLU (E, D, 2F), columns [:F] gate and [F:] up projection, expert e computes
                        ``(silu(x @ w_in[e][:, :F]) * (x @ w_in[e][:, F:])) @ w_out[e]``;
                        GELU (E, D, F), ``gelu(x @ w_in[e]) @ w_out[e]`` with exact (erf) GELU.
                        Same dtype as x.
        w_out:          (E, F, D), same dtype as x.
        activation:     "swiglu" | "gelu".
        backend:        "triton" (CUDA, or CPU under TRITON_INTERPRET=1) | "torch" (sort + grouped
                        matmuls) | "reference" (plain loop, slow) | "auto" (Triton on CUDA, torch on CPU).
        check_ids:      raise ValueError for an id outside [-1, E) (one device→host sync). Default:
                        off, unless the environment sets SPARSE_ARCH_DEBUG_CHECKS=1.

    Returns: y (N, D) in x's dtype. Stateless: the same weights may be used by several calls in one
    graph (universal experts) and their gradients accumulate. N = 0 gives an empty (0, D) result.

    Out-of-range ids (without check_ids): an id outside [-1, E) is treated exactly like -1 on the
    Triton path (never used as an address; counted on the device in ``route(...).invalid_1``), so no
    host sync sits in the hot path. The reference backend needs valid ids.

    NaN / inf: a NaN or inf in a token's x, in the weights of an expert it selects, or in a selected
    slot's gate gives a non-finite y for that token (IEEE arithmetic, nothing is masked); other tokens
    are unaffected. An empty (-1) slot contributes exactly nothing, whatever its gate holds (NaN/inf
    included), and gets a zero gate gradient.

    Raises: TypeError for wrong types/dtypes, ValueError for shapes (D = 0 included), devices (meta
    tensors included), contiguity, unknown activation or backend, and ids out of range with check_ids.
    """
    if check_ids is None:
        check_ids = debug_checks_enabled()
    _check_inputs(x, expert_ids, expert_weights, w_in, w_out, activation, check_ids)
    if x.dtype == torch.float64 and backend == "triton":
        _fail(TypeError, "x", "dtype float64 is not supported by backend='triton'; use 'torch' or 'reference'")
    backend = resolve_backend(backend, x.device, BACKENDS, cpu_default="torch")
    if x.dtype == torch.float64 and backend == "triton":  # "auto" on CUDA
        backend = "torch"
    if backend == "reference":
        return expert_mlp_reference(x, expert_ids, expert_weights, w_in, w_out, activation)
    if backend == "torch" or x.shape[0] == 0:  # no tokens: nothing to launch (an empty (0, D) result)
        if torch.compiler.is_compiling():  # eager keeps the torch path's own (faster) autograd
            return _torch_op(x, expert_ids, expert_weights, w_in, w_out, activation)
        return expert_mlp_torch(x, expert_ids, expert_weights, w_in, w_out, activation)
    return expert_mlp_triton(x, expert_ids, expert_weights, w_in, w_out, activation == "swiglu")
