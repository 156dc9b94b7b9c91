"""MHA → DHA conversion, stages 2–3: in-group head fusion and collapse; and the GQA mean-pool baseline.

Fusion (METHODS.md §4(a) stage 2; the objective and the multiplier rule are [RECON]): every MHA
layer becomes an ``arch.attention.dha.HeadFusionAttention`` (ω = identity, so the model starts
exactly at MHA) and the model trains on

    L = L_LM + λ·h + (ρ/2)·h²,   h = √c,   c = Σ_groups Σ_{i∈G} ‖Ŵ_i − mean_G Ŵ‖² / Σ_i ‖Ŵ_i‖²

(all layers, K and V): an augmented Lagrangian for the constraint h = 0, where h is the relative
RMS disagreement of the heads within their groups. Every ``al_every`` steps λ ← λ + ρ·h, and ρ ←
ρ·``rho_growth`` when h has not fallen below half its previous value, so the fusion weight λ + ρh
rises until the groups agree. (The constraint is h, not c = h²: c's gradient vanishes at 0, and
with it λ's growth, which left h stuck near 0.04 in our CPU runs.) Learning rates decay linearly
to zero over ``steps``. Fusion stops once h ≤ ``tol`` or after ``steps``.

Collapse (stage 3): each group becomes one shared head, the mean of its fused heads, which is
exact when they agree. GQA baseline (§4(a), "mean pooling within fixed groups"): contiguous groups
of H/g heads, each replaced by the mean of its heads, no fusion stage.

Legend: H heads, G shared heads of a kind, d head dim, D d_model.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from arch.attention.dha import HeadFusionAttention
from arch.model import Block, LanguageModel
from arch.registry import ConfigError
from recipes.dha.search import KINDS, SearchResult


@dataclass
class FusionConfig:
    steps: int = 300  # most fusion steps (fewer when the heads agree within tol earlier)
    tol: float = 0.01  # stop when the relative RMS disagreement h = √c <= tol
    lr: float = 1e-3  # AdamW lr of the model's own weights during fusion
    omega_lr: float = 1e-2  # AdamW lr of the fusion weights ω (no weight decay: ω = I is the start)
    lambda_init: float = 0.0  # Lagrange multiplier λ at the start
    rho_init: float = 1.0  # quadratic-penalty weight ρ at the start
    rho_growth: float = 2.0
    al_every: int = 10  # steps between multiplier updates
    granularity: Literal["scalar", "channel"] = "scalar"
    train_base: bool = True  # False: only ω trains (the MHA weights are frozen)
    batch_size: int = 16
    seed: int = 1
    grad_clip: float = 1.0

    def check(self) -> None:
        for key in ("steps", "al_every", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"fusion {key}={getattr(self, key)} must be a positive integer")
        for key in ("tol", "lr", "omega_lr", "rho_init"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"fusion {key}={getattr(self, key)} must be > 0")
        if self.rho_growth < 1:
            raise ConfigError(f"fusion rho_growth={self.rho_growth} must be >= 1 (ρ only grows)")


def fusion_layers(model: nn.Module) -> list[HeadFusionAttention]:
    found = {m.layer_idx: m for m in model.modules() if isinstance(m, HeadFusionAttention)}
    return [found[i] for i in sorted(found)]


def wrap_for_fusion(model: LanguageModel, result: SearchResult, granularity: str = "scalar") -> LanguageModel:
    """A copy of the MHA model whose attention layers are HeadFusionAttention with the searched groups."""
    fused = copy.deepcopy(model)
    for block in fused.modules():
        if isinstance(block, Block):
            i = block.attn.layer_idx
            block.attn = HeadFusionAttention(block.attn, result.groups["k"][i], result.groups["v"][i], granularity)
    return fused


def disagreement(model: nn.Module) -> torch.Tensor:
    """c: the relative squared disagreement of all groups over all layers (0 when every group agrees)."""
    spread, energy = zip(*(layer.disagreement() for layer in fusion_layers(model)))
    return sum(spread) / sum(energy).clamp_min(1e-12)


def fuse(model: LanguageModel, data, seq_len: int, cfg: FusionConfig, log=None) -> list[dict]:
    """Train a wrapped model (``wrap_for_fusion``) with L_LM + augmented-Lagrangian fusion loss, in place.

    Returns one row per step: step, lm_loss, disagreement (h), lambda, rho; the last row is where it stopped.
    """
    from training.data.windows import WindowSampler

    cfg.check()
    omegas = [p for n, p in model.named_parameters() if ".omega_" in n]
    base = [p for n, p in model.named_parameters() if ".omega_" not in n]
    for p in base:
        p.requires_grad_(cfg.train_base)
    groups = [{"params": omegas, "lr": cfg.omega_lr, "weight_decay": 0.0}]
    if cfg.train_base:
        groups.append({"params": base, "lr": cfg.lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95))
    peaks = [g["lr"] for g in groups]
    device = next(model.parameters()).device
    sampler = WindowSampler(data.train, data.train_mask, seq_len, cfg.batch_size, cfg.seed, align=data.window_align)
    lam, rho, h_at_update = cfg.lambda_init, cfg.rho_init, math.inf
    history = []
    model.train()
    for step in range(cfg.steps + 1):
        h = disagreement(model).sqrt()
        if h.item() <= cfg.tol or step == cfg.steps:
            history.append({"step": step, "disagreement": h.item(), "lambda": lam, "rho": rho})
            break
        # Linear decay to zero: Adam's steps on ω otherwise keep a disagreement floor of about omega_lr.
        for group, peak in zip(groups, peaks):
            group["lr"] = peak * (1 - step / cfg.steps)
        x_BT, y_BT = (t.to(device) for t in sampler.get_batch(step))
        out = model(x_BT, y_BT)
        lm_loss = out.lm_loss
        (out.loss + lam * h + 0.5 * rho * h * h).backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        row = {"step": step, "lm_loss": lm_loss.item(), "disagreement": h.item(), "lambda": lam, "rho": rho}
        history.append(row)
        if log is not None:
            log(row)
        if (step + 1) % cfg.al_every == 0:  # multiplier update: raises the fusion weight λ + ρc
            lam += rho * h.item()
            if h.item() > 0.5 * h_at_update:
                rho *= cfg.rho_growth
            h_at_update = h.item()
    for p in base:
        p.requires_grad_(True)
    return history


@torch.no_grad()
def collapse(fused: LanguageModel) -> LanguageModel:
    """The DHA model: every group of fused heads → one shared head (the group mean), maps = the groups."""
    layers = fusion_layers(fused)
    cfg = copy.deepcopy(fused.cfg)
    node = {
        "name": "dha",
        "k_heads": [],
        "v_heads": [],
        "k_maps": [],
        "v_maps": [],
        "qk_norm": layers[0].q_norm is not None,
        "bias": layers[0].wkv.bias is not None,
        "backend": layers[0].backend,
    }
    shared_rows = []
    for layer in layers:
        rows_w, rows_b = [], []
        for kind in KINDS:
            labels = layer.groups[kind]
            g = max(labels) + 1
            w_HdD, b_Hd = layer.fused_heads(kind)
            onehot_GH = torch.zeros(g, len(labels), dtype=w_HdD.dtype)
            onehot_GH[labels, range(len(labels))] = 1.0
            mean_GH = onehot_GH / onehot_GH.sum(1, keepdim=True)
            rows_w.append(torch.einsum("gh,hdD->gdD", mean_GH, w_HdD).flatten(0, 1))
            rows_b.append(None if b_Hd is None else (mean_GH @ b_Hd).flatten())
            node[f"{kind}_heads"].append(g)
            node[f"{kind}_maps"].append(list(labels))
        shared_rows.append((torch.cat(rows_w), None if rows_b[0] is None else torch.cat(rows_b)))
    cfg.attention = node
    return _rebuild(fused, cfg, shared_rows)


@torch.no_grad()
def mean_pool_gqa(model: LanguageModel, n_kv_heads: int) -> LanguageModel:
    """GQA from MHA: contiguous groups of H/n_kv_heads key (and value) heads → their mean."""
    H = model.cfg.n_heads
    if n_kv_heads < 1 or H % n_kv_heads:
        raise ConfigError(
            f"GQA needs n_kv_heads dividing n_heads={H}, got {n_kv_heads}; pick a budget that is a multiple of 1/{H}"
        )
    from recipes.dha.search import attention_layers

    shared_rows = []
    for attn in attention_layers(model):
        if attn.n_kv_heads != attn.n_heads:
            raise ConfigError("mha_to_gqa needs an MHA model (model.attention.name=mha, n_kv_heads=null)")
        d = attn.head_dim
        w = attn.wkv.weight.view(2, n_kv_heads, H // n_kv_heads, d, -1).mean(2).flatten(0, 2)
        b = None if attn.wkv.bias is None else attn.wkv.bias.view(2, n_kv_heads, H // n_kv_heads, d).mean(2).flatten()
        shared_rows.append((w, b))
    cfg = copy.deepcopy(model.cfg)
    cfg.attention = {**dict(model.cfg.attention), "n_kv_heads": n_kv_heads}
    return _rebuild(model, cfg, shared_rows)


def _rebuild(source: nn.Module, cfg, shared_rows: list[tuple[torch.Tensor, torch.Tensor | None]]) -> LanguageModel:
    """A new model for ``cfg`` with the source's weights, except each layer's wkv = shared_rows[layer]."""
    state = {k: v for k, v in source.state_dict().items() if ".omega_" not in k}
    target = LanguageModel(cfg)
    layer_names = {
        m.layer_idx: name for name, m in target.named_modules() if hasattr(m, "wkv") and hasattr(m, "layer_idx")
    }
    for i, (w, b) in enumerate(shared_rows):
        state[f"{layer_names[i]}.wkv.weight"] = w.clone()
        if b is not None:
            state[f"{layer_names[i]}.wkv.bias"] = b.clone()
    target.load_state_dict(state)
    return target.to(next(source.parameters()).device)
