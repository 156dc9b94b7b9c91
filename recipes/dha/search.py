"""MHA → DHA conversion, stage 1: head-dependence search (METHODS.md §4(a) stage 1).

The paper's search ("multi-step optimization", 240 steps for LLaMA2-7B) is not public; this is a
reconstruction [RECON] whose choices are options:

1. features of every key head and, separately, every value head of a layer: its projection
   weights W_i (d×D, + bias) flattened (``similarity=params``, the paper's heat maps), or its
   projected outputs on calibration tokens (N×d) flattened (``similarity=activations``);
2. similarity: cosine between the features (reported as an H×H matrix per layer and kind);
3. grouping: Ward agglomerative clustering of the unit-normalised features, a nested partition
   for every g = H … 1, whose cost(g) = Σ_G Σ_{i∈G} ‖u_i − ū_G‖² / H is the share of head
   "energy" that differs within groups (0: each group's heads are identical up to scale);
4. allocation under the global budget Σ_ℓ (g^K_ℓ + g^V_ℓ) ≤ budget · 2·L·H: ``dp`` picks the counts
   minimising Σ cost exactly (so redundant layers/kinds get fewer heads); ``uniform`` gives every
   layer and kind the same count (the "no adaptive allocation" ablation).

Legend: L layers, H heads, d head dim, D d_model, N calibration tokens, F feature size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from arch.registry import ConfigError

KINDS = ("k", "v")


@dataclass
class LayerSearch:
    """One layer's search result for one kind (keys or values)."""

    similarity_HH: list[list[float]]  # cosine similarity of the heads' features
    costs: list[float]  # costs[g - 1] = cost of g groups, g = 1 … H
    partitions: list[list[int]]  # partitions[g - 1] = group label of every head for g groups


@dataclass
class SearchResult:
    budget_heads: int  # Σ (g^K + g^V) allowed
    counts: dict[str, list[int]] = field(default_factory=dict)  # "k"/"v" → g per layer
    groups: dict[str, list[list[int]]] = field(default_factory=dict)  # "k"/"v" → per layer, head → group
    layers: dict[str, list[LayerSearch]] = field(default_factory=dict)

    @property
    def total_cost(self) -> float:
        return sum(self.layers[kind][layer].costs[g - 1] for kind in KINDS for layer, g in enumerate(self.counts[kind]))


def budget_heads(budget: float, n_layers: int, n_heads: int) -> int:
    """KV heads allowed at ``budget`` (a fraction of MHA's 2·L·H); at least one key and one value head per layer."""
    if not 0 < budget <= 1:
        raise ConfigError(f"budget={budget} must be a fraction of MHA's KV heads in (0, 1]")
    total = int(budget * 2 * n_layers * n_heads + 1e-9)
    if total < 2 * n_layers:
        raise ConfigError(
            f"budget={budget} allows {total} KV heads but {n_layers} layers need at least {2 * n_layers} "
            f"(one key and one value head each): the smallest budget is {1 / n_heads:g}"
        )
    return total


def attention_layers(model) -> list:
    """The model's attention modules, in layer order."""
    found = {m.layer_idx: m for m in model.modules() if hasattr(m, "wkv") and hasattr(m, "layer_idx")}
    return [found[i] for i in sorted(found)]


def parameter_features(attn) -> dict[str, torch.Tensor]:
    """kind → (H, F): each head's key/value projection rows (and bias) flattened."""
    H, d = attn.n_heads, attn.head_dim
    w_2HdD = attn.wkv.weight.detach().float().view(2, H, d, -1)
    feats = w_2HdD.flatten(2)
    if attn.wkv.bias is not None:
        feats = torch.cat([feats, attn.wkv.bias.detach().float().view(2, H, d)], dim=2)
    return {"k": feats[0], "v": feats[1]}


@torch.no_grad()
def activation_features(model, batches) -> list[dict[str, torch.Tensor]]:
    """Per layer, kind → (H, N·d): each head's projected keys/values (before RoPE) on the calibration batches."""
    layers = attention_layers(model)
    outputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    hooks = [
        attn.wkv.register_forward_hook(lambda _m, _x, y, i=i: outputs[i].append(y.detach().float()))
        for i, attn in enumerate(layers)
    ]
    try:
        was_training = model.training
        model.eval()
        for x_BT in batches:
            model(x_BT)
        model.train(was_training)
    finally:
        for hook in hooks:
            hook.remove()
    feats = []
    for i, attn in enumerate(layers):
        kv_N2Hd = torch.cat([y.flatten(0, 1) for y in outputs[i]]).view(-1, 2, attn.n_heads, attn.head_dim)
        feats.append({kind: kv_N2Hd[:, j].transpose(0, 1).flatten(1) for j, kind in enumerate(KINDS)})
    return feats


def cosine_similarity(f_HF: torch.Tensor) -> torch.Tensor:
    u_HF = torch.nn.functional.normalize(f_HF.double(), dim=1)
    return u_HF @ u_HF.T


def ward_partitions(f_HF: torch.Tensor) -> tuple[list[list[int]], list[float]]:
    """Nested partitions of the H heads for g = 1 … H (Ward linkage on unit features) and their costs."""
    u_HF = torch.nn.functional.normalize(f_HF.double(), dim=1)
    H = u_HF.shape[0]
    clusters = [[i] for i in range(H)]
    partitions, costs = {H: _labels(clusters, H)}, {H: 0.0}
    cost = 0.0
    while len(clusters) > 1:
        best = None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                na, nb = len(clusters[a]), len(clusters[b])
                gap = (u_HF[clusters[a]].mean(0) - u_HF[clusters[b]].mean(0)).pow(2).sum().item()
                increase = na * nb / (na + nb) * gap  # Ward: growth of the within-group sum of squares
                if best is None or increase < best[0]:
                    best = (increase, a, b)
        increase, a, b = best
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
        cost += increase
        partitions[len(clusters)], costs[len(clusters)] = _labels(clusters, H), cost / H
    return [partitions[g] for g in range(1, H + 1)], [costs[g] for g in range(1, H + 1)]


def _labels(clusters: list[list[int]], H: int) -> list[int]:
    """Group label per head, groups numbered by their first head (a canonical order)."""
    labels = [0] * H
    for label, members in enumerate(sorted(clusters, key=min)):
        for i in members:
            labels[i] = label
    return labels


def allocate(costs: list[list[float]], total: int, mode: str) -> list[int]:
    """Head counts g_i ∈ [1, H] for each item (layer × kind) with Σ g_i ≤ total, minimising Σ costs[i][g_i − 1]."""
    n, H = len(costs), len(costs[0])
    if mode == "uniform":
        return [min(H, total // n)] * n
    if mode != "dp":
        raise ConfigError(f"allocation={mode!r} is invalid; allowed: ['dp', 'uniform']")
    total = min(total, n * H)
    INF = float("inf")
    best = [0.0] + [INF] * total  # best[s]: minimal cost of the items so far using exactly s heads
    choices: list[list[int]] = []
    for item in costs:
        nxt, pick = [INF] * (total + 1), [0] * (total + 1)
        for s, base in enumerate(best):
            if base == INF:
                continue
            for g in range(1, H + 1):
                if s + g > total:
                    break
                # ties go to more heads (the larger g is tried later and wins on <=)
                if base + item[g - 1] <= nxt[s + g]:
                    nxt[s + g], pick[s + g] = base + item[g - 1], g
        best = nxt
        choices.append(pick)
    s = min(range(total + 1), key=lambda t: (best[t], -t))
    counts = []
    for pick in reversed(choices):
        counts.append(pick[s])
        s -= pick[s]
    return counts[::-1]


def search(
    model, budget: float, similarity: str = "params", allocation: str = "dp", calib_batches=None
) -> SearchResult:
    """Group the key and value heads of every layer of an MHA model and allocate counts under ``budget``."""
    layers = attention_layers(model)
    if not layers or any(getattr(a, "n_kv_heads", None) != a.n_heads for a in layers):
        raise ConfigError("mha_to_dha needs a model whose attention is MHA (model.attention.name=mha, n_kv_heads=null)")
    H = layers[0].n_heads
    if similarity == "params":
        feats = [parameter_features(a) for a in layers]
    elif similarity == "activations":
        if not calib_batches:
            raise ConfigError("similarity=activations needs calibration batches (calib_batches >= 1)")
        feats = activation_features(model, calib_batches)
    else:
        raise ConfigError(f"similarity={similarity!r} is invalid; allowed: ['params', 'activations']")
    result = SearchResult(budget_heads=budget_heads(budget, len(layers), H))
    for kind in KINDS:
        result.layers[kind] = []
        for f in feats:
            partitions, costs = ward_partitions(f[kind])
            result.layers[kind].append(LayerSearch(cosine_similarity(f[kind]).tolist(), costs, partitions))
    items = [result.layers[kind][i].costs for kind in KINDS for i in range(len(layers))]
    counts = allocate(items, result.budget_heads, allocation)
    for j, kind in enumerate(KINDS):
        result.counts[kind] = counts[j * len(layers) : (j + 1) * len(layers)]
        result.groups[kind] = [result.layers[kind][i].partitions[g - 1] for i, g in enumerate(result.counts[kind])]
    return result
