"""Per-block costs for ``training.accounting.account``: parameters a token reads, forward FLOPs, KV-cache bytes.

Every attention, FFN and depth class maps to one function here that reads the module's attributes
and shapes, never its tensor values, so a model built on the ``meta`` device is accounted as
cheaply as a real one (SGT's kept heads are the one exception, read only once loops exist).
Unknown blocks fall back to "every parameter active, FLOPs from ``training.accounting.flops``" and say so in
``Usage.notes``. The conventions are listed in ``training/accounting/account.py``.

A ``Cost`` is what one or more calls of a block cost a token. Parameters are keyed by the module
(or tensor) that owns them, so a block run several times (loops, recurrence, ITT steps) or a
tensor shared by several layers (a MoUE pool router, tied embeddings) counts once when costs are
added. Routed experts are counted as calls (k per MoE call), capped by the experts that exist when
the total is taken: an upper bound on the distinct experts a token touches, exact when no two
calls of the same pool pick the same expert.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace

import numpy as np
import torch.nn as nn


def causal_attention_flops(n_heads: int, head_dim: int, seq_len: int) -> float:
    """Forward FLOPs per token of QKᵀ and PV in one causal self-attention call over T tokens.

    Query i (1-based) meets i keys: 2·d FLOPs per key for its score and 2·d for the value sum,
    per head. Averaged over the T positions (Σ i / T = (T + 1)/2), each causal pair counted once:
    2·2·H·d·(T + 1)/2 (the convention of ``MultiHeadAttention.flops_per_token``).
    """
    return 2 * 2 * n_heads * head_dim * (seq_len + 1) / 2


def linear_flops(module: nn.Module | None) -> float:
    """2·in·out per token for every nn.Linear inside ``module`` (biases and activations not counted)."""
    if module is None:
        return 0.0
    return float(sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear)))


def numel(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def is_instance(module: nn.Module, target: str) -> bool:
    """isinstance against ``"package.module:Class"`` without importing it: a model can only hold
    instances of classes whose module is loaded, so kernels the model never used stay unimported."""
    path, _, name = target.partition(":")
    loaded = sys.modules.get(path)
    return loaded is not None and isinstance(module, getattr(loaded, name))


@dataclass
class ExpertUse:
    """Routed experts of one pool: calls per token, parameters per expert, experts a token may reach."""

    calls: float
    params_per_expert: float
    n_experts: int


@dataclass
class Cost:
    """What a token costs in one or more calls of a block (see the module docstring)."""

    params: dict = field(default_factory=dict)    # owner key → parameters read (counted once per key)
    experts: dict = field(default_factory=dict)   # pool key → ExpertUse
    dropped: dict = field(default_factory=dict)   # owner key → stored parameters an elastic sub-network leaves out
    matmul_flops: float = 0.0                     # forward, per token, attention scores/values excluded
    attention_flops: float = 0.0                  # forward QKᵀ + PV, per token
    no_grad_flops: float = 0.0                    # the part of the forward run without autograd (cost 1×, not 3×)
    kv_bytes: float = 0.0                         # KV-cache bytes per token

    def __add__(self, other: "Cost") -> "Cost":
        experts = dict(self.experts)
        for key, use in other.experts.items():
            experts[key] = replace(use, calls=use.calls + experts[key].calls) if key in experts else use
        return Cost(
            {**self.params, **other.params}, experts, {**self.dropped, **other.dropped},
            self.matmul_flops + other.matmul_flops, self.attention_flops + other.attention_flops,
            self.no_grad_flops + other.no_grad_flops, self.kv_bytes + other.kv_bytes,
        )

    def repeated(self, times: float, kv_times: float | None = None, no_grad_times: float = 0.0) -> "Cost":
        """``times`` calls (fractional = run on that share of the tokens), ``no_grad_times`` of them
        without autograd, ``kv_times`` of them keeping a KV-cache slot (default: all)."""
        experts = {key: replace(use, calls=use.calls * times) for key, use in self.experts.items()}
        return Cost(
            dict(self.params), experts, dict(self.dropped), self.matmul_flops * times, self.attention_flops * times,
            self.no_grad_flops * times + self.forward_flops * no_grad_times,
            self.kv_bytes * (times if kv_times is None else kv_times),
        )

    @property
    def forward_flops(self) -> float:
        return self.matmul_flops + self.attention_flops

    def active_params(self) -> float:
        routed = sum(min(u.calls, u.n_experts) * u.params_per_expert for u in self.experts.values())
        return sum(self.params.values()) + routed


@dataclass
class Usage:
    """How the model is run: sequence length, elastic sub-network, train/eval mode, cache dtype."""

    seq_len: int
    elastic: object  # arch.layers.ElasticSetting
    training: bool
    dtype_bytes: int
    notes: list = field(default_factory=list)

    def runs(self, layer: int) -> bool:
        return self.elastic.active_layers is None or layer in self.elastic.active_layers

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


def _fallback(module: nn.Module, u: Usage, what: str) -> Cost:
    from training.accounting.flops import forward_flops_per_token

    u.note(f"{type(module).__name__}: unknown {what}; all its parameters counted active, FLOPs from its Linears "
           "and flops_per_token, no KV cache")
    return Cost({id(module): numel(module)}, matmul_flops=forward_flops_per_token(module, u.seq_len))


# ---------------------------------------------------------------------------------------- attention
def attention_cost(attn: nn.Module, u: Usage) -> Cost:
    """MHA / GQA / MQA, DHA (g_K key and g_V value heads), DHA's fusion stage and MoHD attention."""
    if is_instance(attn, "arch.attention.mohd_attention:MoHDAttention"):
        return _mohd_attention_cost(attn, u)
    if not (hasattr(attn, "n_heads") and hasattr(attn, "head_dim")):
        return _fallback(attn, u, "attention")
    # DHA caches its g_K + g_V shared heads; MHA/GQA 2·n_kv_heads; the fusion stage all H heads twice.
    k_heads = getattr(attn, "n_k_heads", None) or getattr(attn, "n_kv_heads", None) or attn.n_heads
    v_heads = getattr(attn, "n_v_heads", None) or getattr(attn, "n_kv_heads", None) or attn.n_heads
    if is_instance(attn, "arch.attention.dha:HeadFusionAttention"):
        u.note("DHA fusion stage: fusing the head weights costs per forward, not per token; not counted")
    return Cost(
        {id(attn): numel(attn)},
        matmul_flops=linear_flops(attn),
        attention_flops=causal_attention_flops(attn.n_heads, attn.head_dim, u.seq_len),
        kv_bytes=(k_heads + v_heads) * attn.head_dim * u.dtype_bytes,
    )


def _mohd_attention_cost(attn: nn.Module, u: Usage) -> Cost:
    """The projections read (q, k, v) and write (o) only the A of G active groups of D; scores run on
    every head, and the cache holds every key/value head (the projections output all of them)."""
    mha, active_share = attn.attn, attn.A / attn.G
    projection_weights = attn.D * (mha.wq.out_features + mha.wkv.out_features + mha.wo.in_features)
    inactive = projection_weights * (1 - active_share) + attn.fusion.inactive_count(attn.A)
    return Cost(
        {id(attn): numel(attn) - inactive},
        matmul_flops=linear_flops(attn.routing) + linear_flops(mha) * active_share + attn.fusion.active_flops(attn.A),
        attention_flops=causal_attention_flops(mha.n_heads, mha.head_dim, u.seq_len),
        kv_bytes=2 * mha.n_kv_heads * mha.head_dim * u.dtype_bytes,
    )


# ---------------------------------------------------------------------------------------- FFN
def ffn_cost(ffn: nn.Module, u: Usage) -> Cost:
    """SwiGLU, MoE (+ EMoE, MoEC, X-MoE router, shared experts), MH-MoE, MoUE and MoHD."""
    if is_instance(ffn, "arch.ffn.mhmoe:MultiHeadMoEFFN"):
        return _moe_cost(ffn, u, sub_tokens=ffn.n_heads, projections=(ffn.head_proj, ffn.merge_proj))
    if is_instance(ffn, "arch.ffn.moe:MoEFFN"):
        return _moe_cost(ffn, u)
    if is_instance(ffn, "arch.ffn.universal:UniversalMoEFFN"):
        return _moue_cost(ffn, u)
    if is_instance(ffn, "arch.ffn.mohd:MoHDFFN"):
        return _mohd_ffn_cost(ffn, u)
    if is_instance(ffn, "arch.ffn.mlp:SwiGLUMLP"):
        return Cost({id(ffn): numel(ffn)}, matmul_flops=linear_flops(ffn))
    return _fallback(ffn, u, "FFN")


def moe_top_k(ffn: nn.Module, u: Usage) -> int:
    """Experts per (sub-)token as ``MoEFFN.route`` picks them: the elastic k, else top_k in training
    and eval_top_k (if set) in evaluation, never more than the routable experts."""
    if u.elastic.top_k is not None:
        k = min(u.elastic.top_k, ffn.E)
    else:
        k = ffn.top_k if u.training or ffn.eval_top_k is None else ffn.eval_top_k
    return min(k, _routable(ffn, u))


def _routable(ffn: nn.Module, u: Usage) -> int:
    mask_E = u.elastic.expert_mask_E
    return ffn.E if mask_E is None else int(mask_E.sum())


def _moe_cost(ffn: nn.Module, u: Usage, sub_tokens: int = 1, projections: tuple = ()) -> Cost:
    """Router and shared experts in full, k routed experts of 3·D·F each (per sub-token for MH-MoE).

    Sized from the layer's attributes (E, F, d_model), not its weight tensors, so the count stays
    global if the experts are sharded across ranks. Dropless: capacity drops are not subtracted.
    """
    k, routable = moe_top_k(ffn, u), _routable(ffn, u)
    per_expert = 3 * ffn.d_model * ffn.F  # SwiGLU: D×2F in (gate | up), F×D out
    router = ffn.router
    router_flops = linear_flops(router)
    if hasattr(router, "expert_embed_ER"):  # X-MoE: cosine scores against R-dim expert embeddings
        router_flops += 2 * router.expert_embed_ER.numel()
    fixed = numel(router) + numel(ffn.shared_experts) + sum(numel(p) for p in projections)
    return Cost(
        {id(ffn): fixed},
        experts={id(ffn): ExpertUse(sub_tokens * k, per_expert, routable)},
        dropped={id(ffn): (ffn.E - routable) * per_expert},
        matmul_flops=sub_tokens * (router_flops + k * 2 * per_expert)
        + linear_flops(ffn.shared_experts) + sum(linear_flops(p) for p in projections),
    )


def _moue_cost(ffn: nn.Module, u: Usage) -> Cost:
    """MoUE: per-layer routers in full; k experts from the shared pool (+ this layer's locals), each
    3·D·F weights and its trajectory embedding; one pool, shared by all layers, counted once."""
    if u.elastic.expert_mask_E is not None:
        raise ValueError("ffn=moue does not support elastic expert subsets (elastic.width_full_prob must be 1)")
    pool = ffn.pool
    reachable = min(pool.window_size, ffn.M) + ffn.n_local
    k = min(u.elastic.top_k or ffn.top_k, reachable)
    per_expert = 3 * ffn.d_model * ffn.F + ffn.trajectory_dim
    params = {id(ffn): numel(ffn.router) + numel(ffn.local_router)}
    shared_router_flops = 0.0
    if pool.router_MI is not None:  # one router for every layer: its parameters count once
        params[id(pool.router_MI)] = pool.router_MI.numel()
        shared_router_flops = 2 * pool.router_MI.numel()
    return Cost(
        params,
        experts={id(pool): ExpertUse(k, per_expert, ffn.M + ffn.n_layers * ffn.n_local)},
        matmul_flops=linear_flops(ffn.router) + linear_flops(ffn.local_router) + shared_router_flops
        + k * 2 * 3 * ffn.d_model * ffn.F + 2 * k * ffn.trajectory_dim,  # last term: the trajectory EMA
    )


def _mohd_ffn_cost(ffn: nn.Module, u: Usage) -> Cost:
    """MoHD: the A of G active groups of W_in / W_out and of the fusion; the router unless the
    attention's routing is reused (``share_routing``)."""
    active_share = ffn.A / ffn.G
    inactive = 3 * ffn.D * ffn.F * (1 - active_share) + ffn.fusion.inactive_count(ffn.A)
    if ffn.share_routing:
        inactive += numel(ffn.routing)
    router_flops = 0.0 if ffn.share_routing else linear_flops(ffn.routing)
    return Cost(
        {id(ffn): numel(ffn) - inactive},
        matmul_flops=router_flops + 2 * 3 * ffn.D * ffn.F * active_share + ffn.fusion.active_flops(ffn.A),
    )


# ---------------------------------------------------------------------------------------- blocks
def block_cost(block: nn.Module, u: Usage) -> Cost:
    """One pre-norm block (``arch.model.Block``): its two norms, attention and FFN."""
    if not all(hasattr(block, name) for name in ("attn", "ffn", "attn_norm", "ffn_norm")):
        return _fallback(block, u, "block")
    norms = Cost({id(block.attn_norm): numel(block.attn_norm), id(block.ffn_norm): numel(block.ffn_norm)})
    return norms + attention_cost(block.attn, u) + ffn_cost(block.ffn, u)


# ---------------------------------------------------------------------------------------- depth schemes
def depth_cost(depth: nn.Module, u: Usage) -> Cost:
    """Every block call of the depth scheme, with weight sharing, fractions and no-grad parts."""
    if is_instance(depth, "arch.depth.loop:RecurrentDepth"):
        return _recurrent_cost(depth, u)
    if is_instance(depth, "arch.depth.itt:ITTDepth"):
        return _itt_cost(depth, u)
    if is_instance(depth, "arch.depth.sgt:SGTDepth"):
        return _sgt_cost(depth, u)
    if is_instance(depth, "arch.depth.loop:LoopDepth"):
        order = depth.order  # a layer appearing c times costs c calls and is counted once as parameters
    else:
        if not is_instance(depth, "arch.depth.plain:PlainDepth"):
            u.note(f"{type(depth).__name__}: unknown depth scheme; accounted as its blocks run once each")
        order = range(len(depth.blocks))
    total = Cost()
    for i in order:
        if u.runs(i):
            total = total + block_cost(depth.blocks[i], u)
    return total


def expected_iterations(mean_recurrence: int, backprop_depth: int, sigma: float, sampler: str) -> tuple[float, float]:
    """(E[iterations without gradient], E[iterations with gradient]) of one training forward of
    ``RecurrentDepth`` (Huginn's sampler, METHODS.md §8.5).

    ``fixed``: r̄ iterations, the last min(k̄, r̄) with gradient. ``lognormal_poisson``:
    p = Poisson(τ) + 1 with τ ~ LogNormal(ln(t + k̄) − σ²/2, σ), t = max(r̄ − k̄, 0), so
    E[p] = t + k̄ + 1 exactly; E[min(k̄, p)] = Σ_{m<k̄} P(Poisson(τ) ≥ m) is integrated over τ by
    Gauss–Hermite quadrature (deterministic, ~1e-9 accurate).
    """
    s = backprop_depth
    if sampler == "fixed":
        return float(max(mean_recurrence - s, 0)), float(min(s, mean_recurrence))
    t = max(mean_recurrence - s, 0)
    mu = np.log(t + s) - sigma**2 / 2
    nodes, weights = np.polynomial.hermite.hermgauss(80)
    tau_Q, w_Q = np.exp(mu + np.sqrt(2) * sigma * nodes), weights / np.sqrt(np.pi)
    n_M = np.arange(s)
    log_factorial_M = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, s)))])
    pmf_QM = np.exp(-tau_Q[:, None] + n_M * np.log(tau_Q[:, None]) - log_factorial_M)  # P(N = m | τ)
    below_QM = np.cumsum(pmf_QM, axis=1) - pmf_QM  # P(N < m | τ)
    with_grad = float(w_Q @ (1 - below_QM).sum(1))
    return t + s + 1 - with_grad, with_grad


def _recurrent_cost(depth: nn.Module, u: Usage) -> Cost:
    """Prelude and coda once; the core (adapter + core blocks) r times. Training: the expected
    iteration counts of the sampler, the no-grad ones costing forward only. The KV cache holds
    every core call at the evaluation iteration count (generation runs in eval mode)."""
    frozen, with_grad = expected_iterations(depth.mean_recurrence, depth.mean_backprop_depth, depth.sigma, depth.sampler) \
        if u.training else (0.0, float(depth.eval_iterations))
    first_core, first_coda = depth.n_prelude, depth.n_prelude + depth.n_core
    once, core = Cost(), Cost()
    if depth.adapter is not None:
        core = Cost({id(depth.adapter): numel(depth.adapter)}, matmul_flops=linear_flops(depth.adapter))
    if depth.out_norm is not None:
        once = Cost({id(depth.out_norm): numel(depth.out_norm)})
    for i, block in enumerate(depth.blocks):
        if not u.runs(i):
            continue
        if first_core <= i < first_coda:
            core = core + block_cost(block, u)
        else:
            once = once + block_cost(block, u)
    return once + core.repeated(frozen + with_grad, kv_times=depth.eval_iterations, no_grad_times=frozen)


def itt_fraction(depth: nn.Module, thinking: nn.Module, step: int, seq_len: int) -> float:
    """Share of the tokens that extra step ``step`` (0-based) processes, as ``ITTDepth._route`` selects:
    all or none without routing; round(ρ·T) tokens per sequence for top-ρ; for threshold selection
    the last measured share (ρ before any forward)."""
    rho = depth.ratios[step]
    if not depth.routing:
        return 1.0 if rho > 0 else 0.0
    if rho in (0.0, 1.0):
        return rho
    if depth.selection == "threshold":
        measured = thinking.last_fraction_S[step]
        return rho if measured is None else measured
    return max(0, min(seq_len, round(rho * seq_len))) / seq_len


def _itt_cost(depth: nn.Module, u: Usage) -> Cost:
    """An ITT layer: the block on every token, then each extra step on its selected share of the
    tokens (queries of the selected tokens against all keys), the step routers on every token, the
    K/V projections of the other tokens under ``kv=recompute``; every step keeps a cache slot."""
    total = Cost()
    for i, block in enumerate(depth.blocks):
        if not u.runs(i):
            continue
        if str(i) not in depth.thinking:
            total = total + block_cost(block, u)
            continue
        thinking = depth.thinking[str(i)]
        shares = [itt_fraction(depth, thinking, j, u.seq_len) for j in range(depth.steps - 1)]
        extra = linear_flops(thinking.routers) if depth.routing else 0.0
        if depth.kv == "recompute":
            extra += sum(1 - f for f in shares if 0 < f < 1) * linear_flops(block.attn.wkv)
        steps = block_cost(block, u).repeated(1 + sum(shares), kv_times=depth.steps)
        total = total + steps + Cost({id(thinking): numel(thinking)}, matmul_flops=extra)
    return total


def _sgt_cost(depth: nn.Module, u: Usage) -> Cost:
    """Plain blocks plus each looped layer's extra passes: attention of the kept heads (all heads while
    a training decay window is open) with their own cache slot, or whole blocks in ``loop_mode=block``."""
    total = Cost()
    for i, block in enumerate(depth.blocks):
        if not u.runs(i):
            continue
        loops = depth.loop_depth[i]
        if loops and depth.loop_mode == "block":
            total = total + block_cost(block, u).repeated(1 + loops)
        elif loops:
            total = total + block_cost(block, u) + _sgt_head_pass(depth, i, block.attn, u).repeated(loops)
        else:
            total = total + block_cost(block, u)
    return total


def _sgt_head_pass(depth: nn.Module, layer: int, attn: nn.Module, u: Usage) -> Cost:
    """One loop pass of ``SGTDepth._loop_attention``: the heads' rows of wq and wo, their key/value heads' rows of wkv."""
    H, d, D = attn.n_heads, attn.head_dim, attn.wq.in_features
    if u.training and depth.is_decaying(layer):
        heads = list(range(H))
    else:
        heads = depth.kept_LH[layer].nonzero().flatten().tolist()
    kv_heads = len({h // (H // attn.n_kv_heads) for h in heads})
    return Cost(
        matmul_flops=2 * D * len(heads) * d + 2 * D * 2 * kv_heads * d + 2 * len(heads) * d * D,
        attention_flops=causal_attention_flops(len(heads), d, u.seq_len),
        kv_bytes=2 * kv_heads * d * u.dtype_bytes,
    )
