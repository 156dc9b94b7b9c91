"""Sequential generation with a KV cache, and the token sampler every generator shares.

``LanguageModel.generate`` dispatches here (``sampler="sequential"``) or to the parallel sampler of
recurrent-depth models (``arch.depth.sampler``), which reuses ``sample_token``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from arch.layers import KVCache


@torch.no_grad()
def generate_sequential(
    model,
    idx_BT: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    eos_id: int | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Token-by-token continuation of ``idx_BT`` (B, T) through ``model`` with a KV cache → (B, T + new)."""
    B, T = idx_BT.shape
    if T + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds model.max_seq_len={model.cfg.max_seq_len}"
        )
    was_training = model.training
    model.eval()
    cache = KVCache(B, T + max_new_tokens)
    logits = model(idx_BT, kv_cache=cache, last_position_only=True).logits
    out = [idx_BT]
    for _ in range(max_new_tokens):
        next_B1 = sample_token(logits[:, -1].float(), temperature, top_k, generator)
        out.append(next_B1)
        if eos_id is not None and bool((next_B1 == eos_id).all()):
            break
        logits = model(next_B1, kv_cache=cache, last_position_only=True).logits
    model.train(was_training)
    return torch.cat(out, dim=1)


def sample_token(logits_BV: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """One token per row from (B, V) logits: greedy at temperature 0, else softmax sampling over the top-k. → (B, 1)."""
    if temperature == 0:
        return logits_BV.argmax(-1, keepdim=True)
    logits_BV = logits_BV / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = torch.topk(logits_BV, top_k).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    probs_BV = F.softmax(logits_BV, dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator)
