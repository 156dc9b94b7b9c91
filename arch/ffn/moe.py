"""Mixture-of-experts FFN: router → top-k (optionally elastic) → grouped SwiGLU experts → weighted sum.

The experts run through ``kernels.moe.expert_mlp`` (Triton on GPU, grouped matmuls on CPU).
Everything about routing is an option: scoring, renormalisation, shared experts, router noise,
X-MoE routing, capacity, the three balancing methods, EMoE co-activation sampling and its
hierarchical loss, MoEC expert clusters. ERNIE-style elastic sub-networks arrive through ``ctx.elastic``.

MoEC (Xie et al., AAAI 2023, METHODS.md §8.3; only the abstract was available, so both pieces are
reconstructions [RECON]): ``n_clusters`` contiguous groups of E/C experts, an intra-cluster variance
penalty Σ_c Var_{e∈c}(P_e) on batch-mean router probabilities (``cluster_var_loss_coef``), and
cluster-level expert dropout in training (``cluster_dropout``): experts are dropped per token before
top-k, so tokens fall back on surviving experts (every cluster keeps one, every token keeps k), and
the gate probabilities are renormalised over the survivors.

Legend: B batch, T tokens per sequence, N = B·T, D d_model, E experts, F expert width, K top-k.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn

from arch.cost import Cost, CostSetting, ExpertUse, cost_of, linear_flops, numel
from arch.ffn.emoe import coactivation_topk, hierarchical_router_loss
from arch.ffn.expert_parallel import expert_compute
from arch.ffn.mlp import SwiGLUMLP
from arch.ffn.router import (
    apply_capacity,
    build_router,
    cluster_dropout_mask,
    cluster_variance_loss,
    drop_second_experts,
    expert_counts,
    routing_metrics,
    sequence_balance_loss,
    switch_balance_loss,
    z_loss,
)
from arch.layers import ForwardContext, ModelShared
from arch.registry import Capabilities


class MoEFFN(nn.Module):
    """A routed SwiGLU mixture of experts, plus optional always-on shared experts.

    ``expert_hidden=None`` sizes each expert at (8/3·D)/top_k, so k experts activate about as
    many parameters as the dense SwiGLU of the same d_model (fine-grained experts).
    """

    # Mixtral-compatible when its routing is (training/export/hf.py checks the values of these options).
    capabilities = Capabilities(
        expert_banks=True,
        elastic_width=True,
        expert_parallel=True,
        hf_export=(
            "n_experts",
            "top_k",
            "expert_hidden",
            "n_shared_experts",
            "scoring",
            "renormalize",
            "router",
            "xmoe_dim",
            "xmoe_temperature",
            "second_expert_drop",
            "router_noise",
            "capacity_factor",
            "eval_capacity_fraction",
            "balance_loss_counts",
            "balance_loss_coef",
            "seq_balance_loss_coef",
            "z_loss_coef",
            "bias_update_rate",
            "eval_top_k",
            "coactivation_prob",
            "k_ideal",
            "coactivation_mode",
            "keep_top1",
            "hier_loss_coef",
            "hier_gamma",
            "n_clusters",
            "cluster_var_loss_coef",
            "cluster_dropout",
            "backend",
        ),
    )
    sub_tokens = 1  # routed (sub-)tokens per token: MH-MoE splits each token into n_heads

    def __init__(
        self,
        d_model: int,
        layer_idx: int,
        shared: ModelShared | None = None,
        *,
        n_experts: int = 8,
        top_k: int = 2,
        expert_hidden: int | None = None,
        n_shared_experts: int = 0,
        scoring: Literal["softmax", "sigmoid"] = "softmax",
        renormalize: bool = True,
        router: Literal["linear", "xmoe", "xmoe_cosine"] = "linear",
        xmoe_dim: int = 16,
        xmoe_temperature: float = 0.3,
        second_expert_drop: bool = False,
        router_noise: float = 0.0,
        capacity_factor: float | None = None,
        eval_capacity_fraction: float | None = None,
        balance_loss_coef: float = 0.01,
        balance_loss_counts: Literal["all_slots", "top1_before_drop"] = "all_slots",
        seq_balance_loss_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        bias_update_rate: float = 0.0,
        eval_top_k: int | None = None,
        coactivation_prob: float = 0.0,
        k_ideal: int | None = None,
        coactivation_mode: Literal["uniform", "proportional"] = "uniform",
        keep_top1: bool = False,
        hier_loss_coef: float = 0.0,
        hier_gamma: float = 0.5,
        n_clusters: int = 1,
        cluster_var_loss_coef: float = 0.0,
        cluster_dropout: float = 0.0,
        backend: Literal["auto", "triton", "torch", "reference"] = "auto",
    ):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"ffn.top_k={top_k} must be in [1, n_experts={n_experts}]")
        if eval_top_k is not None and not 1 <= eval_top_k <= n_experts:
            raise ValueError(f"ffn.eval_top_k={eval_top_k} must be in [1, n_experts={n_experts}]")
        if k_ideal is not None and not top_k <= k_ideal <= n_experts:
            raise ValueError(f"ffn.k_ideal={k_ideal} must be in [top_k={top_k}, n_experts={n_experts}]")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"ffn.capacity_factor={capacity_factor} must be positive or null (dropless)")
        if eval_capacity_fraction is not None and not 0 < eval_capacity_fraction <= 1:
            raise ValueError(f"ffn.eval_capacity_fraction={eval_capacity_fraction} must be in (0, 1] or null")
        if balance_loss_counts not in ("all_slots", "top1_before_drop"):
            raise ValueError(
                f"ffn.balance_loss_counts={balance_loss_counts!r} is not one of ['all_slots', 'top1_before_drop']"
            )
        if not 0 <= coactivation_prob <= 1:
            raise ValueError(f"ffn.coactivation_prob={coactivation_prob} must be in [0, 1]")
        if coactivation_prob > 0 and k_ideal is None:
            raise ValueError("ffn.coactivation_prob > 0 needs ffn.k_ideal (the candidate pool size, e.g. 2·top_k)")
        if n_clusters < 1 or n_experts % n_clusters:
            raise ValueError(f"ffn.n_clusters={n_clusters} must divide n_experts={n_experts}")
        if not 0 <= cluster_dropout < 1:
            raise ValueError(f"ffn.cluster_dropout={cluster_dropout} must be in [0, 1)")
        dense_hidden = 32 * math.ceil(int(8 * d_model / 3) / 32)
        self.F = expert_hidden or max(8, round(dense_hidden / top_k))
        self.d_model, self.layer_idx, self.E, self.top_k = d_model, layer_idx, n_experts, top_k
        self.eval_top_k, self.scoring, self.renormalize = eval_top_k, scoring, renormalize
        self.router_noise, self.capacity_factor, self.backend = router_noise, capacity_factor, backend
        self.balance_loss_coef, self.seq_balance_loss_coef, self.z_loss_coef = (
            balance_loss_coef,
            seq_balance_loss_coef,
            z_loss_coef,
        )
        self.bias_update_rate = bias_update_rate
        self.second_expert_drop, self.eval_capacity_fraction = second_expert_drop, eval_capacity_fraction
        self.balance_loss_counts = balance_loss_counts
        self.coactivation_prob, self.k_ideal = coactivation_prob, k_ideal or top_k
        self.coactivation_mode, self.keep_top1 = coactivation_mode, keep_top1
        self.hier_loss_coef, self.hier_gamma = hier_loss_coef, hier_gamma
        self.n_clusters, self.cluster_var_loss_coef, self.cluster_dropout = (
            n_clusters,
            cluster_var_loss_coef,
            cluster_dropout,
        )

        self.router = build_router(router, d_model, n_experts, xmoe_dim, xmoe_temperature)
        self.w_in_EDH = nn.Parameter(torch.empty(n_experts, d_model, 2 * self.F))  # [:F] gate, [F:] up
        self.w_out_EFD = nn.Parameter(torch.empty(n_experts, self.F, d_model))
        self.shared_experts = (
            SwiGLUMLP(d_model, layer_idx, hidden_dim=n_shared_experts * self.F) if n_shared_experts else None
        )
        # Auxiliary-loss-free balancing (DeepSeek-V3): a bias that changes *selection* only.
        self.register_buffer("expert_bias_E", torch.zeros(n_experts))
        self.register_buffer("pending_counts_E", torch.zeros(n_experts), persistent=False)
        self.init_parameters(0.02, 0.02)

    def init_parameters(self, std: float, residual_std: float) -> None:
        nn.init.normal_(self.w_in_EDH, 0.0, std)
        nn.init.normal_(self.w_out_EFD, 0.0, residual_std)

    # ------------------------------------------------------------------ routing
    def active_top_k(self, ctx: ForwardContext) -> int:
        if ctx.elastic.top_k is not None:
            return min(ctx.elastic.top_k, self.E)
        return self.top_k if self.training or self.eval_top_k is None else self.eval_top_k

    def route(self, x_ND: torch.Tensor, ctx: ForwardContext):
        """→ (expert ids (N, K) with -1 for dropped slots, gates (N, K), router probs (N, E), logits (N, E))."""
        logits_NE = self.router(x_ND)
        if self.training and self.router_noise > 0:
            logits_NE = logits_NE + self.router_noise * torch.randn_like(logits_NE)
        probs_NE = logits_NE.softmax(-1) if self.scoring == "softmax" else logits_NE.sigmoid()
        selection_NE = probs_NE.detach() + self.expert_bias_E
        if ctx.elastic.expert_mask_E is not None:  # elastic width: only the sampled subset is routable
            selection_NE = selection_NE.masked_fill(~ctx.elastic.expert_mask_E.to(x_ND.device), float("-inf"))
        k, k_ideal = self.active_top_k(ctx), max(self.k_ideal, self.active_top_k(ctx))
        if ctx.elastic.expert_mask_E is not None:  # never pick (or sample from) a masked expert
            k, k_ideal = min(k, ctx.elastic.n_routable), min(k_ideal, ctx.elastic.n_routable)
        gate_probs_NE = probs_NE
        if self.training and self.cluster_dropout > 0 and ctx.elastic.expert_mask_E is None:
            drop_NE = cluster_dropout_mask(
                x_ND.shape[0], self.E, self.n_clusters, k_ideal, self.cluster_dropout, x_ND.device
            )
            selection_NE = selection_NE.masked_fill(drop_NE, float("-inf"))
            gate_probs_NE = probs_NE.masked_fill(drop_NE, 0.0)
            if self.scoring == "softmax":  # a distribution over the survivors (sigmoid scores are per expert)
                gate_probs_NE = gate_probs_NE / gate_probs_NE.sum(-1, keepdim=True).clamp(min=1e-9)
        if self.training and self.coactivation_prob > 0:
            ids_NK = coactivation_topk(
                selection_NE, probs_NE, k, k_ideal, self.coactivation_prob, self.coactivation_mode, self.keep_top1
            )
        else:
            ids_NK = selection_NE.topk(k, dim=-1).indices
        gates_NK = gate_probs_NE.gather(1, ids_NK)
        if self.renormalize:
            gates_NK = gates_NK / gates_NK.sum(-1, keepdim=True).clamp(min=1e-9)
        return ids_NK, gates_NK, probs_NE, logits_NE

    def capacity(self, n_tokens: int, k: int) -> int | None:
        """Slots per expert: ⌈capacity_factor · N·k / E⌉ (None: dropless); at eval ⌈eval_capacity_fraction · N⌉
        when set (X-MoE's 0.25 [CODE]; its training capacity 2·⌈N/E⌉ is capacity_factor=1 at k=2)."""
        if not self.training and self.eval_capacity_fraction is not None:
            return math.ceil(self.eval_capacity_fraction * n_tokens)
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * n_tokens * k / self.E)

    # ------------------------------------------------------------------ forward
    def forward(self, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        ids_NK, gates_NK, probs_NE, logits_NE = self.route(x_ND, ctx)
        routed_NK = ids_NK  # before any drop: what balance_loss_counts=top1_before_drop counts
        if self.training and self.second_expert_drop:
            ids_NK = drop_second_experts(ids_NK, probs_NE)
        dropped = torch.zeros((), device=x_ND.device)
        capacity = self.capacity(ids_NK.shape[0], ids_NK.shape[1])
        if capacity is not None:
            ids_NK, dropped = apply_capacity(ids_NK, self.E, capacity)
        y_ND = expert_compute(
            x_ND,
            ids_NK,
            gates_NK.to(x_ND.dtype),
            self.w_in_EDH,
            self.w_out_EFD,
            "swiglu",
            self.backend,
            getattr(self, "expert_shard", None),
        )
        if self.shared_experts is not None:
            y_ND = y_ND + self.shared_experts(x_ND, ctx)
        if self.training:
            counted_NK = routed_NK[:, :1] if self.balance_loss_counts == "top1_before_drop" else ids_NK
            self._add_losses(ctx, probs_NE, logits_NE, counted_NK, B, T)
            if ctx.elastic.is_full and self.bias_update_rate > 0:
                with torch.no_grad():
                    self.pending_counts_E += expert_counts(ids_NK, self.E)
        self._add_metrics(ctx, probs_NE, ids_NK, dropped)
        return y_ND.view(B, T, D)

    def _add_losses(self, ctx, probs_NE, logits_NE, ids_NK, B, T) -> None:
        # Balance statistics use normalised probabilities (sigmoid scores are normalised per token).
        p_NE = probs_NE if self.scoring == "softmax" else probs_NE / probs_NE.sum(-1, keepdim=True)
        if self.balance_loss_coef > 0:
            ctx.add_aux_loss("balance_loss", self.balance_loss_coef * switch_balance_loss(p_NE, ids_NK, self.E))
        if self.seq_balance_loss_coef > 0:
            seq = sequence_balance_loss(p_NE.view(B, T, -1), ids_NK.view(B, T, -1), self.E)
            ctx.add_aux_loss("seq_balance_loss", self.seq_balance_loss_coef * seq)
        if self.z_loss_coef > 0:
            ctx.add_aux_loss("z_loss", self.z_loss_coef * z_loss(logits_NE))
        if self.hier_loss_coef > 0:
            ctx.add_aux_loss("hier_loss", self.hier_loss_coef * hierarchical_router_loss(p_NE, self.hier_gamma))
        if self.cluster_var_loss_coef > 0:
            ctx.add_aux_loss(
                "cluster_var_loss", self.cluster_var_loss_coef * cluster_variance_loss(p_NE, self.n_clusters)
            )

    def _add_metrics(self, ctx, probs_NE, ids_NK, dropped) -> None:
        if ctx.kv_cache is None and not self.training:
            self.last_ids_NK = ids_NK.detach()  # for routing analysis (evaluate.py analysis=routing)
        if not ctx.collect_metrics:
            return
        metrics = routing_metrics(
            probs_NE if self.scoring == "softmax" else probs_NE / probs_NE.sum(-1, keepdim=True), ids_NK, self.E
        )
        prefix = f"moe/layer{self.layer_idx}"
        for key, value in metrics.items():
            ctx.add_metric(f"{prefix}/{key}", value)
        ctx.add_metric(f"{prefix}/dropped", dropped.float())

    def expert_parallel_params(self) -> tuple[str, ...]:
        """Expert banks (dim 0 = expert) that ``trainer.expert_parallel`` splits over ranks."""
        return ("w_in_EDH", "w_out_EFD")

    # ------------------------------------------------------------------ aux-loss-free balancing
    def after_optimizer_step(self, step: int) -> None:
        """b_e += rate · sign(mean load − load_e), from the tokens of full-model steps since the last update."""
        if self.bias_update_rate <= 0:
            return  # no early exit on "no tokens counted" (a host sync): zero counts give sign(0) = 0, no change
        counts_E = self.pending_counts_E
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts_E)  # every rank applies the same update → identical biases
        self.expert_bias_E += self.bias_update_rate * torch.sign(counts_E.mean() - counts_E)
        self.pending_counts_E.zero_()

    # ------------------------------------------------------------------ cost
    def routable_experts(self, setting: CostSetting) -> int:
        return self.E if setting.routable_experts is None else min(setting.routable_experts, self.E)

    def cost_top_k(self, setting: CostSetting) -> int:
        """Experts per (sub-)token as ``route`` picks them: the elastic k, else top_k in training and
        eval_top_k (if set) in evaluation, never more than the routable experts."""
        if setting.top_k is not None:
            k = min(setting.top_k, self.E)
        else:
            k = self.top_k if setting.training or self.eval_top_k is None else self.eval_top_k
        return min(k, self.routable_experts(setting))

    def projections(self) -> tuple[nn.Module, ...]:
        """Dense layers around the experts, run once per token (MH-MoE's split and merge)."""
        return ()

    def cost(self, setting: CostSetting) -> Cost:
        """Router (X-MoE: its expert-embedding scores too) and shared experts per (sub-)token in full,
        k routed experts of 3·D·F each. Sized from E, F, d_model, not the weight tensors, so the count
        stays global when the experts are sharded across ranks. Dropless: capacity drops (``capacity_factor``,
        ``eval_capacity_fraction``) and X-MoE's random second-expert drop in training are not subtracted."""
        k, routable = self.cost_top_k(setting), self.routable_experts(setting)
        per_expert = 3 * self.d_model * self.F  # SwiGLU: D×2F in (gate | up), F×D out
        router = cost_of(self.router, setting)
        fixed = sum(router.params.values()) + numel(self.shared_experts) + sum(numel(p) for p in self.projections())
        per_sub_token = router.matmul_flops + linear_flops(self.shared_experts) + k * 2 * per_expert
        return Cost(
            {id(self): fixed},
            experts={id(self): ExpertUse(self.sub_tokens * k, per_expert, routable)},
            dropped={id(self): (self.E - routable) * per_expert},
            matmul_flops=self.sub_tokens * per_sub_token + sum(linear_flops(p) for p in self.projections()),
        )
