"""Diffusion-style parallel sampler for recurrent-depth models (Geiping, Yang, Su 2025; METHODS.md §8.6).

``model.generate(..., sampler="parallel")`` dispatches here. Follows [CODE]
``RavenForCausalLM.generate_diffusion_style`` (seal-rg/recurrent-pretraining): after a full
prefill, a *wavefront* of the latest positions is refined together. Every outer step

  1. runs the prelude on the wavefront's tokens (embeddings EMA-mixed with the previous step's,
     ``ema_embeds``);
  2. mixes noise into the states, s ← (1 − β)s + β·s_0 with β = ``state_noise`` / (1 + the
     recurrences done at that position) (the dampened mixer);
  3. runs ``inner_recurrence`` core iterations on all wavefront positions at once;
  4. decodes every wavefront position and resamples its next token;
  5. appends ``headway`` new positions with fresh random states (at most ``max_wavefront``);
  6. freezes every position up to the last one whose relative latent change
     ||s_t − s_{t−1}|| / ||s_t|| is below ``exit_threshold`` (``latent-diff``): its tokens are
     committed, their keys/values stay in the cache and they leave the wavefront.

Keys/values: one cache slot per prelude / core / coda layer, holding the latest iteration's
keys of every committed position ([CODE] default lookup ``latest-m4-compress-s4``). With the
noise and EMA off and a tiny ``exit_threshold``, every committed state is a fixed point of the
core, which sequential decoding reaches too once its iteration count is large enough.

Differences from the reference: batches run one sequence at a time (the reference allows batch
size 1 only); generation stops at ``eos_id`` as soon as it is committed, and the output is cut to
``max_new_tokens``; if ``max_steps`` outer steps do not freeze enough tokens, the current
guesses are committed so the result always has the requested length.

Legend: W wavefront positions, D d_model, V vocab.
"""

from __future__ import annotations

import torch

from arch.depth.loop import RecurrentDepth
from arch.layers import ForwardContext
from arch.sampling import sample_token


class WavefrontCache:
    """A KV cache whose uncommitted tail is rewritten every step: ``length`` positions are frozen;
    each call writes its keys at [length, length + T) and sees all of [0, length + T)."""

    def __init__(self, max_len: int):
        self.max_len, self.length = max_len, 0
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def update(self, slot: int, k_BTHd: torch.Tensor, v_BTHd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k_BTHd.shape[1]
        if end > self.max_len:
            raise ValueError(f"wavefront cache full: {end} > {self.max_len}")
        if slot not in self.k:
            self.k[slot] = k_BTHd.new_zeros((k_BTHd.shape[0], self.max_len, *k_BTHd.shape[2:]))
            self.v[slot] = v_BTHd.new_zeros((v_BTHd.shape[0], self.max_len, *v_BTHd.shape[2:]))
        self.k[slot][:, self.length : end] = k_BTHd
        self.v[slot][:, self.length : end] = v_BTHd
        return self.k[slot][:, :end], self.v[slot][:, :end]


class _Runner:
    """The model's pieces at explicit positions and cache slots (prelude, core step, head)."""

    def __init__(self, model, cache: WavefrontCache | None):
        self.model, self.depth, self.cache = model, model.depth, cache

    def ctx(self, start: int, T: int, slot: int, cache=True) -> ForwardContext:
        positions_T = torch.arange(start, start + T, device=self.model.embed.weight.device)
        cos_TF, sin_TF = self.model.rope.span(start, T)
        return ForwardContext(
            cos_TF=cos_TF,
            sin_TF=sin_TF,
            positions_T=positions_T,
            kv_cache=self.cache if cache else None,
            elastic=self.model.elastic,
            _attention_calls=slot,
        )

    def prelude(self, idx_1W: torch.Tensor, start: int, cache: bool = True) -> torch.Tensor:
        return self.depth.prelude(self.model.embed(idx_1W), self.ctx(start, idx_1W.shape[1], 0, cache))

    def core(self, s_1WD: torch.Tensor, e_1WD: torch.Tensor, start: int) -> torch.Tensor:
        return self.depth.core_step(s_1WD, e_1WD, self.ctx(start, s_1WD.shape[1], self.depth.n_prelude))

    def logits(self, s_1WD: torch.Tensor, start: int) -> torch.Tensor:
        x_1WD = self.depth.coda(s_1WD, self.ctx(start, s_1WD.shape[1], self.depth.n_prelude + self.depth.n_core))
        return self.model.lm_head(self.model.norm(x_1WD))[0].float()


@torch.no_grad()
def generate_parallel(
    model,
    idx_BT: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    *,
    inner_recurrence: int = 4,
    prefill_iterations: int | None = None,
    exit_threshold: float = 0.03,
    max_wavefront: int = 128,
    state_noise: float = 0.5,
    dampened_noise: bool = True,
    ema_embeds: float = 0.1,
    headway: int = 1,
    max_steps: int = 4096,
    stats: dict | None = None,
) -> torch.Tensor:
    """(B, T + max_new_tokens) tokens (shorter only if every row stopped at ``eos_id``).

    ``prefill_iterations`` (default: the model's ``eval_iterations``) runs the prompt; ``stats``,
    if given, receives ``outer_steps`` (model passes) and ``core_token_iterations``.
    """
    depth = model.depth
    if not isinstance(depth, RecurrentDepth):
        raise ValueError(
            f"sampler='parallel' needs a recurrent-depth model (model.depth.name=recurrent), got {type(depth).__name__}"
        )
    if inner_recurrence < 1 or headway < 1 or max_steps < 1:
        raise ValueError("inner_recurrence, headway and max_steps must be >= 1")
    if not (0 <= state_noise <= 1 and 0 <= ema_embeds < 1 and exit_threshold >= 0):
        raise ValueError("need 0 <= state_noise <= 1, 0 <= ema_embeds < 1 and exit_threshold >= 0")
    B, T = idx_BT.shape
    if T + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds model.max_seq_len={model.cfg.max_seq_len}"
        )

    def sample(logits_NV):
        return sample_token(logits_NV, temperature, top_k, generator)[:, 0]

    options = dict(
        inner=inner_recurrence,
        prefill=prefill_iterations or depth.eval_iterations,
        exit_t=exit_threshold,
        max_wave=max_wavefront,
        noise=state_noise,
        dampened=dampened_noise,
        ema=ema_embeds,
        headway=headway,
        max_steps=max_steps,
        eos=eos_id,
    )
    was_training = model.training
    model.eval()
    totals = {"outer_steps": 0, "core_token_iterations": 0}
    rows = [_generate_one(model, idx_BT[b : b + 1], max_new_tokens, sample, totals, **options) for b in range(B)]
    model.train(was_training)
    if stats is not None:
        stats.update(totals)
    width = max(r.shape[1] for r in rows)
    pad = eos_id if eos_id is not None else 0
    return torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1]), value=pad) for r in rows])


def _generate_one(
    model,
    prompt_1T,
    max_new,
    sample,
    totals,
    *,
    inner,
    prefill,
    exit_t,
    max_wave,
    noise,
    dampened,
    ema,
    headway,
    max_steps,
    eos,
) -> torch.Tensor:
    T0 = prompt_1T.shape[1]
    limit = T0 + max_new  # positions that may hold a state (the last one predicts nothing we keep)
    cache = WavefrontCache(limit)
    run = _Runner(model, cache)
    depth = model.depth
    # Full prefill: the prompt at `prefill` iterations; its keys become the committed prefix.
    e_1TD = run.prelude(prompt_1T, 0)
    s_1TD = depth.initial_state(e_1TD)
    for _ in range(prefill):
        s_1TD = run.core(s_1TD, e_1TD, 0)
    frozen = torch.cat([prompt_1T, sample(run.logits(s_1TD, 0)[-1:])[None]], dim=1)
    cache.length = T0
    counter = torch.zeros(limit + headway + 1, device=prompt_1T.device)
    counter[: T0 + 1] += prefill
    states = depth.initial_state(e_1TD[:, -1:])
    seq = frozen
    old_e = run.prelude(seq, 0, cache=False)[:, T0:] if ema > 0 else None
    prev_states, old_c, step = states.clone(), T0, 0
    while frozen.shape[1] - T0 < max_new and step < max_steps:
        c, W = cache.length, states.shape[1]
        e = run.prelude(seq[:, c : c + W], c)
        if ema > 0:  # [CODE]: new positions get (1 − ema)·e, without the missing old half
            old = old_e[:, c - old_c :]
            e = e * (1 - ema)
            e[:, : old.shape[1]] += old[:, :W] * ema
            old_e = e.clone()
        if noise > 0:
            beta = noise / (1 + counter[c : c + W])[None, :, None] if dampened else noise
            states = states * (1 - beta) + beta * depth.initial_state(states)
        for _ in range(inner):
            states = run.core(states, e, c)
            counter[c : c + W] += 1
        totals["core_token_iterations"] += inner * W
        logits_WV = run.logits(states, c)
        new = sample(logits_WV[max(frozen.shape[1] - 1 - c, 0) :])[None]
        extra = torch.randint(0, logits_WV.shape[-1], (1, headway - 1), device=seq.device)  # [CODE] random guesses
        seq = torch.cat([frozen, new, extra], dim=1)
        states = torch.cat([states, depth.initial_state(states.new_zeros(1, headway, states.shape[-1]))], dim=1)
        cap = min(max_wave if max_wave > 0 else limit, limit - c)  # a standing wave at the budget's end
        states, seq = states[:, :cap], seq[:, : c + cap]
        prev = prev_states[:, c - old_c :]
        L = min(prev.shape[1], states.shape[1])
        change_L = (states[0, :L] - prev[0, :L]).norm(dim=-1) / states[0, :L].norm(dim=-1)
        exits = (change_L < exit_t).nonzero()
        if len(exits):  # freeze everything up to the last converged position
            k = c + int(exits[-1, 0]) + 1
            before = frozen.shape[1]
            frozen = seq[:, : max(k, before)]
            cache.length = k - 1
            states = states[:, k - c - 1 :]
            if eos is not None and bool((frozen[0, before:] == eos).any()):
                break
        prev_states, old_c, step = states.clone(), c, step + 1
    totals["outer_steps"] += step + 1
    if frozen.shape[1] - T0 < max_new:  # out of steps: commit the current guesses
        frozen = seq
    out = frozen[:, :limit]
    if eos is not None:
        hits = (out[0, T0:] == eos).nonzero()
        if len(hits):
            out = out[:, : T0 + int(hits[0, 0]) + 1]
    return out
